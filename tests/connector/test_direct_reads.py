"""End to end through vLLM: a small disk run read in the step that loads it (a direct
read, secondary.py and worker.py) gives vLLM's own tokens, and a read that fails in that
step is a load error vLLM recomputes, never a wrong token.

One engine, vLLM's prefix cache off, a host tier of 8 blocks and a disk tier: a
conversation's first turn is pushed out of host by two others, so its next turn is
served from disk.  The reference is the same prompt under a fresh cache salt, which no
stored block can match.  `--promptcache` asks vLLM to recompute blocks that fail to load
(`kv_load_failure_policy="recompute"`, vLLM 0.32+); without it there are no direct reads.
"""

from __future__ import annotations

import glob
import os
import random

import pytest

from tests.conftest import ENGINE_DEFAULTS, close_llm, make_llm, settled

pytestmark = pytest.mark.engine

# The tiny model: 2 layers x K,V x 128 tokens x 2 heads x 32 x the element.
SLOT_BYTES = 2 * 2 * 128 * 2 * 32 * (4 if ENGINE_DEFAULTS["dtype"] == "float32" else 2)


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("direct-reads"))


@pytest.fixture(scope="module")
def llm(tiny_model, disk_dir):
    from vllm_promptcache import engine_kwargs

    kwargs = engine_kwargs(host_gb=8 * SLOT_BYTES / 2**30, disk_path=disk_dir, disk_gb=1)
    if "kv_load_failure_policy" not in kwargs["kv_transfer_config"]:
        pytest.skip("this vLLM cannot recompute blocks a connector failed to load")
    engine = make_llm(tiny_model, enable_prefix_caching=False, **kwargs)
    yield engine
    close_llm(engine)


def generate(llm, prompt, salt=None):
    from vllm import SamplingParams

    p = {"prompt_token_ids": prompt}
    if salt:
        p["cache_salt"] = salt
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    return list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)


def counter(llm, name, tier):
    from vllm_promptcache import read_metrics

    return settled(lambda: read_metrics(llm).get(name, {}).get(tier, 0), pause=0.2)


def kv_files(directory):
    return set(glob.glob(os.path.join(directory, "**", "*.kv"), recursive=True))


def first_turn_then_pushed_out(llm, disk_dir, seed):
    """Serve a 600-token first turn, wait for its disk file, then push it out of the
    8-block host tier with two other conversations; returns (prompt, answer, files)."""
    before = kv_files(disk_dir)
    prompt = tokens(600, seed)
    answer = generate(llm, prompt)
    files = settled(lambda: kv_files(disk_dir) - before, pause=0.3)
    assert files, "the first turn was written through to disk"
    for other in (seed + 100, seed + 200):
        generate(llm, tokens(600, other))
    return prompt, answer, files


def test_a_turn_served_from_disk_in_its_loading_step_equals_vllm(llm, disk_dir):
    prompt, answer, _ = first_turn_then_pushed_out(llm, disk_dir, 1)
    reads, hits = (counter(llm, "direct_read_blocks_total", "disk"),
                   counter(llm, "hit_tokens_total", "disk"))
    nxt = prompt + answer + tokens(40, 2)
    assert generate(llm, nxt) == generate(llm, nxt, salt="no-cache-reference")
    assert counter(llm, "direct_read_blocks_total", "disk") > reads
    assert counter(llm, "hit_tokens_total", "disk") >= hits + 4 * 128
    assert counter(llm, "load_errors_total", "disk") == 0


def test_a_direct_read_that_fails_is_recomputed_by_vllm(llm, disk_dir):
    prompt, answer, files = first_turn_then_pushed_out(llm, disk_dir, 3)
    for f in files:  # gone under the index (another engine evicted it, say)
        os.unlink(f)
    errors = counter(llm, "load_errors_total", "disk")
    nxt = prompt + answer + tokens(40, 4)
    assert generate(llm, nxt) == generate(llm, nxt, salt="no-cache-reference")
    assert counter(llm, "load_errors_total", "disk") > errors
