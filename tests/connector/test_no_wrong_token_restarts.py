"""No wrong token across a restart on one disk tier: weights re-saved in place miss,
and approximate KV handed on by vLLM's prefix cache is never stored as exact.

Each test runs its first engine in its own process (`engine_session.py`) on a disk tier
that a second engine, started here, then opens; the reference is the session's vLLM
without the plugin (conftest.py).  A file of its own so that these long tests run beside
the rest of test_no_wrong_token.py under `pytest -n 2 --dist loadfile`.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.conftest import close_llm, make_llm, settled
from tests.connector.engine_session import run_session
from tests.connector.test_no_wrong_token import BLOCK, generate, tokens

pytestmark = pytest.mark.engine


def kv_dirs(disk):
    return {d for d in os.listdir(disk) if len(d) == 32 and
            any(n.endswith(".kv") for n in os.listdir(os.path.join(disk, d)))}


def resave_weights(model_dir: str) -> None:
    """A new fine-tune saved over the old one: same config and shapes, other values."""
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(7)
    for name, t in tensors.items():
        if "proj" in name:
            tensors[name] = (t.float() + torch.randn(t.shape, generator=g) * 0.05).to(t.dtype)
    time.sleep(0.01)
    save_file(tensors, path)


def test_weights_replaced_in_place_miss_after_a_restart_and_old_files_age_out(tiny_model, tmp_path):
    from vllm_promptcache import engine_kwargs, read_metrics

    model = str(tmp_path / "model")
    shutil.copytree(tiny_model, model)
    assert os.path.exists(os.path.join(model, "model.safetensors"))
    disk = str(tmp_path / "kv")
    prompt = tokens(4 * BLOCK + 20, 6)
    first = run_session({"model": model, "engine": {"enable_prefix_caching": False},
                         "promptcache": {"host_gb": 0.01, "disk_path": disk, "disk_gb": 1},
                         "steps": [{"prompt": prompt, "max_tokens": 8}]}, tmp_path, "old")
    old_dirs = kv_dirs(disk)
    assert len(old_dirs) == 1
    old_bytes = sum(os.path.getsize(os.path.join(disk, d, n)) for d in old_dirs
                    for n in os.listdir(os.path.join(disk, d)))
    resave_weights(model)
    turn2 = prompt + first["outputs"][0] + tokens(40, 7)
    ref = make_llm(model, enable_prefix_caching=False)
    expected = generate(ref, turn2)
    close_llm(ref)
    # Room for the old files, not for them and this turn's: the old ones go first.  The
    # old weights' directory is another fingerprint's, which an engine evicts only when
    # the operator says so (another model's engine may share the root): here it does.
    llm = make_llm(model, enable_prefix_caching=False,
                   **engine_kwargs(host_gb=0.01, disk_path=disk, disk_reclaim_others=True,
                                   disk_gb=1.5 * old_bytes / 2**30))
    try:
        assert generate(llm, turn2) == expected
        hits = settled(lambda: read_metrics(llm).get("hit_tokens_total", {}),
                       step=lambda: generate(llm, [5] * 20, max_tokens=1))
        assert not hits.get("disk") and not hits.get("host")
        deadline = time.time() + 30
        while old_dirs & kv_dirs(disk) and time.time() < deadline:
            time.sleep(0.3)
        assert not old_dirs & kv_dirs(disk), "the old weights' files age out under the cap"
        assert len(kv_dirs(disk)) == 1
    finally:
        close_llm(llm)


def test_approximate_kv_handed_on_by_vllms_prefix_cache_is_never_served_as_exact(
        tiny_model, reference, tmp_path):
    """Request A loads module docB shifted; request B, with A's leading tokens, gets
    those blocks from vLLM's prefix cache.  Neither may store them under exact keys:
    an exact-only engine restarted on the same disk answers as vLLM without the plugin."""
    from vllm_promptcache import engine_kwargs, read_metrics

    from tests.modules.test_prompt_modules import text

    disk = str(tmp_path / "kv")
    question = {"text": "walrus " + text(40, 8)}
    session = run_session({
        "model": tiny_model, "engine": {"enable_prefix_caching": True},
        "promptcache": {"host_gb": 0.05, "disk_path": disk, "disk_gb": 1,
                        "position_independent": True},
        "modules": {"docA": text(170, 2), "docB": text(170, 3)},
        "steps": [{"compose": ["docA", "docB", question], "max_tokens": 4},
                  {"compose": ["docA", "docB", question, {"text": "more " + text(200, 9)}],
                   "max_tokens": 8}],
    }, tmp_path, "approximate")
    assert session["metrics"]["shifted_hit_tokens_total"]["host"] > 0, "A must load docB shifted"
    b_prompt = session["prompts"][1] + session["outputs"][1] + tokens(30, 10)
    llm = make_llm(tiny_model, enable_prefix_caching=False,
                   **engine_kwargs(host_gb=0.05, disk_path=disk, disk_gb=1))
    def disk_hits():
        return settled(lambda: read_metrics(llm).get("hit_tokens_total", {}).get("disk", 0.0),
                       step=lambda: generate(llm, [5] * 20, max_tokens=1))

    try:
        before = disk_hits()  # the warm-up prompt of make_llm hits engine 1's files
        assert generate(llm, b_prompt) == generate(reference, b_prompt)
        # Only docA's first two blocks (computed after BOS, at their own
        # position, by its encoding) are exact; nothing from docB on is loaded.
        assert disk_hits() - before == 2 * BLOCK
    finally:
        close_llm(llm)
