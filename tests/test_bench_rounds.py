"""The conversation benches' --rounds: cases interleaved, every round on a fresh engine,
and one result per case that pools the rounds' requests (the percentiles a ratio rests
on) and sums their counters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import multi_turn  # noqa: E402


def test_rounds_interleave_the_cases_and_label_each_phase():
    ran, phases = [], []
    out = common.run_rounds(["a", "b"], 3, lambda c, r: ran.append((c, r)) or {"c": c, "r": r},
                            phases.append)
    assert ran == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert phases == ["a#0", "b#0", "a#1", "b#1", "a#2", "b#2"]
    assert [r["r"] for r in out["b"]] == [0, 1, 2]
    one = []
    common.run_rounds(["a"], 1, lambda c, r: {}, one.append)
    assert one == ["a"], "a single round keeps the case's own phase label"


def test_counters_sum_and_gauges_keep_the_last_round():
    summed = common.sum_counters(
        [{"hits": {"host": 2, "disk": 1}, "rate": {"host": 5.0}, "n": 1, "name": "x"},
         {"hits": {"host": 3}, "rate": {"host": 7.0}, "n": 2, "name": "y"}],
        last=frozenset({"rate"}))
    assert summed == {"hits": {"host": 5, "disk": 1}, "rate": {"host": 7.0}, "n": 3,
                      "name": "y"}


def record(conv, turn, ttft, prompt=300):
    return {"conversation": conv, "turn": turn, "prompt_tokens": prompt, "answer_tokens": 20,
            "cached_tokens": 0, "ttft_s": ttft, "scheduled_ts": 0.0, "first_token_ts": ttft}


def test_pooled_percentiles_rest_on_every_rounds_requests():
    rounds = []
    for rnd, ttfts in enumerate(([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8])):
        recs = [record(c, t, ttfts[2 * c + t]) for c in range(2) for t in range(2)]
        r = multi_turn.summarize("host", recs, 10.0, {
            "hit_tokens_total": {"host": 100 * (rnd + 1)},
            "tier_bytes_in_use": {"host": 10 * (rnd + 1)}})
        rounds.append({**r, "engine_threads": [{"affinity": [1]}], "host_gb": 0.1})
    pooled = multi_turn.pool_rounds("host", rounds, conversations=2)
    assert pooled["requests"] == 8 and pooled["wall_s"] == 20.0
    assert pooled["ttft_p50_s"] == pytest.approx(0.45)  # the median of all eight
    assert pooled["ttft_later_turns_p50_s"] == pytest.approx(0.5)  # 0.2 0.4 0.6 0.8
    # Round 1's conversations are new conversations, not later turns of round 0's.
    assert sorted({r["conversation"] for r in pooled["records"]}) == [0, 1, 2, 3]
    assert pooled["prefill_tokens_minimum"] == 2 * rounds[0]["prefill_tokens_minimum"]
    assert pooled["plugin_metrics"] == {"hit_tokens_total": {"host": 300},
                                        "tier_bytes_in_use": {"host": 20}}
    assert [r["ttft_p50_s"] for r in pooled["rounds"]] == [
        rounds[0]["ttft_p50_s"], rounds[1]["ttft_p50_s"]]
    assert pooled["host_gb"] == 0.1
    assert multi_turn.pool_rounds("host", rounds[:1], 2) is rounds[0]
