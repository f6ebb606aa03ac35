"""The plugin's counters: collected on both connector sides, exported by vLLM.

Both sides fill a `PromptCacheStats` payload each step (the scheduler side: lookups,
hits, evictions, tier occupancy; the worker side: bytes and seconds moved).  vLLM
aggregates the payloads and hands them to `PromptCachePromMetrics`, which exports
them on the OpenAI server's `/metrics` as `vllm:promptcache_*`.  Offline,
`read_metrics(llm)` reads the same numbers through `LLM.get_metrics()`.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .compat import stats_bases

KVConnectorStats, KVConnectorPromMetrics = stats_bases()

PREFIX = "vllm:promptcache_"
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
# A histogram's observations kept per interval (a payload vLLM never collects stays bounded).
HISTOGRAM_CAP = 4096
# A payload of histogram observations alone (a step's hook timings, nothing else
# changed) is held back until it has HISTOGRAM_BATCH of them or is HISTOGRAM_HOLD_S
# old: a quiet step then ships nothing, and vLLM skips its whole stats path for it.
HISTOGRAM_BATCH = 256
HISTOGRAM_HOLD_S = 1.0
SCHEDULER_SECONDS_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
# Not a metric: keys of layout templates whose gap encoding the scheduler side could
# not find (modules/encoded_gaps.py); the front end's logger passes them on.
GAPS_MISSING = "gaps_missing"

# name -> (type, label: True for "tier", a name for another label, a tuple of names
# (the value passed as a tuple too), False for none, help)
METRICS: dict[str, tuple[str, bool, str]] = {
    "lookups_total": (COUNTER, False, "Requests looked up in the prompt cache."),
    "lookup_hits_total": (COUNTER, False, "Requests that loaded at least one block from the prompt cache."),
    "hit_tokens_total": (COUNTER, True, "Prompt tokens loaded from a prompt-cache tier instead of computed."),
    "loaded_bytes_total": (COUNTER, True, "KV bytes loaded from a tier into vLLM's paged cache."),
    "saved_bytes_total": (COUNTER, True, "KV bytes saved from vLLM's paged cache into a tier."),
    "load_seconds_total": (COUNTER, True, "Seconds spent loading KV from a tier."),
    "layerwise_loaded_bytes_total": (COUNTER, True, "KV bytes loaded layer by layer beside the forward (CPU backend; a subset of loaded_bytes_total)."),
    "save_seconds_total": (COUNTER, True, "Seconds spent saving KV into a tier (off the critical path)."),
    "saved_blocks_total": (COUNTER, True, "KV blocks saved into a tier."),
    "save_failures_total": (COUNTER, True, "Block saves that failed and were dropped (never served)."),
    "evictions_total": (COUNTER, True, "Blocks evicted from a tier."),
    "shifted_hit_tokens_total": (COUNTER, True, "Prompt tokens loaded at a new position (RoPE-shifted), a subset of hit_tokens_total."),
    "gap_tokens_total": (COUNTER, True, "Prompt tokens between modules (labels, separators, arguments) loaded from their encoding, a subset of hit_tokens_total."),
    "corrupt_blocks_total": (COUNTER, True, "Blocks found corrupt (header or checksum), deleted and treated as a miss."),
    "rejected_store_entries_total": (COUNTER, True, "Entries read from a tier (disk headers, shared segments and modules, remote values) whose checksum held but whose fields did not: skipped, never served."),
    "promoted_blocks_total": (COUNTER, True, "Blocks read from a tier into the host tier (disk to host)."),
    "direct_read_blocks_total": (COUNTER, True, "Blocks read from a tier below host in the step that loads them (a direct read)."),
    "load_errors_total": (COUNTER, True, "Blocks a load could not fill (a direct read failed or came late), reported to vLLM, which recomputes them."),
    "prefetch_blocks_total": (COUNTER, False, "Blocks a queued request needs that were read into host before its turn."),
    "prefetch_hit_blocks_total": (COUNTER, False, "Loaded blocks that a prefetch had brought into host."),
    "dropped_saves_total": (COUNTER, True, "Block saves dropped because a tier was full or busy (a future miss only)."),
    "skipped_writes_total": (COUNTER, True, "Block writes not made to a tier measured as slower to load from than recomputing (load_cost.py)."),
    "skipped_requests_total": (COUNTER, "reason", "Requests served uncached because their KV cannot be keyed safely, by reason."),
    "rejected_module_encodings_total": (COUNTER, False, "Requests that asked to encode a prompt module without the server's token (ignored)."),
    "remote_round_trips_total": (COUNTER, True, "Round trips to the shared remote store (worker side)."),
    "remote_failures_total": (COUNTER, True, "Remote store calls that failed or timed out (misses or dropped saves; serving goes on)."),
    "remote_reconnects_total": (COUNTER, True, "Times the remote store came back after being unreachable."),
    "remote_seconds_total": (COUNTER, True, "Seconds spent in remote store calls (off the step)."),
    "resets_total": (COUNTER, False, "Connector cache resets carried out (each drops every stored block from being served again)."),
    "preemptions_seen_total": (COUNTER, False, "Preempted requests the connector tracked (their blocks stay marked where approximate)."),
    "pinned_modules": (GAUGE, False, "Prompt modules whose KV is pinned in the host tier."),
    "tier_bytes_in_use": (GAUGE, True, "Bytes of a tier holding KV blocks."),
    "tier_capacity_bytes": (GAUGE, True, "The byte bound of a tier."),
    "tier_load_bytes_per_second": (GAUGE, True, "A tier's measured load rate per worker (load_cost.py), what load-or-recompute decisions are priced with."),
    "prefill_tokens_per_second": (GAUGE, False, "vLLM's measured prefill rate (load_cost.py), what recomputing a stored run is priced with."),
    "load_decisions_total": (COUNTER, ("tier", "decision"), "Found runs loaded, recomputed or split (head loaded, rest recomputed), by tier, from their measured cost."),
    "scheduler_seconds": (HISTOGRAM, "hook", "Seconds spent in the connector's scheduler-side hooks, per call."),
}


# A remote store's own counters (RemoteStore.take_counts) -> metrics with tier="remote".
REMOTE_STORE_COUNTERS = (("remote_round_trips_total", "round_trips"),
                         ("remote_failures_total", "failures"),
                         ("remote_reconnects_total", "reconnects"),
                         ("remote_seconds_total", "seconds"),
                         ("corrupt_blocks_total", "corrupt_blocks"),
                         ("rejected_store_entries_total", "rejected"),
                         ("dropped_saves_total", "dropped_puts"))


def export_store_counts(stats: "PromptCacheStats", counts: dict, tier: str = "remote") -> None:
    for metric, key in REMOTE_STORE_COUNTERS:
        if counts.get(key):
            stats.inc(metric, counts[key], tier=tier)


def _label_names(label: bool | str | tuple) -> list[str]:
    if isinstance(label, tuple):
        return list(label)
    return [label if isinstance(label, str) else "tier"] if label else []


_LABELS = ("tier", "reason", "decision", "hook")


def _label_of(labels: dict) -> str | None:
    return ",".join(labels[k] for k in _LABELS if labels.get(k)) or None


_UNSET = object()


def _key(name: str, tier: str | tuple | None) -> str:
    return f"{name}|{','.join(tier) if isinstance(tier, tuple) else tier or ''}"


def _split(key: str) -> tuple[str, str]:
    name, _, tier = key.partition("|")
    return name, tier


@dataclass
class PromptCacheStats(KVConnectorStats):
    """Payload: {"counter": {"name|tier": value}, "gauge": {...}}; plain dicts, so it
    crosses vLLM's IPC as is."""

    def __post_init__(self):
        if COUNTER not in self.data:
            self.reset()
        # The producer's memory across take(): each gauge's value as last shipped, and
        # when a payload last left (never shipped in the payload itself).
        self._shipped: dict[str, float] = {}
        self._shipped_at = time.monotonic()

    def reset(self):
        self.data = {COUNTER: {}, GAUGE: {}, HISTOGRAM: {}, GAPS_MISSING: []}

    def gaps_missing(self, template_key: bytes) -> None:
        if template_key.hex() not in self.data.setdefault(GAPS_MISSING, []):
            self.data[GAPS_MISSING].append(template_key.hex())

    def inc(self, name: str, value: float = 1, tier: str | None = None) -> None:
        assert METRICS[name][0] == COUNTER, name
        k = _key(name, tier)
        self.data[COUNTER][k] = self.data[COUNTER].get(k, 0) + value

    def set(self, name: str, value: float, tier: str | None = None) -> None:
        """A gauge's value, shipped only where it differs from the one last shipped
        (Prometheus keeps a gauge's last value): a step that changed nothing sends none."""
        assert METRICS[name][0] == GAUGE, name
        k = _key(name, tier)
        if self._shipped.get(k, _UNSET) == value:
            self.data[GAUGE].pop(k, None)
        else:
            self.data[GAUGE][k] = value

    def observe(self, name: str, value: float, tier: str | None = None) -> None:
        assert METRICS[name][0] == HISTOGRAM, name
        values = self.data.setdefault(HISTOGRAM, {}).setdefault(_key(name, tier), [])
        if len(values) < HISTOGRAM_CAP:
            values.append(value)

    @contextmanager
    def timed(self, hook: str):
        """`with stats.timed("build_connector_meta"):` -> promptcache_scheduler_seconds{hook}."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe("scheduler_seconds", time.perf_counter() - start, tier=hook)

    def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
        if other is None or other.is_empty():
            return self
        for k, v in other.data.get(COUNTER, {}).items():
            self.data[COUNTER][k] = self.data[COUNTER].get(k, 0) + v
        self.data[GAUGE].update(other.data.get(GAUGE, {}))
        for k, values in other.data.get(HISTOGRAM, {}).items():
            mine = self.data.setdefault(HISTOGRAM, {}).setdefault(k, [])
            mine += values[:HISTOGRAM_CAP - len(mine)]
        missing = self.data.setdefault(GAPS_MISSING, [])
        missing += [k for k in other.data.get(GAPS_MISSING, ()) if k not in missing]
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {}
        for kind in (COUNTER, GAUGE):
            for k, v in self.data[kind].items():
                name, tier = _split(k)
                out[f"promptcache_{name}" + (f"[{tier}]" if tier else "")] = round(v, 6)
        for k, values in self.data.get(HISTOGRAM, {}).items():
            name, tier = _split(k)
            out[f"promptcache_{name}_count" + (f"[{tier}]" if tier else "")] = len(values)
        return out

    def is_empty(self) -> bool:
        return not (self.data.get(COUNTER) or self.data.get(GAUGE)
                    or self.data.get(HISTOGRAM) or self.data.get(GAPS_MISSING))

    def take(self) -> "PromptCacheStats | None":
        """This interval's payload, leaving self empty for the next one; None while
        there is nothing to ship, or only a few histogram observations (see
        HISTOGRAM_BATCH: they go with the next payload)."""
        if self.is_empty() or self._only_a_few_observations():
            return None
        out = PromptCacheStats(data=self.data)
        self._shipped.update(self.data[GAUGE])
        self._shipped_at = time.monotonic()
        self.reset()
        return out

    def _only_a_few_observations(self) -> bool:
        d = self.data
        if d.get(COUNTER) or d.get(GAUGE) or d.get(GAPS_MISSING):
            return False
        held = sum(len(v) for v in d.get(HISTOGRAM, {}).values())
        return held < HISTOGRAM_BATCH and time.monotonic() - self._shipped_at < HISTOGRAM_HOLD_S


# Why a request is served uncached (connector/request_keys.py's `Unkeyable`): the
# `reason` series of skipped_requests_total that exist from start-up.
SKIP_REASONS = ("lora_unresolved", "mm_no_identifier", "no_extra_keys_api", "extra_keys_error")


def configured(kv_transfer_config: Any) -> Any:
    """The PromptCacheConfig the engine runs with, as the front end sees it (not
    validated again: the engine's copy lacks the server's secrets)."""
    from .config import FLAGS, PromptCacheConfig

    extra = (getattr(kv_transfer_config, "kv_connector_extra_config", None) or {}).get(
        "promptcache", {})
    return PromptCacheConfig(**{k: v for k, v in extra.items() if k in FLAGS})


def zero_series(config: Any) -> list[tuple[str, tuple[str, ...], float]]:
    """(metric, label values, value) of each series that exists from start-up: every
    unlabelled metric, every tier-labelled one for each configured tier (remote_* for
    the remote tier), and every skip reason; 0, except the host and disk tiers'
    capacities.  Metrics with other
    labels (hooks, decisions) appear with their first value."""
    capacity = {"host": config.host_bytes, "disk": config.disk_bytes}
    out = []
    for name, (kind, label, _) in METRICS.items():
        if label is False:
            out.append((name, (), 0.0))
        elif label is True:
            tiers = ("remote",) if name.startswith("remote_") else config.tiers
            out += [(name, (tier,), float(capacity.get(tier, 0))
                     if name == "tier_capacity_bytes" else 0.0)
                    for tier in tiers if tier in config.tiers]
        elif label == "reason":
            out += [(name, (reason,), 0.0) for reason in SKIP_REASONS]
    return out


class PromptCachePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._families = {}
        for name, (kind, label, doc) in METRICS.items():
            labels = list(labelnames) + _label_names(label)
            if kind == COUNTER:
                fam = self._counter_cls(name=PREFIX + name, documentation=doc, labelnames=labels)
            elif kind == HISTOGRAM:
                fam = self._histogram_cls(name=PREFIX + name, documentation=doc,
                                          labelnames=labels, buckets=SCHEDULER_SECONDS_BUCKETS)
            else:
                fam = self._gauge_cls(name=PREFIX + name, documentation=doc, labelnames=labels,
                                      multiprocess_mode="mostrecent")
            self._families[name] = fam
        # Every series a dashboard reads exists from start-up (at 0, capacities at
        # their bound), not only once something first increments it.
        config = configured(vllm_config.kv_transfer_config)
        for base in self.per_engine_labelvalues.values():
            for name, values, value in zero_series(config):
                child = self._families[name].labels(*base, *values)
                if value:
                    child.set(value)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        from .modules.encoded_gaps import engine_reported

        engine_reported(transfer_stats_data.get(GAPS_MISSING) or ())
        base = list(self.per_engine_labelvalues[engine_idx])
        for kind in (COUNTER, GAUGE, HISTOGRAM):
            for k, v in transfer_stats_data.get(kind, {}).items():
                name, tier = _split(k)
                if name not in self._families:
                    continue
                label = METRICS[name][1]
                values = tier.split(",") if isinstance(label, tuple) else [tier] if label else []
                child = self._families[name].labels(*(base + values))
                if kind == COUNTER:
                    child.inc(v)
                elif kind == HISTOGRAM:
                    for x in v:
                        child.observe(x)
                else:
                    child.set(v)


# ---------------------------------------------------------------------------
# Reading the numbers back
# ---------------------------------------------------------------------------

Snapshot = dict[str, Any]  # name -> value, or name -> {tier: value}


def _put(snap: Snapshot, name: str, tier: str | None, value: float) -> None:
    if tier:
        snap.setdefault(name, {})
        snap[name][tier] = snap[name].get(tier, 0) + value
    else:
        snap[name] = snap.get(name, 0) + value


def read_metrics(llm: Any = None) -> Snapshot:
    """The prompt cache's counters, offline: `read_metrics(llm)["hit_tokens_total"]["host"]`.

    Needs vLLM's stat logging, which `engine_kwargs()` keeps on.  Reads this
    process's Prometheus registry, as `LLM.get_metrics()` does, but keeps float
    values (vLLM's reader truncates counters to integers, which would zero the
    `*_seconds_total` counters).  vLLM re-registers its metrics for each new
    engine, so the figures are those of the most recently built LLM.
    """
    from prometheus_client import REGISTRY

    if llm is not None and getattr(getattr(llm, "llm_engine", None), "log_stats", True) is False:
        raise RuntimeError("read_metrics needs stat logging: build the LLM with "
                           "engine_kwargs() or disable_log_stats=False")
    snap: Snapshot = {}
    for family in REGISTRY.collect():
        if not family.name.startswith(PREFIX):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            _put(snap, sample.name[len(PREFIX):], _label_of(sample.labels), float(sample.value))
    return snap


_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')


def parse_prometheus(text: str) -> Snapshot:
    """The prompt cache's counters from a `/metrics` page."""
    snap: Snapshot = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or not m.group("name").startswith(PREFIX) \
                or m.group("name").endswith(("_created", "_bucket")):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels") or ""))
        _put(snap, m.group("name")[len(PREFIX):], _label_of(labels), float(m.group("value")))
    return snap
