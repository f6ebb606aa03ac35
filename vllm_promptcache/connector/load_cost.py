"""Load or recompute: what a stored run costs to load against what it costs to prefill.

A cache hit is only worth loading while the load is faster than vLLM recomputing the
same tokens.  On a CPU prefill is slow and every tier wins; on a GPU an NVMe stream or a
remote store can be several times slower than recomputing (an 8B model's 4k-token
history: 0.46 s from one disk stream, 0.1-0.15 s to prefill on an H100).  This module
keeps the two sides' running estimates and picks, per lookup, how many leading tokens
of a found run to load; vLLM computes the rest.

- `TransferEstimate`: seconds = latency + bytes / rate, fitted by exponentially
  weighted least squares from a tier's own transfers (tier name, bytes, seconds).
- `PrefillRate`: vLLM's marginal seconds per prefilled token, per context-length bucket
  (attention makes a token at 32k dearer than one at 1k), from steps' timings
  (new tokens, context length, seconds).  The marginal cost is the fit's slope: a
  step's fixed cost is paid whether or not it recomputes a run.
- `LoadCost.decide`: a run is a list of `Segment`s in load order (e.g. a head in host,
  then disk, then remote; shifted tokens are a segment of tier "shifted").  Loading
  the first k tokens costs each touched tier's latency plus its bytes over its rate
  (a tier below host is staged through host: its bytes pay host's rate too);
  recomputing tokens k..N costs their per-token prefill time at their positions.
  Both sides are linear between segment and bucket boundaries, so the cheapest k is
  one of those boundaries (rounded down to a block): the decision costs O(segments +
  buckets), whatever the run's length.  A tie recomputes: a load must be faster.
- A tier below host is staged through host: a promotion is sent with one engine step
  and reported at the end of the step it lands in, and the request loads in the step
  after.  That wait past the read (`observe_promotion_wait`, measured on every
  promotion) is part of the load's cost, except for a read short enough to be made in
  the loading step itself (`direct_tiers`, `direct_read_max_s`).
- Cold start: a tier with fewer than `min_samples` transfers uses its prior
  (`TierPrior`; the defaults: host and shifted loads always load, disk and remote
  priced at one NVMe stream / a 25 Gb/s link); while the prefill rate is unmeasured
  and has no prior, everything loads (the behaviour before this module).
  `LoadDecision.basis` and `LoadCost.basis()` say which numbers a decision used.
- A tier whose estimate (or prior) says "recompute" would never be measured again; one
  run that would recompute it is loaded whole every `probe_interval_s` per tier
  (decision basis "probe").  Transfers off the critical path (a queued request's
  prefetch) measure a tier too, at no request's cost: feed them to observe_transfer.
- `priced_out`: a tier measured as slower than recomputing a whole run is not asked
  about it, nor written with it (secondary.py): the round trip and the write would
  only compete with the engine for the machine.  A probe due keeps it asked, and
  written with one run per probe interval, for the probe to find.
- `mode=ALWAYS_LOAD` pins every decision to loading (benchmarks, tiers an operator
  knows are fast); the estimates are still kept and exported.
- `lookup_budget_s`: how long a remote lookup (or a promotion) may be waited for
  before recomputing instead: the expected recompute time of what it would bring.
  `WaitBudgets` remembers when each request began waiting.

Everything here is plain Python on the scheduler thread: no tensors, no I/O, and
nothing that grows with the number of stored blocks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

MEASURED, ALWAYS_LOAD = "measured", "always-load"
MODES = (MEASURED, ALWAYS_LOAD)
LOAD, RECOMPUTE, SPLIT = "load", "recompute", "split"
HOST, DISK, REMOTE, SHIFTED = "host", "disk", "remote", "shifted"


@dataclass(frozen=True)
class TierPrior:
    """What a tier is assumed to cost before it is measured; bytes_per_s None: free
    (always load until measured)."""

    bytes_per_s: float | None = None
    latency_s: float = 0.0


# One O_DIRECT NVMe stream and a 25 Gb/s link (shared/gpu/README.md, issue 31); host
# and shifted loads are a memory copy and load until measured.
DEFAULT_PRIORS: dict[str, TierPrior] = {
    HOST: TierPrior(None),
    SHIFTED: TierPrior(None),
    DISK: TierPrior(1.1e9, 0.5e-3),
    REMOTE: TierPrior(2.5e9, 1e-3),
}
# Tiers whose blocks reach vLLM through host slots (a promotion, then a host load).
STAGED_THROUGH_HOST = frozenset({DISK, REMOTE})


class TransferEstimate:
    """seconds = latency_s + x / rate, fitted from (x, seconds) observations with
    exponential forgetting (half of the weight is in the last `half_life`).

    With too little spread in x to separate latency from rate, the latency is taken
    as `latency_hint` (at most half the mean time) and the rate from the rest.
    """

    def __init__(self, half_life: float = 16.0, latency_hint: float = 0.0):
        self._decay = 0.5 ** (1.0 / half_life)
        self.latency_hint = latency_hint
        self.n = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._fit: tuple[float, float] | None = None  # (latency, seconds per x)

    def observe(self, x: float, seconds: float) -> None:
        if x <= 0 or seconds < 0 or not math.isfinite(seconds):
            return
        d = self._decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + seconds
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * seconds
        self.n += 1
        self._fit = None

    def _solve(self) -> tuple[float, float]:
        if self._fit is None:
            mx, my = self._x / self._w, self._y / self._w
            var = self._xx / self._w - mx * mx
            slope = intercept = -1.0
            if var > (0.05 * mx) ** 2:
                slope = (self._xy / self._w - mx * my) / var
                intercept = my - slope * mx
            if slope <= 0 or intercept < 0:
                intercept = min(self.latency_hint, 0.5 * my)
                slope = (my - intercept) / mx
            self._fit = (intercept, max(slope, 1e-15))
        return self._fit

    @property
    def latency_s(self) -> float:
        return self._solve()[0]

    @property
    def seconds_per_unit(self) -> float:
        return self._solve()[1]

    @property
    def rate(self) -> float:
        """x per second (bytes/s for a tier, tokens/s for prefill)."""
        return 1.0 / self.seconds_per_unit

    def seconds(self, x: float) -> float:
        latency, per = self._solve()
        return latency + x * per


# Context-length buckets of the prefill estimate: [0, 512), [512, 1k), ..., [64k, 128k),
# [128k, inf).  Powers of two: attention's share of a token's cost grows with context.
BUCKET_EDGES: tuple[int, ...] = (0,) + tuple(512 << i for i in range(9))


def bucket_of(position: int, edges: Sequence[int] = BUCKET_EDGES) -> int:
    i = 0
    while i + 1 < len(edges) and position >= edges[i + 1]:
        i += 1
    return i


class PrefillRate:
    """vLLM's marginal prefill cost per token, by context length."""

    def __init__(self, min_samples: int = 3, half_life: float = 32.0,
                 prior_tokens_per_s: float | None = None,
                 edges: Sequence[int] = BUCKET_EDGES):
        self.edges = tuple(edges)
        self.min_samples = min_samples
        self.prior_tokens_per_s = prior_tokens_per_s
        self._buckets = [TransferEstimate(half_life) for _ in self.edges]
        self.overall = TransferEstimate(half_life)

    def observe(self, num_new_tokens: int, context_len: int, seconds: float) -> None:
        """One prefill of `num_new_tokens` after `context_len` tokens took `seconds`."""
        if num_new_tokens <= 0:
            return
        self._buckets[bucket_of(context_len + num_new_tokens // 2, self.edges)].observe(
            num_new_tokens, seconds)
        self.overall.observe(num_new_tokens, seconds)

    @property
    def measured(self) -> bool:
        return self.overall.n >= self.min_samples

    @property
    def known(self) -> bool:
        return self.measured or self.prior_tokens_per_s is not None

    def tokens_per_second(self) -> float | None:
        if self.measured:
            return self.overall.rate
        return self.prior_tokens_per_s

    def _per_token(self, bucket: int) -> float:
        """Seconds per token in `bucket`: its own fit, else the nearest measured bucket's,
        else the overall fit, else the prior."""
        for dist in range(len(self._buckets)):
            for b in (bucket - dist, bucket + dist):
                if 0 <= b < len(self._buckets) and self._buckets[b].n >= self.min_samples:
                    return self._buckets[b].seconds_per_unit
        if self.measured:
            return self.overall.seconds_per_unit
        return 1.0 / self.prior_tokens_per_s if self.prior_tokens_per_s else 0.0

    def seconds(self, start: int, end: int) -> float:
        """Expected time to prefill positions [start, end)."""
        total = 0.0
        b = bucket_of(start, self.edges)
        pos = start
        while pos < end:
            hi = self.edges[b + 1] if b + 1 < len(self.edges) else end
            hi = min(hi, end)
            total += (hi - pos) * self._per_token(b)
            pos, b = hi, b + 1
        return total


@dataclass(frozen=True)
class Segment:
    """`tokens` consecutive tokens of a found run that sit in `tier`."""

    tier: str
    tokens: int


@dataclass(frozen=True)
class LoadDecision:
    load_tokens: int        # leading tokens of the run to load; vLLM computes the rest
    total_tokens: int       # the run's length
    per_tier: tuple[tuple[str, int, int], ...]  # (tier, tokens loaded, tokens recomputed)
    load_s: float           # expected time of the chosen load
    recompute_s: float      # expected time to recompute the whole run instead
    basis: str              # "measured", "prior", "cold", "probe" or ALWAYS_LOAD
    load_all_s: float = 0.0  # expected time to load the whole run instead

    @property
    def split(self) -> bool:
        return 0 < self.load_tokens < self.total_tokens

    def decisions(self) -> Iterable[tuple[str, str]]:
        """(tier, LOAD | RECOMPUTE | SPLIT) per tier of the run."""
        for tier, loaded, recomputed in self.per_tier:
            yield tier, (SPLIT if loaded and recomputed else LOAD if loaded else RECOMPUTE)


@dataclass
class _Tier:
    estimate: TransferEstimate
    prior: TierPrior
    last_observed: float = -math.inf
    last_probe: float = -math.inf
    last_probe_write: float = -math.inf  # priced_out(write=True) let a run through for probes
    round_trip_s: float | None = None  # an EWMA of round trips that moved no KV (lookups)


@dataclass
class LoadCost:
    """The running estimates and the load-or-recompute decision (see the module doc)."""

    mode: str = MEASURED
    priors: dict[str, TierPrior] = field(default_factory=lambda: dict(DEFAULT_PRIORS))
    prefill_prior_tokens_per_s: float | None = None
    min_samples: int = 3
    probe_interval_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    # Tiers whose short reads are made in the step that loads them (secondary.py's
    # direct reads; empty where vLLM does not recompute a failed load), and how short.
    direct_tiers: frozenset[str] = frozenset()
    direct_read_max_s: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"load-cost mode must be one of {MODES}, got {self.mode!r}")
        self._tiers: dict[str, _Tier] = {}
        self._promotion_wait_s: float | None = None  # an EWMA (observe_promotion_wait)
        self.prefill = PrefillRate(self.min_samples,
                                   prior_tokens_per_s=self.prefill_prior_tokens_per_s)
        self._decisions: dict[tuple[str, str], int] = {}

    # -- observations ------------------------------------------------------------
    def _tier(self, name: str) -> _Tier:
        t = self._tiers.get(name)
        if t is None:
            prior = self.priors.get(name, TierPrior(None))
            t = self._tiers[name] = _Tier(TransferEstimate(latency_hint=prior.latency_s), prior)
        return t

    def observe_transfer(self, tier: str, nbytes: int, seconds: float) -> None:
        """A load from `tier` (host -> GPU; disk or remote -> host; "shifted": host ->
        GPU with the rotation) moved `nbytes` in `seconds`, on one worker."""
        t = self._tier(tier)
        t.estimate.observe(nbytes, seconds)
        t.last_observed = self.clock()

    def observe_round_trip(self, tier: str, seconds: float) -> None:
        """A call to `tier` that moved no KV (a remote lookup) took `seconds`: its fixed
        latency, which a load pays too; measured on every lookup, long before enough
        loads were."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        t = self._tier(tier)
        t.round_trip_s = _ewma(t.round_trip_s, seconds)

    def observe_promotion_wait(self, seconds: float) -> None:
        """A promotion was reported `seconds` after its read itself would have let it:
        from the step that issued it to the scheduler seeing it done, less the read's own
        time.  That is the engine steps it spans (it is sent with a step, reported at the
        end of the step it lands in), which a request waiting for it waits too, on top
        of the read: a 40 ms read in a pipeline of 15 ms steps keeps it about 70 ms."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        self._promotion_wait_s = _ewma(self._promotion_wait_s, seconds)

    @property
    def promotion_wait_s(self) -> float:
        """The expected wait of a promotion past its read (0 until one was measured)."""
        return self._promotion_wait_s or 0.0

    def observe_prefill(self, num_new_tokens: int, context_len: int, seconds: float) -> None:
        """A step computed `num_new_tokens` tokens that follow `context_len` tokens
        already in context (the position of the first new one, not of the last) in
        `seconds`.  Filed under the context of their middle token."""
        self.prefill.observe(num_new_tokens, context_len, seconds)

    # -- estimates -----------------------------------------------------------------
    def tier_basis(self, tier: str) -> str:
        t = self._tier(tier)
        if t.estimate.n >= self.min_samples:
            return "measured"
        return "prior" if t.prior.bytes_per_s is not None else "always"

    def basis(self) -> dict[str, str]:
        """Which numbers each known tier and the prefill are priced with."""
        out = {name: self.tier_basis(name) for name in sorted(set(self._tiers) | set(self.priors))}
        out["prefill"] = ("measured" if self.prefill.measured
                          else "prior" if self.prefill.known else "unmeasured: every run loads")
        return out

    def tier_seconds(self, tier: str, nbytes: float) -> float:
        """Expected time to bring `nbytes` of `tier` into vLLM's cache (its staging
        through host included); 0 for a tier that loads until measured."""
        if nbytes <= 0:
            return 0.0
        t = self._tier(tier)
        if t.estimate.n >= self.min_samples:
            own, latency = t.estimate.seconds(nbytes), t.estimate.latency_s
        elif t.prior.bytes_per_s is not None:
            own, latency = t.prior.latency_s + nbytes / t.prior.bytes_per_s, t.prior.latency_s
        else:
            own = latency = 0.0
        if t.round_trip_s is not None and (own or t.prior.bytes_per_s is not None):
            # A fetch is at least one round trip, however fast the link looked.
            own += max(0.0, t.round_trip_s - latency)
        if tier in STAGED_THROUGH_HOST:
            host = self._tier(HOST)
            if host.estimate.n >= self.min_samples:
                own += nbytes * host.estimate.seconds_per_unit
        return own

    def round_trip_s(self, tier: str) -> float | None:
        """The tier's measured round trip (a lookup that moved no KV), if any."""
        t = self._tiers.get(tier)
        return None if t is None else t.round_trip_s

    def bytes_per_second(self, tier: str) -> float | None:
        t = self._tier(tier)
        if t.estimate.n >= self.min_samples:
            return t.estimate.rate
        return t.prior.bytes_per_s

    def recompute_seconds(self, start: int, tokens: int) -> float:
        """Expected time for vLLM to prefill `tokens` tokens from position `start`."""
        return self.prefill.seconds(start, start + tokens)

    def lookup_budget_s(self, start: int, tokens: int) -> float:
        """How long a lookup (or promotion) that would bring `tokens` tokens from
        position `start` may be waited for: past this, recomputing is faster.
        Infinite while the prefill is unknown, or in ALWAYS_LOAD mode (wait, as before)."""
        if self.mode == ALWAYS_LOAD or not self.prefill.known:
            return math.inf
        return self.recompute_seconds(start, tokens)

    def priced_out(self, tier: str, start: int, tokens: int, bytes_per_token: float,
                   write: bool = False) -> bool:
        """Whether loading `tokens` tokens from `tier` at position `start` is measured
        as slower than recomputing them, with no probe of the tier due: then asking the
        tier about them, or writing them to it (`write`), costs the machine work that no
        load will repay.  False wherever the answer rests on a guess (ALWAYS_LOAD, the
        prefill or the tier not measured yet) or the tier is due to be measured again.
        A probe needs a run to find, not every run: while a probe is due, one write per
        `probe_interval_s` goes through, and the rest are priced as if none were due
        (an engine that never found a run in a slow store wrote every run to it)."""
        if self.mode == ALWAYS_LOAD or not self.prefill.measured or tokens <= 0:
            return False
        t = self._tiers.get(tier)
        if t is None or (t.estimate.n < self.min_samples and t.round_trip_s is None):
            return False
        slower = (self.load_seconds(tier, tokens, bytes_per_token)
                  >= self.recompute_seconds(start, tokens))
        now = self.clock()
        if not (slower and self._probe_due(t, now)):
            return slower
        if not write:
            return False  # the next run found there is a probe: keep asking
        if now - t.last_probe_write > self.probe_interval_s:
            t.last_probe_write = now  # something for the probe to find
            return False
        return True

    def direct_read(self, tier: str, nbytes: float) -> bool:
        """Whether `nbytes` from `tier` are read in the step that loads them (a direct
        read: the tier is in `direct_tiers` and the read is expected within
        `direct_read_max_s`), so a load of them waits no promotion's steps."""
        return tier in self.direct_tiers and self.tier_seconds(tier, nbytes) <= self.direct_read_max_s

    def load_seconds(self, tier: str, tokens: int, bytes_per_token: float) -> float:
        """Expected time until `tokens` tokens found in `tier` can be loaded: the read,
        and for a tier staged through host, the engine steps a promotion spans (unless
        the read is short enough to be made in the loading step itself)."""
        return self._load_seconds([Segment(tier, tokens)], tokens, bytes_per_token)

    # -- the decision --------------------------------------------------------------
    def decide(self, segments: Sequence[Segment], start: int, bytes_per_token: float,
               block_size: int) -> LoadDecision:
        """How many leading tokens of the run `segments` (starting at position `start`)
        to load.  A partial load ends on a block boundary (start + k a multiple of
        `block_size`); `bytes_per_token` is one worker's KV bytes per token."""
        segs = [s for s in segments if s.tokens > 0]
        total = sum(s.tokens for s in segs)
        recompute_all = self.recompute_seconds(start, total) if self.prefill.known else math.inf
        if self.mode == ALWAYS_LOAD or not self.prefill.known or not segs:
            basis = ALWAYS_LOAD if self.mode == ALWAYS_LOAD else "cold"
            return self._decision(segs, total, start, bytes_per_token, recompute_all, basis)
        best_k, best_cost = 0, recompute_all
        for k in self._candidates(segs, start, total, block_size):
            cost = (self._load_seconds(segs, k, bytes_per_token)
                    + self.recompute_seconds(start + k, total - k))
            if cost < best_cost:
                best_k, best_cost = k, cost
        if best_k < total and self._probe(segs, best_k):
            return self._decision(segs, total, start, bytes_per_token, recompute_all, "probe")
        basis = "measured" if self.prefill.measured and all(
            self.tier_basis(s.tier) == "measured" for s in segs) else "prior"
        return self._decision(segs, best_k, start, bytes_per_token, recompute_all, basis,
                              total=total)

    def _probe(self, segs: list[Segment], k: int) -> bool:
        """Whether to load the whole run once, to measure a tier it would recompute:
        one never measured (priced by its prior, which may be wrong) or not measured
        for probe_interval_s (it may have become faster).  At most once per interval
        per tier, or a tier priced out would never be measured again."""
        now = self.clock()
        pos = 0
        for s in segs:
            pos += s.tokens
            if pos <= k:
                continue
            t = self._tier(s.tier)
            if self._probe_due(t, now):
                t.last_probe = now
                return True
        return False

    def _probe_due(self, t: _Tier, now: float) -> bool:
        """The tier was never measured, or not for probe_interval_s, and no probe of it
        was made in that interval."""
        return ((t.estimate.n < self.min_samples or now - t.last_observed > self.probe_interval_s)
                and now - t.last_probe > self.probe_interval_s)

    def _candidates(self, segs: list[Segment], start: int, total: int,
                    block_size: int) -> Iterable[int]:
        # Segment ends: the full run (its last block may be partial) and each
        # boundary rounded down to a block.  Bucket edges inside the run likewise.
        points = {total}
        pos = 0
        for s in segs[:-1]:
            pos += s.tokens
            points.add(pos)
        for edge in self.prefill.edges:
            if start < edge < start + total:
                points.add(edge - start)
        for p in points:
            k = p if p == total else ((start + p) // block_size) * block_size - start
            if 0 < k <= total:
                yield k

    def _load_seconds(self, segs: list[Segment], k: int, bytes_per_token: float) -> float:
        seconds, left = 0.0, k
        staged: dict[str, float] = {}  # tier staged through host -> its bytes
        for s in segs:
            if left <= 0:
                break
            n = min(left, s.tokens)
            seconds += self.tier_seconds(s.tier, n * bytes_per_token)
            if s.tier in STAGED_THROUGH_HOST:
                staged[s.tier] = staged.get(s.tier, 0.0) + n * bytes_per_token
            left -= n
        if staged and not (len(staged) == 1 and self.direct_read(*next(iter(staged.items())))):
            # Promoted into host first: usable a step or two after it lands.
            seconds += self.promotion_wait_s
        return seconds

    def _decision(self, segs: list[Segment], k: int, start: int, bytes_per_token: float,
                  recompute_all: float, basis: str, total: int | None = None) -> LoadDecision:
        total = k if total is None else total
        per_tier: dict[str, list[int]] = {}
        left = k
        for s in segs:
            loaded = max(0, min(left, s.tokens))
            entry = per_tier.setdefault(s.tier, [0, 0])
            entry[0] += loaded
            entry[1] += s.tokens - loaded
            left -= loaded
        load_s = self._load_seconds(segs, k, bytes_per_token)
        return LoadDecision(k, total, tuple((t, a, b) for t, (a, b) in per_tier.items()),
                            load_s, recompute_all, basis,
                            load_s if k == total else self._load_seconds(segs, total,
                                                                         bytes_per_token))

    # -- metrics -------------------------------------------------------------------
    def count(self, decision: LoadDecision) -> None:
        """A decision the scheduler acted on (count once per request, not per ask)."""
        for key in decision.decisions():
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def count_recompute(self, tiers: Iterable[str]) -> None:
        """A request stopped waiting on these tiers past its budget and recomputes
        what they might have brought: a recompute decision, as `count` would file it."""
        for tier in tiers:
            key = (tier, RECOMPUTE)
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def export(self, stats) -> None:
        """Into a PromptCacheStats: the estimates (gauges) and the decisions counted
        since the last export (promptcache_load_decisions_total{tier,decision})."""
        for name, t in self._tiers.items():
            if t.estimate.n >= self.min_samples:
                stats.set("tier_load_bytes_per_second", t.estimate.rate, tier=name)
        rate = self.prefill.tokens_per_second() if self.prefill.measured else None
        if rate:
            stats.set("prefill_tokens_per_second", rate)
        for (tier, decision), n in self._decisions.items():
            stats.inc("load_decisions_total", n, tier=(tier, decision))
        self._decisions.clear()


def _ewma(old: float | None, new: float, weight: float = 0.25) -> float:
    """A running mean of round trips and waits: the newest sample weighs `weight`."""
    return new if old is None else (1.0 - weight) * old + weight * new


class WaitBudgets:
    """When each request began waiting (a remote lookup, a promotion), and how long it
    may: the scheduler recomputes instead once `expired`.  One entry per waiting
    request; `forget` it when the request is allocated or finishes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._since: dict[str, tuple[float, float]] = {}  # req_id -> (since, budget_s)

    def start(self, req_id: str, budget_s: float) -> None:
        """Begin (or keep) waiting; a later call keeps the first start and the smaller budget."""
        since, old = self._since.get(req_id, (self.clock(), math.inf))
        self._since[req_id] = (since, min(old, budget_s))

    def expired(self, req_id: str) -> bool:
        entry = self._since.get(req_id)
        return entry is not None and self.clock() - entry[0] >= entry[1]

    def left_s(self, req_id: str) -> float:
        """What is left of the request's budget (infinite if it is not waiting)."""
        entry = self._since.get(req_id)
        return math.inf if entry is None else entry[1] - (self.clock() - entry[0])

    def waited_s(self, req_id: str) -> float:
        entry = self._since.get(req_id)
        return 0.0 if entry is None else self.clock() - entry[0]

    def forget(self, req_id: str) -> None:
        self._since.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._since)
