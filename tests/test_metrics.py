"""metrics.py: the series that exist from start-up (a fresh server's /metrics is
checked against the dashboard in test_server_start.py)."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_promptcache.config import PromptCacheConfig
from vllm_promptcache.metrics import METRICS, SKIP_REASONS, zero_series

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_promptcache"


def series(config):
    return {(name, values): value for name, values, value in zero_series(config)}


def test_every_tier_labelled_counter_starts_at_zero_for_each_configured_tier():
    host_only = series(PromptCacheConfig(disk_gb=0))
    assert host_only[("hit_tokens_total", ("host",))] == 0
    assert ("hit_tokens_total", ("disk",)) not in host_only
    assert not any(name.startswith("remote_") for name, _ in host_only)
    every = series(PromptCacheConfig(disk_gb=2, host_gb=1, remote_url="redis://h:1/0"))
    for name, (kind, label, _) in METRICS.items():
        if kind == "counter" and label is True:
            tiers = ("remote",) if name.startswith("remote_") else ("host", "disk", "remote")
            assert all(every[(name, (t,))] == 0 for t in tiers), name
        if label is False:
            assert (name, ()) in every
    assert every[("tier_capacity_bytes", ("host",))] == 1 << 30
    assert every[("tier_capacity_bytes", ("disk",))] == 2 << 30


def test_every_skip_reason_the_connector_counts_has_a_series_from_start_up():
    source = "\n".join(p.read_text() for p in (PACKAGE / "connector").glob("*.py"))
    reasons = set(re.findall(r'Unkeyable\(\s*"(\w+)"', source))
    reasons |= set(re.findall(r'_drop\([^,]+,\s*"(\w+)"', source))
    assert reasons and reasons <= set(SKIP_REASONS), reasons - set(SKIP_REASONS)


def test_a_step_that_changed_nothing_ships_no_payload(monkeypatch):
    """vLLM runs its whole stats path (to_dict, the log aggregator, every Prometheus
    series) for each step whose connector payload is not empty.  A decode step sets
    the same gauges and times one hook: it must ship nothing, and what changed must
    still ship at once."""
    from vllm_promptcache import metrics
    from vllm_promptcache.metrics import PromptCacheStats

    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    stats = PromptCacheStats()

    def step(in_use):
        stats.set("tier_bytes_in_use", in_use, tier="host")
        stats.set("tier_capacity_bytes", 1 << 30, tier="host")
        with stats.timed("build_connector_meta"):
            pass
        return stats.take()

    first = step(4096)
    assert first.data["gauge"] == {"tier_bytes_in_use|host": 4096,
                                   "tier_capacity_bytes|host": 1 << 30}
    assert step(4096) is None, "unchanged gauges and one hook timing shipped"
    changed = step(8192)
    assert changed.data["gauge"] == {"tier_bytes_in_use|host": 8192}
    # The held timings go with it: none is lost.
    assert len(changed.data["histogram"]["scheduler_seconds|build_connector_meta"]) == 2
    stats.inc("lookups_total")
    assert stats.take().data["counter"] == {"lookups_total|": 1}, "a counter ships at once"
    for _ in range(metrics.HISTOGRAM_BATCH - 1):
        assert step(8192) is None
    assert len(step(8192).data["histogram"]["scheduler_seconds|build_connector_meta"]) == \
        metrics.HISTOGRAM_BATCH
    assert step(8192) is None
    now[0] += metrics.HISTOGRAM_HOLD_S
    assert len(step(8192).data["histogram"]["scheduler_seconds|build_connector_meta"]) == 2, \
        "timings held longer than HISTOGRAM_HOLD_S"
    # A gauge set back to the value last shipped within one interval ships nothing.
    stats.set("tier_bytes_in_use", 1, tier="host")
    stats.set("tier_bytes_in_use", 8192, tier="host")
    assert stats.take() is None
