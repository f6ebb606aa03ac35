"""`vllm-promptcache calibrate` and what a position-independent engine does with its record
(vllm_promptcache/calibration.py), and the fact-QA set it runs (fact_qa.py).

The engine tests run on the tiny model: the real CLI writes a record, and an engine
started afterwards uses the record's recompute ratio (it loads fewer shifted tokens)
unless a request names its own.  The records live in a temporary XDG_CACHE_HOME.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest

from vllm_promptcache import calibration, fact_qa
from vllm_promptcache.config import PromptCacheConfig
from vllm_promptcache.store.keys import ModelFingerprint

FINGERPRINT = ModelFingerprint(model="/models/m", dtype="torch.float32", kv_cache_dtype="auto",
                               block_size=128, num_layers=2, num_kv_heads=2, head_size=32,
                               tp_size=1, tp_rank=0, weights="digest-of-m")


def config(mode: str | None = None, **kw) -> PromptCacheConfig:
    if mode is not None:
        if "calibration" not in {f.name for f in dataclasses.fields(PromptCacheConfig)}:
            pytest.skip("PromptCacheConfig has no calibration option yet")
        kw["calibration"] = mode
    return PromptCacheConfig(position_independent=True, **kw)


def write(tmp_path, ratio, fingerprint=FINGERPRINT):
    calibration.write_record({"bound": 0.02, "recommended_ratio": ratio},
                             calibration.record_path(fingerprint, tmp_path))


# -- the fact-QA set --------------------------------------------------------------------

def test_fact_set_is_seeded_and_each_answer_is_in_one_document_only():
    facts = fact_qa.fact_set(num_docs=8, seed=3)
    assert facts == fact_qa.fact_set(num_docs=8, seed=3)
    assert facts != fact_qa.fact_set(num_docs=8, seed=4)
    assert len(facts.questions) == 18  # 2 or 3 on each of 4 kinds of document, in turn
    assert len({d.split()[1] for d in facts.docs[1::4]}) == 2  # two different bridges
    for q in facts.questions:
        assert [i for i, d in enumerate(facts.docs) if q.answer in d] == [q.doc]
        assert q.answer not in q.text


def test_scores_normalise_as_squad_does():
    assert fact_qa.exact_match("She was born in 1847.", "1847")
    assert not fact_qa.exact_match("She was born in 18470.", "1847")
    assert fact_qa.exact_match("the Dron Mill", "Dron Mill")
    assert fact_qa.token_f1("Dron Mill", "the Dron Mill!") == 1.0
    assert fact_qa.token_f1("in 1847", "1847") == pytest.approx(2 / 3)
    assert fact_qa.token_f1("no", "1847") == 0.0
    # Words that restate the question are not held against the answer.
    asked = "In which year was Edra Vann born?"
    assert fact_qa.token_f1("Edra Vann was born in 1847.", "1847", asked) == 1.0
    assert fact_qa.token_f1("Edra Vann was born in 1847, in May.", "1847", asked) == pytest.approx(2 / 3)
    assert fact_qa.token_f1("Edra Vann was born in 1847.", "1847") < 0.3


def test_examples_shuffle_four_documents_around_the_answer():
    facts = fact_qa.fact_set(6, 0)
    examples = calibration.fact_qa_examples(6, seed=0)
    assert len(examples) == len(facts.questions) == 14
    for ex, q in zip(examples, facts.questions):
        assert len(ex.docs) == 4 and facts.docs[q.doc] in ex.docs and ex.answer == q.answer
    assert any(list(ex.docs) != sorted(ex.docs, key=facts.docs.index) for ex in examples)
    assert {len(ex.docs) for ex in calibration.fact_qa_examples(2)} == {2}  # all there are


# -- recommendation and records ---------------------------------------------------------

def test_recommend_takes_the_smallest_ratio_within_the_bound():
    def row(f1, em=0.0):
        return {"f1_minus_full": f1, "exact_match_minus_full": em}

    result = {"ratios": {"0": row(-0.2), "0.15": row(-0.01), "0.3": row(0.0)}}
    assert calibration.recommend(result, 0.02) == 0.15
    assert calibration.recommend(result, 0.5) == 0.0
    assert calibration.recommend(result, 0.001) == 0.3
    result["ratios"]["0.3"]["f1_minus_full"] = -0.05
    assert calibration.recommend(result, 0.001) is None
    # A better F1 from other wording does not hide fewer right answers.
    result = {"ratios": {"0": row(0.03, -0.09), "0.1": row(0.04, 0.0)}}
    assert calibration.recommend(result, 0.02) == 0.1


def test_prompts_file_errors_name_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"documents": ["a doc"], "question": "q?", "answer": "a"}\n\n'
                    '{"documents": "not a list", "question": "q?"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:3: .*non-empty list"):
        calibration.read_prompts_file(path)
    path.write_text('{"documents": ["d"], "question": "q?"}\n')
    ex, = calibration.read_prompts_file(path)
    assert ex.docs == ("d",) and ex.answer is None


def test_a_record_is_named_by_weights_and_dtype(tmp_path):
    other_dtype = dataclasses.replace(FINGERPRINT, dtype="torch.bfloat16")
    moved = dataclasses.replace(FINGERPRINT, model="/elsewhere/m")
    assert calibration.record_path(FINGERPRINT, tmp_path) != calibration.record_path(other_dtype,
                                                                                     tmp_path)
    assert calibration.record_path(FINGERPRINT, tmp_path) == calibration.record_path(moved, tmp_path)


# -- start-up ---------------------------------------------------------------------------

def test_no_record_warns_and_changes_nothing(tmp_path, plugin_log):
    caplog = plugin_log
    with caplog.at_level(logging.WARNING, logger="vllm.promptcache"):
        got = calibration.startup_check(FINGERPRINT, config(), tmp_path)
    assert got == config()
    assert "vllm-promptcache calibrate /models/m" in caplog.text


def test_the_calibrated_ratio_is_used_unless_one_is_set(tmp_path):
    write(tmp_path, 0.15)
    assert calibration.startup_check(FINGERPRINT, config(), tmp_path).recompute_ratio == 0.15
    explicit = config(recompute_ratio=0.3)
    assert calibration.startup_check(FINGERPRINT, explicit, tmp_path) == explicit
    assert calibration.startup_check(FINGERPRINT, config("off"), tmp_path).recompute_ratio == 0


def test_a_failed_calibration_refuses_unless_told_otherwise(tmp_path, plugin_log):
    caplog = plugin_log
    write(tmp_path, None)
    with pytest.raises(calibration.CalibrationFailedError,
                       match="no recompute ratio.*0.02 F1.*--promptcache-calibration warn"):
        calibration.startup_check(FINGERPRINT, config(), tmp_path)
    with pytest.raises(calibration.CalibrationFailedError):
        calibration.startup_check(FINGERPRINT, config("enforce"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="vllm.promptcache"):
        assert calibration.startup_check(FINGERPRINT, config("warn"), tmp_path) == config("warn")
    assert "starting anyway" in caplog.text
    assert calibration.startup_check(FINGERPRINT, config("off"), tmp_path) == config("off")


# -- the command and the next engine, on the tiny model ---------------------------------

@pytest.mark.engine
def test_calibrate_writes_a_record_the_next_engine_uses(tiny_model, tmp_path, monkeypatch):
    from vllm import SamplingParams

    from tests.conftest import ENGINE_DEFAULTS, KV_SCALE, close_llm, make_llm, settled
    from vllm_promptcache import PromptModules, Text, engine_kwargs, read_metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PROMPTCACHE_CALIBRATION", "enforce")  # conftest.py turns it off
    run = subprocess.run(
        [sys.executable, "-m", "vllm_promptcache", "calibrate", tiny_model, "--docs", "2",
         "--ratios", "0", "0.3", "--max-tokens", "4", "--dtype", ENGINE_DEFAULTS["dtype"],
         "--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "2048"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| shifted, ratio 0.3 |" in run.stdout
    records = list((tmp_path / "vllm-promptcache" / "calibration").glob("*.json"))
    assert len(records) == 1, run.stdout
    record = json.loads(records[0].read_text())
    assert record["examples"] == 5 and set(record["ratios"]) == {"0", "0.3"}
    assert record["recommended_ratio"] in (0.0, 0.3)
    assert record["full"]["agreement"] == 1.0

    # As if calibration had picked 0.5: the next engine recomputes the last half of a
    # shifted run by default, and a request's own ratio still wins.
    record["recommended_ratio"] = 0.5
    records[0].write_text(json.dumps(record))
    llm = make_llm(tiny_model, enable_prefix_caching=False,
                   **engine_kwargs(host_gb=0.02 * KV_SCALE, disk_gb=0, position_independent=True))
    try:
        modules = PromptModules(llm)
        facts = fact_qa.fact_set(2, seed=5)
        modules.register_modules({"a": facts.docs[0] * 3, "b": facts.docs[1] * 3})
        prompt = modules.compose(["b", "a", Text(" Who?")])

        def shifted():
            return settled(lambda: read_metrics(llm).get("shifted_hit_tokens_total", {})
                           .get("host", 0),
                           lambda: llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                                                SamplingParams(max_tokens=1), use_tqdm=False))

        def loaded(params):
            before = shifted()
            sp = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {
                "promptcache_save": False, **params}})
            llm.generate([prompt], sp, use_tqdm=False)
            return shifted() - before

        everything = loaded({"promptcache_recompute_ratio": 0.0})
        by_default = loaded({})
        assert everything > 100
        # The last half of the found run (which starts with tokens at their own place)
        # is prefilled: at least half of the shifted tokens are no longer loaded.
        assert 0 < by_default <= everything / 2
    finally:
        close_llm(llm)
