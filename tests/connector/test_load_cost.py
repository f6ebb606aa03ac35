"""Load or recompute, from injected rates: slow tiers skipped, fast ones loaded, splits at
break-even, the lookup budget, cold start, and the metrics the estimates feed."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest

from vllm_promptcache.connector.load_cost import (
    ALWAYS_LOAD, DISK, HOST, LOAD, RECOMPUTE, REMOTE, SHIFTED, SPLIT, LoadCost, PrefillRate,
    Segment, TierPrior, TransferEstimate, WaitBudgets,
)
from vllm_promptcache.metrics import PromptCacheStats, PromptCachePromMetrics

BS = 16
KV_PER_TOKEN = 128 * 1024  # Llama-3.1-8B in bf16
MB = 1 << 20


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def trained(prefill_tokens_per_s=40_000, host=50e9, disk=1.1e9, remote=None, clock=None,
            **kw) -> LoadCost:
    """A LoadCost fed exact observations: each tier at its rate (and 1 ms latency below
    host), the prefill at a flat rate with a 5 ms step overhead."""
    lc = LoadCost(clock=clock or Clock(), **kw)
    for nbytes in (8 * MB, 64 * MB, 256 * MB, 32 * MB):
        lc.observe_transfer(HOST, nbytes, nbytes / host)
        lc.observe_transfer(DISK, nbytes, 1e-3 + nbytes / disk)
        if remote:
            lc.observe_transfer(REMOTE, nbytes, 2e-3 + nbytes / remote)
    for n in (512, 2048, 4096, 1024):
        for ctx in (0, 4096, 16384):
            lc.observe_prefill(n, ctx, 5e-3 + n / prefill_tokens_per_s)
    return lc


def test_estimate_separates_latency_from_rate():
    e = TransferEstimate()
    for nbytes in (1e6, 4e6, 16e6, 2e6, 8e6):
        e.observe(nbytes, 2e-3 + nbytes / 1e9)
    assert e.rate == pytest.approx(1e9, rel=1e-6)
    assert e.latency_s == pytest.approx(2e-3, rel=1e-6)
    # The same size every time: the latency hint, the rate from the rest.
    same = TransferEstimate(latency_hint=1e-3)
    for _ in range(4):
        same.observe(10e6, 1e-3 + 10e6 / 2e9)
    assert same.rate == pytest.approx(2e9, rel=1e-6)


def test_estimate_follows_a_tier_that_slows_down():
    e = TransferEstimate(half_life=4)
    for i in range(40):
        e.observe((1 + i % 4) * 1e6, (1 + i % 4) * 1e6 / 10e9)
    for i in range(40):  # the disk is now shared: ten times slower
        e.observe((1 + i % 4) * 1e6, (1 + i % 4) * 1e6 / 1e9)
    assert e.rate == pytest.approx(1e9, rel=0.01)


def test_fast_tier_is_loaded():
    lc = trained()
    d = lc.decide([Segment(HOST, 4096)], start=0, bytes_per_token=KV_PER_TOKEN, block_size=BS)
    assert d.load_tokens == 4096 and d.basis == "measured"
    assert list(d.decisions()) == [(HOST, LOAD)]
    # 512 MB at 50 GB/s against 4096 tokens at 40k tokens/s
    assert d.load_s == pytest.approx(4096 * KV_PER_TOKEN / 50e9, rel=1e-6)
    assert d.recompute_s == pytest.approx(4096 / 40_000, rel=1e-6)


def test_slow_tier_is_skipped():
    lc = trained()  # disk 1.1 GB/s: 512 MB takes 0.49 s, recomputing 0.1 s
    d = lc.decide([Segment(DISK, 4096)], start=0, bytes_per_token=KV_PER_TOKEN, block_size=BS)
    assert d.load_tokens == 0 and not d.split
    assert list(d.decisions()) == [(DISK, RECOMPUTE)]
    # The same disk on a model whose prefill is 10x slower loads.
    slow = trained(prefill_tokens_per_s=4_000)
    assert slow.decide([Segment(DISK, 4096)], 0, KV_PER_TOKEN, BS).load_tokens == 4096


def test_split_loads_the_fast_head_and_recomputes_the_slow_rest():
    lc = trained(remote=3e9)  # remote at 3 GB/s: 4096 tokens take 0.18 s > 0.1 s
    run = [Segment(HOST, 1000), Segment(DISK, 2048), Segment(REMOTE, 1024)]
    d = lc.decide(run, start=0, bytes_per_token=KV_PER_TOKEN, block_size=BS)
    # host's 1000 tokens end inside block 62: the load stops at its start
    assert d.load_tokens == 992 and d.split
    assert list(d.decisions()) == [(HOST, SPLIT), (DISK, RECOMPUTE), (REMOTE, RECOMPUTE)]


def test_split_falls_where_recompute_becomes_dearer_than_the_load():
    # A tier whose per-token load cost lies between the prefill's cost at short and at
    # long context: recomputing the head is cheaper, but the run is a prefix, so the
    # choice is all or nothing, priced over the whole run.
    lc = LoadCost(clock=Clock())
    for nbytes in (8 * MB, 64 * MB, 16 * MB):
        lc.observe_transfer(HOST, nbytes, nbytes / 50e9)
        lc.observe_transfer(DISK, nbytes, nbytes / 2e9)
    for n in (128, 256, 192):  # each context's steps in one bucket
        lc.observe_prefill(n, 0, n / 40_000)          # 25 us per token near the start
        lc.observe_prefill(n, 60_000, n / 10_000)     # 100 us per token at 60k
    per_token_disk = KV_PER_TOKEN / 2e9 + KV_PER_TOKEN / 50e9  # ~68 us
    short = lc.decide([Segment(DISK, 1024)], 0, KV_PER_TOKEN, BS)
    assert short.load_tokens == 0
    long = lc.decide([Segment(DISK, 1024)], 60_000, KV_PER_TOKEN, BS)
    assert long.load_tokens == 1024
    assert long.load_s == pytest.approx(1024 * per_token_disk, rel=1e-3)
    # A host head then a disk run that crosses from cheap to dear context: the
    # boundaries it tries hold the optimum of every block-aligned split.
    run = [Segment(HOST, 512), Segment(DISK, 65_000)]
    d = lc.decide(run, 0, KV_PER_TOKEN, BS)
    chosen = lc._load_seconds(run, d.load_tokens, KV_PER_TOKEN) + lc.recompute_seconds(
        d.load_tokens, d.total_tokens - d.load_tokens)
    for k in range(0, d.total_tokens + 1, 512):
        other = lc._load_seconds(run, k, KV_PER_TOKEN) + lc.recompute_seconds(
            k, d.total_tokens - k)
        assert chosen <= other + 1e-9


def test_tie_recomputes_and_partial_tails_only_whole():
    lc = trained(prefill_tokens_per_s=40_000, host=50e9)
    # host per token 2.6 us < 25 us: a run ending inside a block is loaded whole
    d = lc.decide([Segment(HOST, 40)], start=32, bytes_per_token=KV_PER_TOKEN, block_size=BS)
    assert d.load_tokens == 40
    # A shifted run priced at exactly its recompute time is recomputed.
    tie = LoadCost(clock=Clock(), priors={SHIFTED: TierPrior(KV_PER_TOKEN * 40_000, 0.0)},
                   prefill_prior_tokens_per_s=40_000)
    assert tie.decide([Segment(SHIFTED, 4096)], 0, KV_PER_TOKEN, BS).basis == "probe"
    assert tie.decide([Segment(SHIFTED, 4096)], 0, KV_PER_TOKEN, BS).load_tokens == 0


def test_cold_start_loads_everything_then_trusts_priors():
    lc = LoadCost(clock=Clock())
    assert lc.basis()["prefill"].startswith("unmeasured")
    d = lc.decide([Segment(DISK, 4096)], 0, KV_PER_TOKEN, BS)
    assert d.load_tokens == 4096 and d.basis == "cold"
    for n in (512, 2048, 4096):
        lc.observe_prefill(n, 0, n / 40_000)
    # The prefill is measured, the disk is not: its prior (one NVMe stream) prices it,
    # after one probe (the prior may be wrong, and only a load measures the tier).
    assert lc.basis()[DISK] == "prior" and lc.basis()[HOST] == "always"
    run = [Segment(HOST, 1024), Segment(DISK, 4096)]
    assert lc.decide(run, 0, KV_PER_TOKEN, BS).basis == "probe"
    d = lc.decide(run, 0, KV_PER_TOKEN, BS)
    assert (d.load_tokens, d.basis) == (1024, "prior")
    # An operator's prior for a fast disk array wins over the default.
    fast = LoadCost(clock=Clock(), priors={DISK: TierPrior(20e9, 1e-4)},
                    prefill_prior_tokens_per_s=40_000)
    d = fast.decide([Segment(DISK, 4096)], 0, KV_PER_TOKEN, BS)
    assert (d.load_tokens, d.basis) == (4096, "prior")


def test_always_load_mode_is_pinned():
    lc = trained(mode=ALWAYS_LOAD)
    d = lc.decide([Segment(DISK, 4096)], 0, KV_PER_TOKEN, BS)
    assert d.load_tokens == 4096 and d.basis == ALWAYS_LOAD
    assert lc.lookup_budget_s(0, 4096) == math.inf
    with pytest.raises(ValueError, match="always-load"):
        LoadCost(mode="sometimes")


def test_a_priced_out_tier_is_probed_once_per_interval():
    clock = Clock()
    lc = trained(clock=clock)
    run = [Segment(DISK, 4096)]
    assert lc.decide(run, 0, KV_PER_TOKEN, BS).load_tokens == 0
    # A fast host run is never a probe: only tiers the decision would recompute are.
    clock.t += 61
    assert lc.decide([Segment(HOST, 4096)], 0, KV_PER_TOKEN, BS).basis == "measured"
    clock.t += 61  # no disk transfer for a minute: its estimate may be stale
    probe = lc.decide(run, 0, KV_PER_TOKEN, BS)
    assert (probe.load_tokens, probe.basis) == (4096, "probe")
    assert lc.decide(run, 0, KV_PER_TOKEN, BS).load_tokens == 0, "one probe, not every request"


def test_a_tier_priced_out_of_a_run_stays_findable_while_a_probe_is_due():
    """`priced_out` (a tier neither asked about a run nor written with it) holds only on
    measured numbers, and not while the tier is due to be measured again."""
    clock = Clock()
    lc = trained(clock=clock)  # disk at 1.1 GB/s, prefill at 40k tokens/s (8B KV)
    assert lc.priced_out(DISK, 0, 4096, KV_PER_TOKEN)
    assert not lc.priced_out(HOST, 0, 4096, KV_PER_TOKEN), "a host load beats recomputing"
    assert not trained(clock=clock, mode=ALWAYS_LOAD).priced_out(DISK, 0, 4096, KV_PER_TOKEN)
    assert not LoadCost(clock=clock).priced_out(DISK, 0, 4096, KV_PER_TOKEN), "priors only"
    assert not lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN), "never measured"
    fast = trained(clock=clock, disk=200e9)
    assert not fast.priced_out(DISK, 0, 4096, KV_PER_TOKEN)
    clock.t += 61  # no disk transfer for a minute: a probe is due, the run is written
    assert not lc.priced_out(DISK, 0, 4096, KV_PER_TOKEN)
    assert lc.decide([Segment(DISK, 4096)], 0, KV_PER_TOKEN, BS).basis == "probe"
    assert lc.priced_out(DISK, 0, 4096, KV_PER_TOKEN), "probed: priced out for an interval"


def test_lookup_budget_is_the_recompute_time_and_expires():
    lc = trained()
    budget = lc.lookup_budget_s(0, 4096)
    assert budget == pytest.approx(4096 / 40_000, rel=1e-6)
    assert LoadCost(clock=Clock()).lookup_budget_s(0, 4096) == math.inf, "unmeasured: wait"
    clock = Clock()
    waits = WaitBudgets(clock)
    waits.start("r", budget)
    clock.t += 0.05
    waits.start("r", budget)  # asked again: the first start counts
    assert not waits.expired("r") and waits.waited_s("r") == pytest.approx(0.05)
    clock.t += 0.06
    assert waits.expired("r")
    waits.forget("r")
    assert not waits.expired("r") and len(waits) == 0


def test_prefill_rate_per_context_bucket():
    p = PrefillRate(min_samples=2)
    for n in (256, 512, 1024):
        p.observe(n, 0, 1e-3 + n * 20e-6)
        p.observe(n, 30_000, 1e-3 + n * 80e-6)
    # The fixed step cost is not part of a token's marginal cost.
    assert p.seconds(0, 100) == pytest.approx(100 * 20e-6, rel=1e-6)
    assert p.seconds(30_000, 30_100) == pytest.approx(100 * 80e-6, rel=1e-6)
    # A bucket never measured takes its nearest measured neighbour's cost.
    assert p.seconds(2000, 2100) == pytest.approx(100 * 20e-6, rel=1e-6)
    assert p.seconds(60_000, 60_100) == pytest.approx(100 * 80e-6, rel=1e-6)


def test_decision_time_does_not_grow_with_the_run():
    lc = trained()
    calls = []
    real = lc._load_seconds
    lc._load_seconds = lambda *a: calls.append(1) or real(*a)
    lc.decide([Segment(HOST, 1 << 20), Segment(DISK, 1 << 20)], 0, KV_PER_TOKEN, BS)
    assert len(calls) <= 2 + len(lc.prefill.edges) + 1


def test_exported_metrics_reach_prometheus():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    lc = trained()
    lc.count(lc.decide([Segment(HOST, 1000), Segment(DISK, 4096)], 0, KV_PER_TOKEN, BS))
    stats = PromptCacheStats()
    lc.export(stats)
    with stats.timed("build_connector_meta"):
        pass
    data = stats.data
    assert data["gauge"]["tier_load_bytes_per_second|disk"] == pytest.approx(1.1e9, rel=1e-6)
    assert data["gauge"]["prefill_tokens_per_second|"] > 0
    assert data["counter"]["load_decisions_total|host,split"] == 1
    assert data["counter"]["load_decisions_total|disk,recompute"] == 1
    assert len(data["histogram"]["scheduler_seconds|build_connector_meta"]) == 1
    lc.export(stats)
    assert stats.data["counter"]["load_decisions_total|disk,recompute"] == 1, "counted once"

    reg = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=reg) for cls in (Gauge, Counter, Histogram)}
    prom = PromptCachePromMetrics(SimpleNamespace(kv_transfer_config=None), types,
                                  ["engine"], {0: ["0"]})
    merged = PromptCacheStats().aggregate(stats)
    prom.observe(merged.data)
    get = reg.get_sample_value
    assert get("vllm:promptcache_load_decisions_total",
               {"engine": "0", "tier": "disk", "decision": "recompute"}) == 1
    assert get("vllm:promptcache_tier_load_bytes_per_second",
               {"engine": "0", "tier": "disk"}) == pytest.approx(1.1e9, rel=1e-6)
    assert get("vllm:promptcache_scheduler_seconds_count",
               {"engine": "0", "hook": "build_connector_meta"}) == 1


def test_histogram_payload_is_bounded():
    from vllm_promptcache.metrics import HISTOGRAM_CAP

    stats = PromptCacheStats()
    for _ in range(HISTOGRAM_CAP + 10):
        stats.observe("scheduler_seconds", 1e-5, tier="request_finished")
    assert len(stats.data["histogram"]["scheduler_seconds|request_finished"]) == HISTOGRAM_CAP


def test_a_lookups_round_trip_prices_a_tier_before_any_load_was_measured():
    """A remote store 40 ms away: its lookups say so long before three loads were
    timed, and a run it holds is recomputed where prefill is faster than that."""
    from vllm_promptcache.connector.load_cost import LoadCost, Segment

    cost = LoadCost()
    for n in (64, 128, 256, 512):
        cost.observe_prefill(n, 0, n / 20000.0)  # 20k tokens/s: 128 tokens in 6.4 ms
    fresh = cost.decide([Segment("remote", 128)], 0, 1024, 16)
    assert fresh.load_tokens == 128  # the prior: a 25 Gb/s link 1 ms away
    for seconds in (0.040, 0.041, 0.039):
        cost.observe_round_trip("remote", seconds)
    assert cost.tier_seconds("remote", 128 * 1024) > 0.039
    first = cost.decide([Segment("remote", 128)], 0, 1024, 16)
    assert first.load_tokens == 128 and first.basis == "probe"  # its rate, measured once
    assert cost.decide([Segment("remote", 128)], 0, 1024, 16).load_tokens == 0
    assert cost.tier_seconds("host", 128 * 1024) == 0.0  # host loads until measured


def test_the_steps_a_promotion_spans_are_part_of_a_loads_cost():
    """A run below host is promoted into host first, and loads in the step after the
    promotion is reported: that wait, measured past the read, makes a 20 ms read of a
    run that recomputes in 30 ms a loss.  A read short enough to be made in the loading
    step itself (a direct read) does not wait it."""
    from vllm_promptcache.connector.load_cost import LoadCost, Segment

    cost = LoadCost()
    for n in (64, 128, 256, 512):
        cost.observe_prefill(n, 0, n * 30e-3 / 128)  # 128 tokens: 30 ms
    for kb in (64, 128, 256):  # 20 ms for 128 tokens of 1 KiB; 2 ms for 16 of them
        cost.observe_transfer("remote", kb * 1024, kb * 1024 * 20e-3 / (128 * 1024))
        cost.observe_transfer("disk", kb * 1024, kb * 1024 * 20e-3 / (128 * 1024))
    assert cost.decide([Segment("remote", 128)], 0, 1024, 16).load_tokens == 128
    for _ in range(4):
        cost.observe_promotion_wait(0.015)
    assert abs(cost.promotion_wait_s - 0.015) < 1e-9
    assert cost.decide([Segment("remote", 128)], 0, 1024, 16).load_tokens == 0
    assert cost.priced_out("remote", 0, 128, 1024)
    assert cost.load_seconds("remote", 128, 1024) > cost.tier_seconds("remote", 128 * 1024)
    # 16 tokens from disk read in 2.5 ms: where disk reads are direct (made within 5 ms
    # in the loading step), no promotion wait; else it waits the steps like the rest.
    assert cost.load_seconds("disk", 16, 1024) > 0.015
    cost.direct_tiers, cost.direct_read_max_s = frozenset({"disk"}), 0.005
    assert cost.load_seconds("disk", 16, 1024) < 0.005
    assert cost.load_seconds("disk", 128, 1024) > 0.015, "too long a read for a direct one"
    assert cost.load_seconds("remote", 16, 1024) > 0.015, "the remote tier is never read direct"
    # One rule, which secondary.py's direct reads ask too; a run that spans disk and
    # remote is promoted, however short its disk part.
    assert cost.direct_read("disk", 16 * 1024) and not cost.direct_read("disk", 128 * 1024)
    assert not cost.direct_read("remote", 16 * 1024)
    assert cost._load_seconds([Segment("disk", 8), Segment("remote", 8)], 16, 1024) > 0.015


def test_a_tier_never_measured_gets_one_write_per_probe_interval_not_every_run():
    """A store whose round trip alone outlasts recomputing, and which this engine never
    found a run in (so it was never probed), is still asked about every run: a found run
    would be the probe.  But it is written with one run per probe interval, enough for a
    probe to find, where before it was written with every run (measured in the
    two-server bench: one server wrote 7.9 MB to a 40 ms store that no load came from)."""
    clock = Clock()
    lc = trained(clock=clock)
    for _ in range(4):
        lc.observe_round_trip(REMOTE, 0.5)  # slower than recomputing 4096 tokens
    assert not lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN), "asked: a probe is due"
    assert not lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN, write=True), "one run written"
    assert lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN, write=True), "not the next"
    assert not lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN), "still asked"
    clock.t += 61
    assert not lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN, write=True), "one per interval"
    assert lc.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN, write=True)
    # A tier that loads faster than recomputing is written with every run.
    fast = trained(clock=clock, remote=200e9)
    assert all(not fast.priced_out(REMOTE, 0, 4096, KV_PER_TOKEN, write=True) for _ in range(3))
