"""End to end through vLLM: the disk tier survives a restart, serves the next turn
from disk, turns damaged files into misses, and prefetches queued requests.

Engine 1 is another process (`engine_turn.py`): it serves the first turn of three
conversations and exits.  Engine 2, in this process, starts on the same directory
after one file of conversation B got a flipped payload byte and one of
conversation C was truncated.  Its host tier is empty after the restart, so
every hit comes from disk, through a prefetch issued when the request was queued.
The no-cache reference is the same prompt on engine 2 under a fresh cache salt,
which no stored block can match.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import close_llm, make_llm, settled

pytestmark = pytest.mark.engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


@pytest.fixture(scope="module")
def first_turns(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("disk-restart")
    disk_dir = str(work / "kv")
    spec = {name: tokens(600, seed) for name, seed in (("A", 11), ("B", 12), ("C", 13))}
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.connector.engine_turn", tiny_model, disk_dir,
         str(work / "spec.json"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in spec:
        assert result[name]["files"], f"engine 1 wrote no disk file for conversation {name}"
        result[name]["prompt"] = spec[name]
    return disk_dir, result


@pytest.fixture(scope="module")
def damaged(first_turns):
    """Flip one payload byte in B's first file; cut C's first file short."""
    from vllm_promptcache.store import disk_format as fmt

    disk_dir, result = first_turns
    b_file = result["B"]["files"][0]
    header = fmt.read_header(b_file, fmt.disk_secret(disk_dir))
    with open(b_file, "r+b") as fh:
        fh.seek(header.block_offset(0) + 100)
        byte = fh.read(1)
        fh.seek(header.block_offset(0) + 100)
        fh.write(bytes([byte[0] ^ 0x40]))
    c_file = result["C"]["files"][0]
    os.truncate(c_file, os.path.getsize(c_file) - 5000)
    return disk_dir, result


@pytest.fixture(scope="module")
def engine2(tiny_model, damaged):
    from vllm_promptcache import engine_kwargs

    disk_dir, _ = damaged
    llm = make_llm(tiny_model, enable_prefix_caching=False,
                   **engine_kwargs(host_gb=0.002, disk_path=disk_dir, disk_gb=1))
    yield llm
    close_llm(llm)


def next_turn(conv, question_seed):
    return conv["prompt"] + conv["tokens"] + tokens(40, question_seed)


def generate(llm, prompt, salt=None):
    from vllm import SamplingParams

    p = {"prompt_token_ids": prompt}
    if salt:
        p["cache_salt"] = salt
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    return list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)


def metrics(llm, name, tier=None):
    """A counter once the engine's last steps have reported (stats travel with steps)."""
    from vllm_promptcache import read_metrics

    def read():
        value = read_metrics(llm).get(name, {} if tier else 0)
        return value.get(tier, 0) if tier else value

    return settled(read, pause=0.2)


def test_engine2_serves_the_next_turn_from_disk(engine2, damaged):
    _, result = damaged
    prompt = next_turn(result["A"], 1)
    cached = generate(engine2, prompt)
    disk_hits = metrics(engine2, "hit_tokens_total", "disk")
    reference = generate(engine2, prompt, salt="no-cache-reference")
    assert cached == reference
    # 600 prompt + 16 answer tokens were saved: 4 full blocks of 128.
    assert disk_hits >= 4 * 128


def test_the_hit_was_prefetched_when_the_request_was_queued(engine2):
    assert metrics(engine2, "prefetch_blocks_total") >= 4
    assert metrics(engine2, "prefetch_hit_blocks_total") >= 4


def test_a_flipped_byte_is_a_miss_and_is_deleted(engine2, damaged):
    _, result = damaged
    hits_before = metrics(engine2, "hit_tokens_total", "disk")
    prompt = next_turn(result["B"], 2)
    cached = generate(engine2, prompt)
    assert cached == generate(engine2, prompt, salt="no-cache-reference")
    assert metrics(engine2, "corrupt_blocks_total", "disk") >= 1
    assert not os.path.exists(result["B"]["files"][0])
    # B's first block was the damaged one, so nothing of B could be served.
    assert metrics(engine2, "hit_tokens_total", "disk") == hits_before


def test_a_truncated_file_is_dropped_at_start(engine2, damaged):
    _, result = damaged
    hits_before = metrics(engine2, "hit_tokens_total", "disk")
    prompt = next_turn(result["C"], 3)
    assert generate(engine2, prompt) == generate(engine2, prompt, salt="no-cache-reference")
    assert not os.path.exists(result["C"]["files"][0])
    assert metrics(engine2, "hit_tokens_total", "disk") == hits_before
