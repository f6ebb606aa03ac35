"""The tiers below host RAM, as the scheduler side sees them: written once for all.

Disk (`store/disk_tier.py`) and a shared remote store (`store/remote_tier.py`)
are the same kind of thing here.  Each is an index with a small interface --
`locate(key)`, `key in tier`, `plan_write(keys)`, `commit` / `abort` /
`discard(object id)`, `pin` / `unpin` / `touch`, counters -- and this module does
what is common to them:
- write-through: a finished request's exact blocks go to every tier that lacks
  them (the worker stages them once per tier and writes in the background);
- promotion: a run of blocks missing from host is read into host slots from the
  first tier that holds each block (lookup order: disk, then remote), in the
  background; the lookup meanwhile answers "ask again";
- prefetch: the same for requests waiting in vLLM's queue;
- pricing: a tier measured as slower than recomputing a run is neither asked about
  it nor written with it (load_cost.py), except to keep it measured;
- jobs: a write or a promotion is done when every worker rank reported it.
Adding a tier (S3, Mooncake) is one new index module and one worker-side IO module.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable, Sequence

from ..store.host_tier import HostTier
from ..store.keys import BlockKey
from ..store.secondary_io import PROMOTE, WRITE
from .load_cost import LoadCost, LoadDecision, Segment, WaitBudgets
from .metadata import TierWrite, Promotion

logger = logging.getLogger("vllm.promptcache")

# The key of a stored partial block right after a request's first i blocks (tails.py).
TailAt = Callable[[int], "BlockKey | None"]
# A read from a local tier expected to take at most this long is made in the step that
# loads its blocks (a direct read), where vLLM recomputes what fails to load: the step
# waits for it, instead of the request waiting a step for a promotion into host.
DIRECT_READ_MAX_S = 0.005
DIRECT_TIERS = ("disk",)


@dataclass
class _Job:
    """A background job every worker must report on (a write or a promotion)."""

    kind: str
    tier: Any
    reports: int = 0
    ok: bool = True
    slots: list[int] = field(default_factory=list)     # promotion: host slots being filled
    keys: list[BlockKey] = field(default_factory=list)  # promotion: their keys
    object_id: str = ""
    prefetch: bool = False
    issued: float = 0.0  # promotion: when it was planned (its wall time is what a load waits)
    seconds: float | None = None  # promotion: its read's own time on the slowest worker
    origin: bool = True  # promotion: a later load of its blocks counts under its tier
    direct: bool = False  # promotion: read in the step that loads it (counted at the load)
    promo_id: str = ""
    hits: int = 0  # direct: blocks a load took from it, counted as hits once it lands


class SecondaryTiers:
    def __init__(self, tiers: Sequence[Any], host: HostTier, world_size: int, stats: Any,
                 abort_slots: Callable[[list[int]], None], cost: LoadCost | None = None,
                 block_size: int = 1):
        self.tiers = list(tiers)
        # Load or recompute (load_cost.py): promotions are priced and timed; None
        # promotes every run found, as before.
        self.cost = cost
        self.waits = WaitBudgets()
        self._counted: set[str] = set()
        self.block_size = block_size
        self.bytes_per_token = host.slot_bytes / block_size
        self._asking = [t for t in self.tiers if hasattr(t, "start_lookup")]
        self.host = host
        self.world_size = world_size
        self.stats = stats
        self._abort_slots = abort_slots
        self.writes: list[TierWrite] = []
        self.promotions: list[Promotion] = []
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._promoting: dict[BlockKey, _Job] = {}  # a pending host block -> its promotion
        self._ids = count()
        # Keys a promotion brought into host and no load used yet: (tier, by prefetch).
        self._promoted: OrderedDict[BlockKey, tuple[str, bool]] = OrderedDict()
        self._reported: dict[tuple[str, str], int] = {}
        # Direct reads: whether vLLM recomputes blocks that fail to load (then a small
        # read from a local tier is made in the loading step), and each asker's
        # (key, host slot) pairs from its last fetch, for the lookup to offer.
        self.direct_reads = False
        self._direct: dict[str, list[tuple[BlockKey, int]]] = {}

    @property
    def direct_reads(self) -> bool:
        return self._direct_reads

    @direct_reads.setter
    def direct_reads(self, on: bool) -> None:
        # The cost model prices a direct read without the steps a promotion waits.
        self._direct_reads = on
        if self.cost is not None:
            self.cost.direct_tiers = frozenset(DIRECT_TIERS) if on else frozenset()
            self.cost.direct_read_max_s = DIRECT_READ_MAX_S

    def __bool__(self) -> bool:
        return bool(self.tiers)

    # -- lookups ---------------------------------------------------------------------
    # A tier whose index is complete (disk: this engine wrote or scanned every file)
    # answers `locate` at once.  A shared one (remote) knows only what it was told:
    # `start_lookup` asks the store in the background, `lookup_pending` says whether
    # the answer is still out, `take_answered` lists the askers answered since.
    def ask(self, asker: str, keys: Sequence[BlockKey], retry_after_s: float | None = None,
            start: int = 0) -> bool:
        """Ask the tiers that must be asked about `keys` (the request's blocks from
        block `start` on; once per asker, again after `retry_after_s`); True while an
        answer is out.  A tier measured as slower than recomputing all of them is not
        asked (`LoadCost.priced_out`): its answer could only lead to a recompute."""
        pending = False
        for tier in self._asking:
            if self._priced_out(tier, start, len(keys)):
                continue
            tier.start_lookup(asker, keys, retry_after_s=retry_after_s)
            pending = tier.lookup_pending(asker) or pending
        return pending

    def answered(self) -> list[str]:
        """Askers whose lookups answered since the last call."""
        out: list[str] = []
        for tier in self._asking:
            out.extend(tier.take_answered())
            if self.cost is not None:
                # A lookup is a round trip that moves no KV: the tier's fixed latency.
                for seconds in tier.take_round_trips():
                    self.cost.observe_round_trip(tier.name, seconds)
        return out

    def _priced_out(self, tier: Any, start: int, blocks: int, write: bool = False) -> bool:
        return self.cost is not None and self.cost.priced_out(
            tier.name, start * self.block_size, blocks * self.block_size, self.bytes_per_token,
            write=write)

    def forget(self, asker: str) -> None:
        self._direct.pop(asker, None)
        for tier in self._asking:
            tier.forget_request(asker)

    def fetch(self, asker: str, keys: list[BlockKey], start: int,
              spare: Callable[[BlockKey], bool], retry_after_s: float | None = None,
              budgeted: bool = False, tail: TailAt | None = None) -> bool:
        """Bring keys[start:] into host from below it: True while that is under way
        (the asker asks again next step), False where no tier below has keys[start]
        or recomputing it is faster.

        With `budgeted` (a request's own lookup), what is promoted is decided by cost
        (load_cost.py): only the leading blocks whose load beats recomputing them, and
        the asker is held back for at most the expected time to recompute what it
        waits for; then it goes on without (what arrives later serves the next one).
        `tail(i)`: the key of a stored partial block after keys[:i] the prompt holds
        (tails.py), promoted with a run that ends at block i."""
        if budgeted and self.cost is not None:
            self.waits.start(asker, self.cost.lookup_budget_s(
                start * self.block_size, (len(keys) - start) * self.block_size))
            if self.waits.expired(asker):
                self._gave_up(asker)
                return False
        if self._promote_by_cost(asker, keys, start, spare, budgeted, tail):
            return True
        if not self._asking:
            return False
        # One round trip, in the background: asked again until it answers.  Only once
        # nothing nearer is being fetched: an answer arriving after a failed promotion
        # must not bring back the chunk it dropped.
        if self.ask(asker, keys[start:], retry_after_s, start=start):
            if budgeted and self._answer_comes_too_late(asker, len(keys) - start):
                # Waiting up to the budget and then recomputing would cost up to twice
                # the recompute: where the tier's measured round trip alone is past
                # what is left of it, go on now (the answer still serves later turns).
                self._gave_up(asker)
                return False
            return True
        if self._promote_by_cost(asker, keys, start, spare, budgeted, tail):
            return True
        if budgeted:  # not asked: a tier priced out of this run is a recompute decision
            out = [t.name for t in self._asking if self._priced_out(t, start, len(keys) - start)]
            if out:
                self._gave_up(asker, out[0])
        return False

    def _answer_comes_too_late(self, asker: str, blocks: int) -> bool:
        """Whether no pending tier could bring the asker's `blocks` blocks in time: its
        measured round trip, then loading all of them (a read, and the steps its
        promotion spans), is past what is left of the budget.  Loading all is the best
        case: a shorter hit saves less recompute for about the same fixed cost."""
        if self.cost is None:
            return False
        left = self.waits.left_s(asker)
        tokens = blocks * self.block_size
        for tier in self._asking:
            if tier.lookup_pending(asker):
                round_trip = self.cost.round_trip_s(tier.name)
                if round_trip is None or round_trip + self.cost.load_seconds(
                        tier.name, tokens, self.bytes_per_token) < left:
                    return False
        return True

    def _gave_up(self, asker: str, tier: str | None = None) -> None:
        """The asker stopped waiting for the tiers it asked (their answer or promotion
        would come later than recomputing): one recompute decision, under `tier` or
        the tier still asked, unless a decision was counted for it already."""
        if asker in self._counted or self.cost is None:
            return
        self._counted.add(asker)
        tiers = [tier] if tier else [t.name for t in self._asking if t.lookup_pending(asker)] \
            or [t.name for t in self.tiers] or ["host"]
        self.cost.count_recompute(tiers[:1])
        logger.debug("promptcache: %s stopped waiting for %s after %.3f s: recomputing is "
                     "faster", asker, "/".join(tiers), self.waits.waited_s(asker))

    def may_wait(self, asker: str, keys: list[BlockKey], start: int) -> bool:
        """keys[start] is on its way into host (a promotion, maybe a prefetch the asker
        did not start, or a save of its previous turn): whether the asker may wait
        another step for it.  Budgeted as a lookup is, from the first step it waited:
        no longer than recomputing keys[start:] would take."""
        return self._may_wait(asker, self._promotion_of(keys[start]), start * self.block_size,
                              (len(keys) - start) * self.block_size)

    def may_wait_for_tail(self, asker: str, start: int) -> bool:
        """The tail the asker would load after its first `start` tokens is still being
        saved into host (by the turn before): whether it may wait another step for it,
        no longer than recomputing that block would take."""
        return self._may_wait(asker, None, start, self.block_size)

    def _may_wait(self, asker: str, job: _Job | None, start: int, tokens: int) -> bool:
        if self.cost is not None:
            self.waits.start(asker, self.cost.lookup_budget_s(start, tokens))
        if not self.waits.expired(asker) and not self._lands_too_late(job, asker):
            return True
        self._gave_up(asker, job.tier.name if job is not None else "host")
        return False

    def _lands_too_late(self, job: _Job | None, asker: str) -> bool:
        """A promotion expected to land after the asker's budget (a slow store's round
        trip): waiting it out and then recomputing would cost up to twice the recompute."""
        if job is None or self.cost is None:
            return False
        expected = job.issued + self.cost.tier_seconds(
            job.tier.name, len(job.slots) * self.host.slot_bytes)
        if not job.direct:  # usable once reported, a step or so after it lands
            expected += self.cost.promotion_wait_s
        return expected - time.monotonic() >= self.waits.left_s(asker)

    def _promotion_of(self, key: BlockKey) -> _Job | None:
        """The promotion bringing a pending host block in (None: a save of it)."""
        return self._promoting.get(key)

    def done_waiting(self, asker: str) -> None:
        self.waits.forget(asker)
        self._counted.discard(asker)

    def _promote_by_cost(self, asker: str, keys: list[BlockKey], start: int,
                         spare: Callable[[BlockKey], bool], budgeted: bool,
                         tail: TailAt | None = None) -> bool:
        if budgeted and self.cost is not None:
            run, decision = self._priced_run(keys, start, tail)
            if decision is None:
                return False
            if asker not in self._counted:  # one decision per request, however often it asks
                self._counted.add(asker)
                self.cost.count(decision)
            if not run:
                logger.debug("promptcache: %s recomputes %d tokens found below host (load "
                             "%.3f s > recompute %.3f s, %s)", asker, decision.total_tokens,
                             decision.load_all_s, decision.recompute_s, decision.basis)
                return False
        else:
            run = self._run_below(keys, start, tail=tail)
        direct = asker if budgeted and self._direct_ok(run) else ""
        return self.promote(keys, start, spare, prefetch=False, run=run, direct=direct) > 0

    def _direct_ok(self, run: list[tuple[BlockKey, Any, str, int]]) -> bool:
        """Whether this run is read in the step that loads it: vLLM recomputes what fails
        to load, every block is on a local tier, and the read is expected to be short
        (the whole step waits for it)."""
        if not run or any(tier.name not in DIRECT_TIERS for _, tier, _, _ in run):
            return False
        return self._short_read(run[0][1].name, len(run))

    def _short_read(self, tier: str, blocks: int) -> bool:
        """Direct reads are on, and `blocks` from `tier` read within DIRECT_READ_MAX_S
        (the cost model holds the rule: it prices such a read without a promotion's wait)."""
        return self.cost is not None and self.cost.direct_read(tier, blocks * self.host.slot_bytes)

    def adopt(self, asker: str, keys: list[BlockKey], start: int,
              tail: TailAt | None = None) -> list[tuple[BlockKey, int]]:
        """keys[start:] are on their way into host by promotions not sent to the workers
        yet (a prefetch issued when the asker was queued, this same step): make them the
        asker's direct reads, read in this step before its loads, and return their
        (key, host slot) pairs in order (with the tail after them, if promoted too);
        empty where that cannot be (sent already, another asker's, too slow a read)."""
        if not (self.direct_reads and self.cost is not None):
            return []
        unsent = {p.promo_id: p for p in self.promotions}
        out: list[tuple[BlockKey, int]] = []
        jobs: dict[str, _Job] = {}
        slot_of: dict[BlockKey, int] = {}

        def take(key: BlockKey) -> bool:
            job = self._promoting.get(key)
            if job is None or job.tier.name not in DIRECT_TIERS:
                return False
            promo = unsent.get(job.promo_id)
            if promo is None or promo.for_req not in ("", asker):
                return False
            if job.promo_id not in jobs:
                jobs[job.promo_id] = job
                slot_of.update(zip(job.keys, job.slots))
            out.append((key, slot_of[key]))
            return True

        i = start
        while i < len(keys) and take(keys[i]):
            i += 1
        if out and tail is not None and (i == len(keys) or keys[i] not in self.host):
            key = tail(i)
            if key is not None:
                take(key)
        if not out or not self._short_read(next(iter(jobs.values())).tier.name,
                                           sum(len(j.slots) for j in jobs.values())):
            return []
        for promo_id, job in jobs.items():
            unsent[promo_id].for_req = asker
            job.direct, job.origin = True, False
        return out

    def take_direct(self, asker: str) -> list[tuple[BlockKey, int]]:
        """The (key, host slot) pairs the asker's last fetch reads in the loading step, in
        run order (the last may be a tail's); empty where it promotes as usual."""
        return self._direct.pop(asker, [])

    def prefetch(self, keys: list[BlockKey], start: int, spare: Callable[[BlockKey], bool],
                 tail: TailAt | None = None) -> int:
        """Promote the run keys[start:] found below host ahead of a queued request's
        turn, as much of it as its own lookup would load (load_cost.py): a run that
        will be recomputed is not moved (its transfer would only compete with the
        engine for the machine, and its blocks push others out of host).  Returns
        blocks issued; no decision is counted (the request makes its own)."""
        if self.cost is None:
            return self.promote(keys, start, spare, prefetch=True,
                                run=self._run_below(keys, start, tail=tail))
        run, _ = self._priced_run(keys, start, tail)  # the request counts the decision
        if not run:
            return 0
        return self.promote(keys, start, spare, prefetch=True, max_blocks=len(run), run=run)

    def _priced_run(self, keys: list[BlockKey], start: int, tail: TailAt | None = None
                    ) -> tuple[list[tuple[BlockKey, Any, str, int]], LoadDecision | None]:
        """The run keys[start:] found below host (with its tail), cut to what is worth
        loading, with the decision that cut it (None: nothing found)."""
        run = self._run_below(keys, start, tail=tail)
        if not run:
            return [], None
        segments: list[Segment] = []
        for _, tier, _, _ in run:
            if segments and segments[-1].tier == tier.name:
                segments[-1] = Segment(tier.name, segments[-1].tokens + self.block_size)
            else:
                segments.append(Segment(tier.name, self.block_size))
        decision = self.cost.decide(segments, start * self.block_size,
                                    self.bytes_per_token, self.block_size)
        return run[:decision.load_tokens // self.block_size], decision

    def tier(self, name: str) -> Any:
        return next((t for t in self.tiers if t.name == name), None)

    # -- promotions ----------------------------------------------------------------
    def _run_below(self, keys: list[BlockKey], start: int, max_blocks: int | None = None,
                   tail: TailAt | None = None) -> list[tuple[BlockKey, Any, str, int]]:
        """The run keys[start:] found below host, as (key, tier, object id, index); with
        `tail`, followed by the stored partial block after the run's last block, where
        the run ends because the next block is stored nowhere (or keys end)."""
        run = []
        stop = len(keys) if max_blocks is None else min(len(keys), start + max_blocks)
        for key in keys[start:stop]:
            # Stop at a key already in host too: reserve() skips those, and the
            # claims must pair with the run one to one.
            if key in self.host:
                return run
            where = self._locate(key)
            if where is None:
                break
            run.append(where)
        else:
            if stop < len(keys):
                return run  # cut short: the tail is not next
        key = tail(start + len(run)) if tail is not None else None
        if key is not None and key not in self.host:
            where = self._locate(key)
            if where is not None:
                run.append(where)
        return run

    def _locate(self, key: BlockKey) -> tuple[BlockKey, Any, str, int] | None:
        for tier in self.tiers:
            where = tier.locate(key)
            if where is not None:
                return (key, tier, *where)
        return None

    def promote(self, keys: list[BlockKey], start: int, spare: Callable[[BlockKey], bool],
                prefetch: bool, max_blocks: int | None = None, origin: bool = True,
                run: list | None = None, direct: str = "") -> int:
        """Read the run keys[start:] (at most max_blocks of it) found below host into
        host slots; returns blocks issued.  `spare(key)` protects resident blocks from
        eviction for it.  With `origin` False, a load of the promoted blocks later is a
        host hit (they were brought back ahead of any request: a session's head).
        `run`: that run as `_run_below` found it this step, if the caller has it.
        `direct`: the request that loads the run in this step, after the read
        (`take_direct` names its slots)."""
        if run is None:
            run = self._run_below(keys, start, max_blocks)
        if not run:
            return 0
        claimed = self.host.reserve([key for key, _, _, _ in run], spare=spare)
        run = run[:len(claimed)]  # no key of the run is resident: claims follow it in order
        if direct and run:
            self._direct[direct] = [(key, slot) for (key, *_), (_, slot) in zip(run, claimed)]
        by_object: dict[tuple[str, str], list[tuple[BlockKey, int, int]]] = {}
        tiers = {}
        for (key, tier, object_id, index), (_, slot) in zip(run, claimed):
            by_object.setdefault((tier.name, object_id), []).append((key, index, slot))
            tiers[tier.name] = tier
        for (name, object_id), blocks in by_object.items():
            promo_id = f"p{next(self._ids)}"
            slots = [slot for _, _, slot in blocks]
            block_keys = [k for k, _, _ in blocks]
            self.promotions.append(Promotion(promo_id, object_id, [i for _, i, _ in blocks],
                                             slots, block_keys, tier=name, for_req=direct))
            job = self._jobs[(PROMOTE, promo_id)] = _Job(
                PROMOTE, tiers[name], slots=slots, keys=block_keys, object_id=object_id,
                prefetch=prefetch, issued=time.monotonic(), origin=origin and not direct,
                direct=bool(direct), promo_id=promo_id)
            self._promoting.update(dict.fromkeys(block_keys, job))
            tiers[name].pin([object_id])
        for name, tier in tiers.items():
            tier.touch([o for (n, o) in reversed(list(by_object)) if n == name])
        logger.debug("promptcache: promoting %d blocks from %d object(s) of %s%s", len(run),
                     len(by_object), "/".join(tiers), " (prefetch)" if prefetch else "")
        return len(run)

    def loaded(self, keys: Sequence[BlockKey]) -> tuple[dict[str, int], int, int]:
        """Blocks of a load that promotions brought in: ({tier: blocks}, by prefetch,
        blocks of direct reads).  A direct read's blocks are counted as hits (and
        prefetch hits) when the read lands, never where it failed (vLLM recomputed)."""
        from_tier: dict[str, int] = {}
        prefetched = direct = 0
        for key in keys:
            origin = self._promoted.pop(key, None)
            if origin is None:
                job = self._promoting.get(key)
                if job is not None and job.direct:  # read in this very step
                    job.hits += 1
                    direct += 1
                continue
            from_tier[origin[0]] = from_tier.get(origin[0], 0) + 1
            prefetched += origin[1]
        return from_tier, prefetched, direct

    def saved_afresh(self, key: BlockKey) -> None:
        """A save rewrote this key into host: a later hit on it is a host hit."""
        self._promoted.pop(key, None)

    # -- write-through ----------------------------------------------------------------
    def plan_writes(self, req_id: str, keys: list[BlockKey], block_ids: list[int]) -> int:
        """Write-through of a finished request's (exact) blocks to every tier that
        lacks them; returns the blocks planned.  Not to a tier measured as slower than
        recomputing the whole run (`LoadCost.priced_out`): no load would come of the
        write, and it would compete with the engine for the machine (counted under
        promptcache_skipped_writes_total{tier})."""
        planned = 0
        for tier in self.tiers:
            if self._priced_out(tier, 0, len(keys), write=True):
                self.stats.inc("skipped_writes_total", len(keys), tier=tier.name)
                continue
            jobs, dropped = tier.plan_write(keys)
            for object_id, idx in jobs:
                self.writes.append(TierWrite(req_id, object_id, [keys[i] for i in idx],
                                             [block_ids[i] for i in idx], tier=tier.name))
                self._jobs[(WRITE, object_id)] = _Job(WRITE, tier, object_id=object_id)
                planned += len(idx)
            if dropped:
                self.stats.inc("dropped_saves_total", dropped, tier=tier.name)
        return planned

    # -- per step -----------------------------------------------------------------------
    def take_metadata(self) -> tuple[list[TierWrite], list[Promotion]]:
        out = self.writes, self.promotions
        self.writes, self.promotions = [], []
        return out

    def on_worker_meta(self, worker_meta: Any) -> None:
        for object_id in worker_meta.corrupt_objects:
            for tier in self.tiers:
                tier.discard(object_id, corrupt=True)
        for object_id in worker_meta.missing_objects:
            for tier in self.tiers:
                # Gone, or refused (another user's): unindex, never delete.
                tier.discard(object_id, delete=False)
        for kind, job_id, ok, *seconds in worker_meta.events:
            self._job_report(kind, job_id, ok, seconds[0] if seconds else None)

    def _job_report(self, kind: str, job_id: str, ok: bool, seconds: float | None = None) -> None:
        job = self._jobs.get((kind, job_id))
        if job is None:
            return
        job.reports += 1
        job.ok = job.ok and ok
        if seconds is not None:  # the slowest rank's read
            job.seconds = max(job.seconds or 0.0, float(seconds))
        if job.reports < self.world_size:
            return
        del self._jobs[(kind, job_id)]
        for key in job.keys if kind == PROMOTE else ():
            if self._promoting.get(key) is job:
                del self._promoting[key]
        tier = job.tier
        if kind == WRITE:
            if job.ok:
                tier.commit(job_id)
            else:
                self.stats.inc("save_failures_total", len(tier.object_keys(job_id)),
                               tier=tier.name)
                tier.abort(job_id)
            return
        tier.unpin([job.object_id])
        if job.ok:
            if self.cost is not None and job.issued:
                # The read's own time where the workers report it: from issue to report
                # also counts the engine steps in between (seconds each on a slow
                # prefill), which once priced a disk as slower than recomputing.
                wall = time.monotonic() - job.issued
                elapsed = job.seconds if job.seconds is not None else wall
                self.cost.observe_transfer(tier.name, len(job.slots) * self.host.slot_bytes,
                                           elapsed)
                if job.seconds is not None and not job.direct:
                    # What a request waiting for it waited past the read: the steps.
                    self.cost.observe_promotion_wait(max(0.0, wall - job.seconds))
            self.host.commit(job.slots)
            self.stats.inc("promoted_blocks_total", len(job.slots), tier=tier.name)
            if job.hits:  # a direct read a load took from: its hits count now
                self.stats.inc("hit_tokens_total", job.hits * self.block_size, tier=tier.name)
                if job.prefetch:
                    self.stats.inc("prefetch_hit_blocks_total", job.hits)
            for key in job.keys if job.origin else ():
                self._promoted[key] = (tier.name, job.prefetch)
                self._promoted.move_to_end(key)
            while len(self._promoted) > self.host.num_slots:
                self._promoted.popitem(last=False)
        else:
            self._abort_slots(job.slots)
            # Corrupt or missing objects were dropped above; any other read error
            # only unindexes the object (a disk restart's scan sees it again).
            tier.discard(job.object_id, delete=False)

    def has_pending_work(self) -> bool:
        return bool(self.writes or self.promotions or self._jobs)

    def report_stats(self) -> None:
        for tier in self.tiers:
            self._report_delta(tier.name, "evictions", tier.evictions, "evictions_total")
            self._report_delta(tier.name, "corrupt", tier.corrupt_blocks, "corrupt_blocks_total")
            self._report_delta(tier.name, "rejected", getattr(tier, "rejected_files", 0),
                               "rejected_store_entries_total")
            if tier.capacity_bytes:
                self.stats.set("tier_bytes_in_use", tier.bytes_in_use, tier=tier.name)
                self.stats.set("tier_capacity_bytes", tier.capacity_bytes, tier=tier.name)

    def _report_delta(self, tier: str, what: str, total: int, metric: str) -> None:
        new = total - self._reported.get((tier, what), 0)
        if new:
            self.stats.inc(metric, new, tier=tier)
            self._reported[(tier, what)] = total
