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
