"""The connector's scheduler side: what can be loaded, what must be saved, what to prefetch.

Runs in vLLM's engine-core process.  It owns the indexes of the host tier
(`HostTier`) and the disk tier (`DiskTier`) and decides, per step, which bytes
move where; it never touches tensors.  Lookup order: vLLM's own prefix cache
(the blocks it already computed), then host, then disk.  Disk blocks are first
read into host (a promotion, in the background) and then loaded like host
blocks; meanwhile the lookup answers None ("ask again") and vLLM schedules
other requests.  When a request is queued (`on_new_request`) its disk blocks
are promoted ahead of its turn, and its keys are marked queued so a
scheduler-aware policy evicts them last.

Invariants that make it safe:
- a host slot or disk file is served only once READY, i.e. after every worker
  reported its write done and good;
- a host slot is only reused (evicted) when reserved for a save or a promotion,
  which is sent in a later step's metadata than any load planned from it before;
  the worker executes steps in order, each step's loads finishing inside it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .. import compat
from .. import request_params
from ..calibration import startup_check
from ..config import PromptCacheConfig
from ..metrics import PromptCacheStats, export_store_counts
from ..store.host_tier import HostTier
from ..store.keys import BlockKey, BlockKeyer, derived_namespace
from ..store.policies import make_policy, policy_class
from .approximate import ApproximateBlocks
from .layouts import Layouts
from .load_plan import LoadPlan
from .load_cost import LoadCost
from .markers import FrontEndMarkers
from .metadata import BlockTransfer, PromptCacheMetadata
from .pinned_modules import PinnedModules, module_failed
from .queued_keys import QueuedKeys
from .request_keys import RequestKeys
from .request_state import Lookup, RequestState, RequestStates
from .secondary import SecondaryTiers, TailAt
from .sessions import EvictLast, Sessions, session_id_of
from .shifted import ShiftedPlan, ShiftedReuse
from .stats_gate import StatsGate
from .step_timing import StepTimings
from .tails import RunTails, Tail
from .tiers import host_tier_geometry, model_fingerprint, scheduler_tiers

logger = logging.getLogger("vllm.promptcache")  # under vLLM's handlers and VLLM_LOGGING_LEVEL


class PromptCacheScheduler:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, config: PromptCacheConfig):
        self.config = config
        self.block_size = vllm_config.cache_config.block_size
        self.fingerprint = model_fingerprint(vllm_config, config)
        self.keyer = BlockKeyer(self.fingerprint)
        self.request_keys = RequestKeys(self.keyer)
        self.requests = RequestStates()
        self.requests.on_release.append(self.request_keys.forget)
        self.approximate = ApproximateBlocks(
            bool(getattr(vllm_config.cache_config, "enable_prefix_caching", True)),
            self.block_size)
        num_slots, slot_bytes = host_tier_geometry(vllm_config, kv_cache_config, config)
        self.slot_bytes = slot_bytes
        self.world_size = vllm_config.parallel_config.world_size
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise RuntimeError("vllm-promptcache supports tensor parallelism, not pipeline "
                               "parallelism (pipeline_parallel_size > 1)")
        self.layout = tuple(compat.layer_page_bytes(kv_cache_config))
        # Keys that requests waiting in vLLM's queue will read, and the heads of live
        # conversations (sessions.py): a scheduler-aware policy evicts them last.
        self.queued = QueuedKeys()
        self.sessions = Sessions(max_keys=max(1, num_slots // 2))
        self.evict_last = EvictLast(self.queued, self.sessions)
        self._queue_aware = policy_class(config.eviction_policy).queue_aware
        self.host = HostTier(num_slots, slot_bytes, make_policy(config.eviction_policy),
                             self.evict_last)
        self.tails = RunTails(self.keyer, self.host, num_slots)
        tiers = scheduler_tiers(config, self.fingerprint, self.world_size, slot_bytes,
                                self.layout, self.evict_last)
        self.disk, self.remote = tiers.disk, tiers.remote
        self.shifted: ShiftedReuse | None = None
        self.layouts: Layouts | None = None
        if config.position_independent:
            from ..kernels.rope_params import UnsupportedRopeError, rope_params

            try:
                rope_params(vllm_config)  # the worker needs them; fail here, at start-up
            except UnsupportedRopeError as e:
                raise RuntimeError(f"--promptcache-position-independent: {e}") from None
            self.shifted = ShiftedReuse(self.block_size, self.host, below=self._fetch_below)
            self.config = startup_check(self.fingerprint, self.config)  # calibration.py
        self.modules = PinnedModules(self.host, self.shifted, self.block_size, slot_bytes,
                                     self.world_size)
        if self.shifted is not None:
            self.layouts = Layouts(self.keyer, self.shifted, self.modules.run, self.tails,
                                   module_names=self.modules.names,
                                   module_version=self.modules.version)
            self.modules.on_change = self.layouts.modules_changed
        self.stats = PromptCacheStats()
        self.markers = FrontEndMarkers(request_params.module_token(create=False), self.stats,
                                       self._request_params)
        self.requests.on_release.append(self.markers.forget)
        if self.layouts is not None:
            self.requests.on_release.append(self.layouts.forget)
        self._saves: list[BlockTransfer] = []
        self._reported = {"host": 0}
        self.resets = 0
        self._reported_preemptions = 0
        self.stats_gate = StatsGate()  # gathers gauges on request events, else now and then
        # Load or recompute by measured cost (load_cost.py): priced from the tiers' own
        # promotions and vLLM's step timings.
        self.cost = LoadCost(mode=config.load_decisions)
        self.step_timings = StepTimings(self.cost.observe_prefill)
        self.secondary = SecondaryTiers(tiers.below_host(), self.host, self.world_size,
                                        self.stats, self._abort_slots, self.cost,
                                        self.block_size)
        # Small disk reads in the step that loads them, where vLLM recomputes what a
        # connector fails to load (secondary.py: direct reads).
        self.secondary.direct_reads = compat.recomputes_failed_loads(vllm_config)
        self.requests.on_release.append(self.secondary.forget)
        self.requests.on_release.append(self.secondary.done_waiting)
        self.load_plan = LoadPlan(self.block_size, self.host, self.secondary, self.stats)
        self.shared = None  # modules shared with other instances through the store
        if self.remote is not None and self.shifted is not None:
            from .shared_segments import SharedSegments

            self.shared = SharedSegments(self.remote, self.shifted, self.block_size)
        logger.info(
            "vllm-promptcache: host tier %.2f GiB = %d slots of one %d-token block "
            "(%.2f MiB per slot per worker, %d worker(s)); %s; remote tier %s; eviction %s; "
            "model fingerprint %s", config.host_gb, num_slots, self.block_size,
            slot_bytes / 2**20, self.world_size, tiers.disk_line,
            self.remote.store.url.masked() if self.remote else "off", config.eviction_policy,
            self.fingerprint.describe())

    # -- loads -----------------------------------------------------------------
    def on_new_request(self, request: Any) -> None:
        """A request joined vLLM's queue: mark its blocks queued and prefetch them from disk."""
        state = self.requests.of(request)
        if state.session is None:  # once per request (a session counts its turns)
            state.session = session_id_of(request)
            if state.session is not None:
                self.sessions.turn_started(state.session)
        keys = self._keys(request)
        if not keys or self._encodes_module(request):
            return
        self._unqueue(state)
        state.queued_keys = keys
        self.queued.queue(keys)
        if not self.secondary:
            return
        start = len(self.host.ready_prefix(keys, touch=True))
        if start < len(keys):
            # Answered in a later step: _prefetch_answered() promotes what it found.
            self.secondary.ask(request.request_id, keys[start:], start=start)
        self._prefetch(keys, self._tail_at(request, keys))

    def _prefetch(self, keys: list[BlockKey], tail: TailAt | None = None) -> None:
        """Promote a queued request's blocks found below host (and the tail after them),
        ahead of its turn."""
        start = len(self.host.ready_prefix(keys, touch=False))
        if start < len(keys) and not self.host.is_pending(keys[start]):
            issued = self._prefetch_below(keys, start, tail)
            if issued:
                self.stats.inc("prefetch_blocks_total", issued)

    def _fetch_below(self, keys: list[BlockKey], j: int) -> bool:
        """A segment's blocks keys[j:] are not in host: fetch them from a tier below
        host; True while that is under way (the request asks again)."""
        if not self.secondary:
            return False
        return self.secondary.fetch("segment:" + keys[j].hex(), keys, j, set(keys).__contains__,
                                    retry_after_s=2.0)

    def _promote_session_heads(self, per_step: int = 2) -> None:
        """Conversations between turns: bring back into host what their next turn reads
        first, if it went below host, while the user reads and types (sessions.py).
        Such a promotion spares every queued key and live head (no two sessions evict
        each other's head), and its later load counts as a host hit."""
        self.sessions.expire()
        for _, head in self.sessions.awaiting(per_step):
            keys = list(head)
            start = len(self.host.ready_prefix(keys, touch=False))
            if start < len(keys) and not self.host.is_pending(keys[start]):
                spare = self.evict_last.get
                issued = self.secondary.promote(keys, start, lambda k: spare(k, 0) > 0,
                                                prefetch=True, origin=False)
                if issued:
                    self.stats.inc("prefetch_blocks_total", issued)

    def _prefetch_answered(self) -> None:
        """Queued requests whose lookup below host answered since the last step: prefetch."""
        for req_id in self.secondary.answered():
            state = self.requests.get(req_id)
            if state is not None and state.queued_keys:
                self._prefetch(state.queued_keys,
                               self._tail_at(state.request, state.queued_keys))

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        req_id = request.request_id
        self.stats_gate.event()
        state = self.requests.of(request)
        if not state.lookup_counted:
            state.lookup_counted = True
            self.stats.inc("lookups_total")
        self.requests.looked_up(state, num_computed_tokens)
        state.lookup = None
        params = self._request_params(request)
        if params.get(request_params.LOAD) is False or self._encodes_module(request):
            # A module's encoding is served to every later prompt: always computed.
            return 0, False
        keys = self._keys(request)
        if keys is None:
            return 0, False
        start = num_computed_tokens // self.block_size
        slots = self.host.ready_prefix(keys[start:], touch=False)
        end = start + len(slots)
        if end < len(keys):
            tail_at = self._tail_at(request, keys)
            if self.host.is_pending(keys[end]) and self.secondary:
                # Promoted by this step's prefetch, not sent yet: read it in this step.
                direct = self.secondary.adopt(req_id, keys, end, tail_at)
                if direct:
                    slots, end, tail = self._direct_offer(keys, end, slots, direct, request)
                    return self._offer(state, request, params, keys, start, end, slots, tail,
                                       num_computed_tokens)
            if self.host.is_pending(keys[end]) and self.secondary.may_wait(req_id, keys, end):
                # The next block is on its way into host (a save of a conversation's
                # previous turn, or a promotion from below, maybe a prefetch): ask
                # again next step, until waiting costs more than recomputing it would.
                return None, False
            if self.secondary and self.secondary.fetch(req_id, keys, end,
                                                       set(keys).__contains__, budgeted=True,
                                                       tail=tail_at):
                direct = self.secondary.take_direct(req_id)
                if not direct:
                    return None, False
                # Read in this step, before its loads (a direct read): offered as if in
                # host; a failed read is a load error vLLM recomputes.
                slots, end, tail = self._direct_offer(keys, end, slots, direct, request)
                return self._offer(state, request, params, keys, start, end, slots, tail,
                                   num_computed_tokens)
        tail = None
        if self.request_keys.shiftable(request):  # no images or embeddings
            tail = self.tails.find(keys, end, self.request_keys.namespace(request),
                                   request.all_token_ids, len(request.all_token_ids) - 1)
            if tail is True:  # the tail's save is in flight: wait, as for a block
                if self.secondary.may_wait_for_tail(req_id, end * self.block_size):
                    return None, False
                tail = None
        return self._offer(state, request, params, keys, start, end, slots, tail,
                           num_computed_tokens)

    def _direct_offer(self, keys: list[BlockKey], end: int, slots: list[int],
                      direct: list[tuple[BlockKey, int]], request: Any
                      ) -> tuple[list[int], int, Tail | None]:
        """A direct read's blocks appended to the host run: (slots, new end, tail)."""
        slots = list(slots)
        tail = None
        for key, slot in direct:
            if end < len(keys) and keys[end] == key:
                slots.append(slot)
                end += 1
                continue
            best = self.tails.best(keys, end, self.request_keys.namespace(request),
                                   request.all_token_ids, len(request.all_token_ids) - 1)
            if best is not None and best[1] == key:
                tail = Tail(best[0], key, slot)
            break
        return slots, end, tail

    def _offer(self, state: RequestState, request: Any, params: dict, keys: list[BlockKey],
               start: int, end: int, slots: list[int], tail: Tail | None,
               num_computed_tokens: int) -> tuple[int, bool]:
        """What the lookup offers vLLM: the exact run keys[start:end] in `slots`, the
        tail after it, then tokens found at other positions."""
        tail_len = tail.length if tail else 0
        shifted = None
        if self.shifted is not None and self.request_keys.shiftable(request) \
                and not self._encodes_gaps(request):
            shifted = self._shifted_plan(request, end * self.block_size + tail_len, params)
            if shifted is not None and shifted.waiting:
                return None, False
        total = len(slots) * self.block_size + tail_len + (shifted.num_tokens if shifted else 0)
        if total < self.config.min_load_blocks * self.block_size or not total:
            return 0, False
        state.lookup = Lookup(num_computed_tokens, keys[start:end], slots, tail, shifted)
        # Not always whole blocks: a run found at other positions may end inside one,
        # and vLLM computes the rest of that block.
        return start * self.block_size + total - num_computed_tokens, False

    def _tail_at(self, request: Any, keys: list[BlockKey]) -> TailAt | None:
        """For a fetch from below host: the key of the stored tail after the request's
        first i blocks (promoted with the run that ends there), if it has one."""
        if not self.request_keys.shiftable(request):
            return None
        namespace = self.request_keys.namespace(request)
        tokens, limit = request.all_token_ids, len(request.all_token_ids) - 1

        def at(i: int) -> BlockKey | None:
            best = self.tails.best(keys, i, namespace, tokens, limit) if i else None
            return best[1] if best else None
        return at

    def _shifted_plan(self, request: Any, start: int, params: dict) -> ShiftedPlan | None:
        """Tokens from `start` on found at other positions: by the prompt's announced
        layout where it has one, else by the token-level search; minus the boundary fix."""
        limit = len(request.all_token_ids) - 1
        namespace = self.request_keys.namespace(request)
        plan = None
        entry = self.layouts.find(request) if namespace is None else None
        if entry is not None:
            plan = self.layouts.plan(entry, start, limit)
            if plan.waiting:
                return plan
        if plan is None or not plan.num_tokens:
            plan = self.shifted.plan(request.all_token_ids, namespace, start, limit)
            if plan.waiting:
                return plan
        ratio = params.get(request_params.RECOMPUTE_RATIO)
        ratio = self.config.recompute_ratio if ratio is None else ratio
        # Boundary fix: the run's last `ratio` is prefilled, so it attends to what is
        # actually before it.
        plan.truncate(plan.num_tokens - math.ceil(plan.num_tokens * ratio))
        return plan if plan.num_tokens else None

    def _keys(self, request: Any, max_blocks: int | None = None) -> list[BlockKey] | None:
        """The request's block keys (by default all but the block of its last token,
        which is always computed: its logits are the next token's); None, counted
        once, where the request cannot be keyed safely."""
        keys = self.request_keys.keys(request, max_blocks)
        if keys is None and not (state := self.requests.of(request)).skip_counted:
            state.skip_counted = True
            self.stats.inc("skipped_requests_total",
                           tier=self.request_keys.skip_reason(request) or "unknown")
        return keys

    def _request_params(self, request: Any) -> dict[str, Any]:
        state = self.requests.of(request)
        if state.params is None:  # parsed (and warned about) once per request
            state.params = request_params.of(request)
        return state.params

    def _encodes_module(self, request: Any) -> str | None:
        return self.markers.module(request)

    def _encodes_gaps(self, request: Any) -> bool:
        """True for the gap encoding of a composed prompt (modules/layout.py); its
        layout is learnt the first time the request is seen."""
        trusted, value = self.markers.gap_layout(request)
        if value is not None and self.layouts is not None \
                and self.request_keys.namespace(request) is None:
            refusal = self.layouts.announce(request, value)
            if refusal:
                logger.warning("promptcache: request %s: layout ignored: %s",
                               request.request_id, refusal)
        return trusted

    def _prefetch_below(self, keys: list[BlockKey], start: int, tail: TailAt | None = None) -> int:
        """Read the run of keys[start:] found below host into host, as much of it as is
        worth loading (SecondaryTiers.prefetch); returns blocks issued."""
        # A promotion never evicts the request's own blocks (with a host tier
        # smaller than the request it would evict its head to fetch its tail,
        # forever); under the scheduler-aware policy a prefetch also spares
        # what any other queued request needs.
        own = set(keys)
        if self._queue_aware:
            def spare(key):
                return key in own or self.evict_last.get(key, 0) > 0
        else:
            spare = own.__contains__
        return self.secondary.prefetch(keys, start, spare, tail)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.stats_gate.event()
        state = self.requests.of(request)
        self._unqueue(state)
        lookup = state.lookup
        self.requests.allocated(state)
        self.secondary.done_waiting(state.req_id)
        all_block_ids = compat.request_block_ids(blocks)
        try:
            self._allocated(state, lookup, all_block_ids, num_external_tokens)
        finally:
            # Handed another request's approximate KV by vLLM's prefix cache, it computes
            # from approximate KV: marked from there on, whatever the plan (a preempted
            # request's blocks stay in vLLM's prefix cache after it lost them).
            handed = self.approximate.handed_approximate(state, all_block_ids)
            if handed is not None:
                self.requests.approximate(state, handed)
            self.approximate.allocated(state, all_block_ids)

    def _allocated(self, state: RequestState, lookup: Lookup | None, all_block_ids: list[int],
                   num_external_tokens: int) -> None:
        if num_external_tokens == 0 or lookup is None:
            return
        first_approximate = self.load_plan.allocated(state.req_id, lookup, all_block_ids,
                                                     num_external_tokens)
        if first_approximate is not None:
            self.requests.approximate(state, first_approximate)

    def _unqueue(self, state: RequestState) -> None:
        keys, state.queued_keys = state.queued_keys, []
        if keys:
            self.queued.unqueue(keys)

    # -- saves -----------------------------------------------------------------
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        self.stats_gate.event()
        state = self.requests.of(request)
        self._unqueue(state)
        save_slots = None
        try:
            delay, result, save_slots = self._finish(state, block_ids)
            return delay, result
        finally:
            if state.session is not None:
                # Its next turn reads what this one saved first: kept hot (sessions.py).
                self.sessions.turn_finished(state.session, state.saved_keys)
            self.requests.finished(state, save_slots)

    def _finish(self, state: RequestState, block_ids: list[int]
                ) -> tuple[bool, dict | None, list[int] | None]:
        request = state.request
        req_id = request.request_id
        # Blocks from a shifted load, everything computed after them, and blocks
        # vLLM's prefix cache handed over from such a request are approximate.
        exact = self.approximate.exact_prefix(state, block_ids, len(block_ids))
        tokens = request.all_token_ids
        # KV exists for the tokens fed to the model: never the last sampled one.
        n_tokens = min(request.num_computed_tokens, len(tokens) - 1)
        if not self.config.save_decode_tokens:
            n_tokens = min(n_tokens, request.num_prompt_tokens)
        n_blocks = min(n_tokens // self.block_size, len(block_ids))
        params = self._request_params(request)
        module = self._encodes_module(request)
        # The partial last block (tails.py): kept in host where its KV is exact, after
        # at least one full block (a tail alone is under any load's minimum), or as
        # part of a gap encoding (which layouts read token by token).
        tail = n_tokens - n_blocks * self.block_size if (
            module is None and exact > n_blocks and len(block_ids) > n_blocks
            and self.request_keys.shiftable(request)
            and (n_blocks or self.markers.is_gap_encoding(req_id))) else 0
        if module is None and (n_blocks + tail == 0
                               or params.get(request_params.SAVE) is False):
            return False, None, None
        keys = self._keys(request, n_blocks)
        if keys is None or len(keys) < n_blocks:
            return False, None if module is None else module_failed(
                module, "its request could not be keyed"), None
        if module is not None:
            refusal = self.modules.refusal(module, n_blocks, request.num_prompt_tokens)
            if refusal is None and exact < n_blocks:
                refusal = (f"module {module!r}: its encoding reused approximate KV from vLLM's "
                           f"prefix cache; register it again")
            if refusal:
                return False, module_failed(module, refusal), None
        exact = min(exact, n_blocks)
        namespace = self.request_keys.namespace(request)
        if exact < n_blocks:
            # Approximate KV: keep it off the exact keys, under keys only this run
            # has, where position-independent lookups still find it (host only:
            # nothing could find them after a restart).
            own = self.keyer.block_keys(tokens, derived_namespace(namespace, "approximate", req_id),
                                        n_blocks)
            keys = keys[:exact] + own[exact:]
        if tail:
            keys = keys + [self.tails.key(keys, n_blocks, namespace, tokens, tail)]
        seg_id = None
        if self.shifted is not None and self.request_keys.shiftable(request):
            seg_id = self.shifted.remember(tokens, keys, namespace,
                                           n_tokens=n_blocks * self.block_size + tail)
        # A save never evicts its own request's blocks: a conversation longer than
        # the host tier keeps its head (what the next turn loads first).
        own_keys = set(keys)
        state.saved_keys = keys
        claimed = self.host.reserve(keys, spare=own_keys.__contains__)
        slots = [slot for _, slot in claimed]
        for i, _ in claimed:  # saved afresh: a later hit on them is a host hit
            self.secondary.saved_afresh(keys[i])
        if tail and ((claimed and claimed[-1][0] == n_blocks) or self.secondary):
            self.tails.saved(keys, n_blocks, namespace, tokens, tail)
        if claimed:
            self._saves.append(BlockTransfer(req_id, [block_ids[i] for i, _ in claimed], slots))
        # Below host: the exact full blocks, and the tail (exact whenever there is one),
        # so a history pushed out of host reloads its last partial block too.
        below = n_blocks + 1 if tail else exact
        writes = self.secondary.plan_writes(req_id, keys[:below], block_ids[:below])
        result = None
        if module is not None:
            result = self.modules.pin(module, keys, seg_id,
                                      tuple(tokens[:request.num_prompt_tokens]))
            if self.shared is not None and result[request_params.RESULT]["ok"]:
                self.shared.publish(module, tokens, keys, namespace)
        if not claimed and not writes:
            return False, result, None
        logger.debug("promptcache: request %s finished; saving %d of its %d full blocks to "
                     "host (%d exact), %d below host", req_id, len(slots), n_blocks, exact, writes)
        # Keep the blocks until the worker reports the save done (get_finished).
        return True, result, slots

    def _abort_slots(self, slots: list[int]) -> None:
        """Writes into these host slots failed: release them, and drop every module
        pinned on one of them (its own save, or another request's save or
        promotion of the same blocks)."""
        released = set(self.host.abort(slots))
        if released:
            self.modules.slots_lost(released)

    # -- per step --------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any) -> PromptCacheMetadata:
        for req_id in compat.preempted_req_ids(scheduler_output):
            self.stats_gate.event()
            state = self.requests.get(req_id)
            if state is not None:
                self.requests.preempted(state)
        self.approximate.step(self.requests.running())
        self.step_timings.scheduled(scheduler_output)
        if self.secondary:
            self._prefetch_answered()
            self._promote_session_heads()
        if self.shared is not None:
            self.shared.sync()
        writes, promotions = self.secondary.take_metadata()
        loads, shifted_loads, shared_blocks = self.load_plan.take()
        meta = PromptCacheMetadata(loads=loads, shifted_loads=shifted_loads,
                                   shared_blocks=shared_blocks, saves=self._saves,
                                   tier_writes=writes, promotions=promotions,
                                   no_forward=getattr(scheduler_output,
                                                      "total_num_scheduled_tokens", None) == 0)
        self._saves = []
        if not meta.is_empty():
            self.stats_gate.event()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        worker_meta = compat.worker_meta_of(connector_output)
        if worker_meta is not None or connector_output.finished_sending:
            self.stats_gate.event()
        if worker_meta is not None:
            # One rank may fail steps before the last rank finishes (vLLM reports
            # finished_sending once every rank is done): remember failures until then.
            for req_id in worker_meta.failed_saves:
                state = self.requests.get(req_id)
                if state is not None and state.save_slots is not None:
                    state.save_failed = True
        for req_id in connector_output.finished_sending or ():
            state = self.requests.save_reported(req_id)
            if state is None:
                continue
            slots = state.save_slots
            if state.save_failed:
                self._abort_slots(slots)
                self.stats.inc("save_failures_total", len(slots), tier="host")
            else:
                self.host.commit(slots)
        if worker_meta is not None:
            self.secondary.on_worker_meta(worker_meta)

    def has_pending_work(self) -> bool:
        return bool(self._saves or self.requests.saving() or self.secondary.has_pending_work())

    def get_kv_connector_stats(self) -> PromptCacheStats | None:
        if self.stats_gate.due():
            self._gather_stats()
        return self.stats.take()

    def _gather_stats(self) -> None:
        self._report_delta("host", self.host.evictions, "evictions_total")
        self.stats.set("tier_bytes_in_use", self.host.bytes_in_use * self.world_size, tier="host")
        self.stats.set("tier_capacity_bytes", self.host.capacity_bytes * self.world_size, tier="host")
        self.stats.set("pinned_modules", len(self.modules))
        if self.requests.preemptions > self._reported_preemptions:
            self.stats.inc("preemptions_seen_total",
                           self.requests.preemptions - self._reported_preemptions)
            self._reported_preemptions = self.requests.preemptions
        if self.layouts is not None:
            for template in self.layouts.take_missing():
                self.stats.gaps_missing(template)
        self.secondary.report_stats()
        self.cost.export(self.stats)
        if self.remote is not None:  # the lookups' side of the store (the worker reports its own)
            export_store_counts(self.stats, self.remote.store.take_counts())

    def _report_delta(self, name: str, total: int, metric: str, tier: str | None = None) -> None:
        new = total - self._reported[name]
        if new:
            self.stats.inc(metric, new, tier=tier or name)
            self._reported[name] = total

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self.approximate.bind(kv_cache_manager)

    def reset_cache(self) -> bool:
        """vLLM reset its prefix cache and asks the connector to reset too (RLHF weight
        updates go through here).  Either nothing stored so far is ever served again,
        or the reset is refused, and the log says why."""
        if compat.prefix_cache_in_use(self.approximate.kv_cache_manager):
            # vLLM 0.32 asks even when its own reset failed (running requests hold
            # blocks): its prefix cache still hands out blocks, approximate ones among
            # them, so the marks must stay.
            logger.warning("promptcache: cache reset refused: vLLM's prefix cache still "
                           "holds blocks of running requests (its own reset failed); retry "
                           "when they finish, or reset with reset_running_requests=True")
            return False
        self.approximate.reset()
        modules = self.modules.drop_all()
        if self.shifted is not None:
            self.shifted.clear()
        if self.layouts is not None:
            self.layouts.clear()
        dropped = self.host.clear()
        # KV on disk and in the remote store was made by the weights before the reset:
        # a new key epoch makes all of it unreachable for this engine at once (it ages
        # out under the caps; other engines sharing the store keep theirs).  Keys of
        # requests already known are computed again; their queued marks go.
        self.keyer.new_epoch()
        if self.shared is not None:
            # Other engines' shared modules were made by the weights before the reset.
            self.shared = None
            logger.warning("promptcache: modules shared through the remote store are off "
                           "until this engine restarts (the reset changed its weights' KV)")
        self.request_keys.clear()
        self.queued.clear()
        self.requests.reset()
        self.resets += 1
        self.stats.inc("resets_total")
        self.stats_gate.event()
        logger.info("promptcache: cache reset: %d host blocks dropped, %d prompt module(s) "
                    "dropped%s; disk and remote KV of before the reset is never served again "
                    "by this engine", dropped, len(modules),
                    f" ({', '.join(map(repr, modules))}: register them again)" if modules else "")
        return True
