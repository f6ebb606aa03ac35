"""The plugin's one configuration object, and the three ways to build it.

Precedence, lowest first: defaults, the YAML file (`--promptcache-config` or
VLLM_PROMPTCACHE_CONFIG), VLLM_PROMPTCACHE_* environment variables, then CLI
flags or `engine_kwargs()` arguments.  Every source ends in
`PromptCacheConfig.validate()`, which names the bad option and its allowed range.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

ENV_PREFIX = "VLLM_PROMPTCACHE_"
EVICTION_POLICIES = ("scheduler-aware", "lru")
DEFAULT_DISK_DIR = os.path.join("~", ".cache", "vllm-promptcache", "kv")
# The CLI flag of each field, used in error messages and by the CLI hook.
FLAGS = {
    "host_gb": "--promptcache-host-gb",
    "eviction_policy": "--promptcache-eviction-policy",
    "save_decode_tokens": "--promptcache-save-decode-tokens",
    "min_load_blocks": "--promptcache-min-load-blocks",
    "disk_path": "--promptcache-disk-path",
    "disk_gb": "--promptcache-disk-gb",
    "position_independent": "--promptcache-position-independent",
    "truncate": "--promptcache-truncate",
    "recompute_ratio": "--promptcache-recompute-ratio",
    "modules_file": "--promptcache-modules",
    "model_id": "--promptcache-model-id",
    "admin_key": "--promptcache-admin-key",
    "max_module_tokens": "--promptcache-max-module-tokens",
    "max_request_bytes": "--promptcache-max-request-bytes",
    "remote_url": "--promptcache-remote-url",
    "remote_timeout_ms": "--promptcache-remote-timeout-ms",
    "remote_secret": "--promptcache-remote-secret",
    "load_cpu": "--promptcache-load-cpu",
}
# Kept in the API server process only: never put into the engine's config (which
# vLLM logs), never shown in the summary.
SERVER_ONLY_FIELDS = ("admin_key", "remote_secret")
# VLLM_PROMPTCACHE_* variables that are not options: read elsewhere, never refused.
OTHER_ENV = ("config", "model_dir", "remote_password", "test_device", "test_dtype",
             "vllm033_src")


class PromptCacheConfigError(ValueError):
    """A configuration value is out of range or of the wrong type."""


@dataclass(frozen=True)
class PromptCacheConfig:
    # Host-RAM tier size in GiB: one buffer allocated at start, never exceeded.
    host_gb: float = 4.0
    # Which eviction policy the host and disk tiers use: "scheduler-aware" keeps
    # blocks of queued requests and evicts conversations with nothing queued
    # first (CachedAttention); "lru" ignores the queue.
    eviction_policy: str = "scheduler-aware"
    # Save the KV of generated tokens too (multi-turn reuse needs it).
    save_decode_tokens: bool = True
    # Smallest run of blocks worth loading; shorter hits are recomputed.
    min_load_blocks: int = 1
    # Disk tier: a directory of KV files, written through on every save and kept
    # across restarts.  "" means DEFAULT_DISK_DIR.
    disk_path: str = ""
    # Disk tier cap in GiB; 0 turns the disk tier off.
    disk_gb: float = 32.0
    # Reuse stored KV wherever its tokens reappear, not only as a prefix: K is
    # rotated to the new position (RoPE shift).  Approximate where the earlier
    # context differs (e.g. after the oldest turns were dropped), so opt-in.
    position_independent: bool = False
    # OpenAI server: a chat over max_model_len drops its oldest turns (keeping the
    # system prompt and the newest turns) instead of failing; implies
    # position_independent, so the kept turns' KV is reused at its new position.
    truncate: bool = False
    # Boundary fix for KV found at other positions (prompt modules, truncation):
    # the last `recompute_ratio` of the tokens a shifted load would bring are
    # prefilled instead, so they (and the prompt after them) attend to the
    # modules actually before them.  0 loads all; CacheBlend recomputes ~0.15.
    recompute_ratio: float = 0.0
    # OpenAI server: prompt modules registered at start-up, from a PML schema
    # file (.xml/.pml) or a YAML/JSON mapping of name: text.  Implies
    # position_independent, so modules are found in any order and at any offset.
    modules_file: str = ""
    # The weights' identity for the persistent tiers, instead of the one derived
    # from the model's files or hub revision (e.g. a release name); KV saved under
    # one id is never served under another.
    model_id: str = ""
    # OpenAI server: registering or replacing modules over HTTP needs this key in
    # the X-PromptCache-Admin-Key header; "" turns HTTP registration off.
    admin_key: str = ""
    # OpenAI server: the longest module, in tokens, and the largest body the
    # module route reads (HTTP 413 beyond either).
    max_module_tokens: int = 32768
    max_request_bytes: int = 8 << 20
    # A store shared by several servers, below disk: redis://HOST:PORT/DB,
    # rediss://..., unix:///path.sock, redis+cluster://h:p,h:p.  "" = off.
    remote_url: str = ""
    # Lookups slower than this are misses; a step never waits on the network.
    remote_timeout_ms: int = 50
    # The key of every value's checksum, shared by the instances (>= 16 bytes);
    # kept out of the engine's (logged) config: it travels in the environment.
    remote_secret: str = ""
    # CPU backend: the CPU a thread of the worker moves a step's loads on, layer by
    # layer beside the forward (each attention layer waits only for its own layer).
    # "auto": a CPU the worker's OpenMP threads do not compute on, where there is one
    # (vLLM reserves one per rank when a KV connector is set); "off": loads run
    # before the forward; or a CPU number.
    load_cpu: str = "auto"

    def validate(self) -> "PromptCacheConfig":
        def bad(name: str, allowed: str) -> PromptCacheConfigError:
            value = getattr(self, name)
            return PromptCacheConfigError(
                f"invalid promptcache option {FLAGS[name]} "
                f"(field '{name}', env {ENV_PREFIX}{name.upper()}): got {value!r}; "
                f"allowed: {allowed}")

        if not isinstance(self.host_gb, (int, float)) or isinstance(self.host_gb, bool) \
                or not (0 < self.host_gb <= 4096):
            raise bad("host_gb", "a number of GiB in (0, 4096]")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise bad("eviction_policy", f"one of {', '.join(EVICTION_POLICIES)}")
        if not isinstance(self.save_decode_tokens, bool):
            raise bad("save_decode_tokens", "true or false")
        if not isinstance(self.min_load_blocks, int) or isinstance(self.min_load_blocks, bool) \
                or not (1 <= self.min_load_blocks <= 1 << 20):
            raise bad("min_load_blocks", "an integer in [1, 1048576]")
        if not isinstance(self.disk_gb, (int, float)) or isinstance(self.disk_gb, bool) \
                or not (0 <= self.disk_gb <= 1 << 20):
            raise bad("disk_gb", "a number of GiB in [0, 1048576]; 0 turns the disk tier off")
        if not isinstance(self.position_independent, bool):
            raise bad("position_independent", "true or false")
        if not isinstance(self.truncate, bool):
            raise bad("truncate", "true or false")
        if not isinstance(self.recompute_ratio, (int, float)) or isinstance(self.recompute_ratio, bool) \
                or not (0 <= self.recompute_ratio < 1):
            raise bad("recompute_ratio", "a fraction in [0, 1)")
        if not isinstance(self.modules_file, str):
            raise bad("modules_file", "a file path")
        if not isinstance(self.model_id, str) or len(self.model_id) > 512:
            raise bad("model_id", "a string of at most 512 characters")
        if not isinstance(self.admin_key, str) or (self.admin_key and len(self.admin_key) < 16):
            raise bad("admin_key", "a string of at least 16 characters, or empty (HTTP "
                                   "registration off)")
        if not isinstance(self.max_module_tokens, int) or isinstance(self.max_module_tokens, bool) \
                or not (32 <= self.max_module_tokens <= 1 << 24):
            raise bad("max_module_tokens", "an integer in [32, 16777216]")
        if not isinstance(self.max_request_bytes, int) or isinstance(self.max_request_bytes, bool) \
                or not (1024 <= self.max_request_bytes <= 1 << 32):
            raise bad("max_request_bytes", "an integer number of bytes in [1024, 4294967296]")
        if not isinstance(self.remote_url, str):
            raise bad("remote_url", "a redis://, rediss://, unix:// or redis+cluster:// URL")
        if self.remote_url:
            from .store.remote_url import RemoteURLError, parse_remote_url

            try:
                parse_remote_url(self.remote_url, environ={})
            except RemoteURLError as e:
                raise PromptCacheConfigError(str(e)) from None
        if not isinstance(self.remote_timeout_ms, int) or isinstance(self.remote_timeout_ms, bool) \
                or not (1 <= self.remote_timeout_ms <= 60000):
            raise bad("remote_timeout_ms", "an integer number of milliseconds in [1, 60000]")
        if not isinstance(self.remote_secret, str):
            raise bad("remote_secret", "a string of at least 16 characters")
        if isinstance(self.load_cpu, int) and not isinstance(self.load_cpu, bool):
            return dataclasses.replace(self, load_cpu=str(self.load_cpu)).validate()
        if not isinstance(self.load_cpu, str) or not (
                self.load_cpu in ("auto", "off")
                or (self.load_cpu.isdigit() and int(self.load_cpu) < 1 << 16)):
            raise bad("load_cpu", "auto, off, or a CPU number")
        if (self.truncate or self.modules_file) and not self.position_independent:
            return dataclasses.replace(self, position_independent=True).validate()
        if not isinstance(self.disk_path, str):
            raise bad("disk_path", "a directory path")
        return self

    @property
    def disk_enabled(self) -> bool:
        return self.disk_gb > 0

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_gb * (1 << 30))

    @property
    def disk_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(self.disk_path or DEFAULT_DISK_DIR))

    @property
    def host_bytes(self) -> int:
        return int(self.host_gb * (1 << 30))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def engine_dict(self) -> dict[str, Any]:
        """The options the engine needs: server-only secrets left out."""
        return {k: v for k, v in self.to_dict().items() if k not in SERVER_ONLY_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "PromptCacheConfig":
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise PromptCacheConfigError(
                    f"unknown promptcache option {key!r} in {source}; "
                    f"known options: {', '.join(sorted(known))}")
            values[name] = _coerce(known[name], raw, source)
        return cls(**values).validate()

    def summary(self) -> str:
        disk = (f"disk tier {self.disk_gb:g} GiB at {self.disk_dir}" if self.disk_enabled
                else "disk tier off")
        return (f"host tier {self.host_gb:g} GiB, {disk}, eviction {self.eviction_policy}, "
                f"save decode tokens: {self.save_decode_tokens}, "
                f"min load blocks: {self.min_load_blocks}, "
                f"position-independent reuse: {self.position_independent}, "
                f"truncate: {self.truncate}, recompute ratio: {self.recompute_ratio:g}, "
                f"modules file: {self.modules_file or '-'}, "
                f"model id: {self.model_id or '(from the weights)'}, "
                f"module registration over HTTP: {'on' if self.admin_key else 'off'}, "
                f"remote tier: {_masked(self.remote_url) if self.remote_url else 'off'}, "
                f"load CPU: {self.load_cpu}")


def _coerce(f: dataclasses.Field, raw: Any, source: str) -> Any:
    """Turn strings from the environment or CLI into the field's type."""
    target = f.type if isinstance(f.type, type) else {"float": float, "int": int, "bool": bool,
                                                      "str": str}.get(str(f.type), str)
    if not isinstance(raw, str):
        if target is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        return raw
    text = raw.strip()
    try:
        if target is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if target is int:
            return int(text)
        if target is float:
            return float(text)
    except ValueError:
        raise PromptCacheConfigError(
            f"invalid promptcache option {FLAGS[f.name]} "
            f"(field '{f.name}') in {source}: {raw!r} is not a {target.__name__}") from None
    return text


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise PromptCacheConfigError(f"--promptcache-config: no such file: {path}") from None
    except yaml.YAMLError as e:
        raise PromptCacheConfigError(f"--promptcache-config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PromptCacheConfigError(
            f"--promptcache-config: {path} must hold a mapping of option: value, "
            f"got {type(data).__name__}")
    # Accept both a flat file and one nested under `promptcache:`.
    inner = data.get("promptcache", data)
    if not isinstance(inner, dict):
        raise PromptCacheConfigError(f"--promptcache-config: 'promptcache' in {path} must be a mapping")
    return inner


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(PromptCacheConfig)}
    out = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            if name in names:
                out[name] = value
            elif name not in OTHER_ENV:
                raise PromptCacheConfigError(
                    f"unknown environment variable {key}; known: "
                    + ", ".join(ENV_PREFIX + n.upper() for n in sorted(names)))
    return out


def build_config(config_file: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> PromptCacheConfig:
    """Merge defaults < YAML < environment < explicit overrides, then validate."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        merged.update(PromptCacheConfig.from_dict(load_yaml(config_file), str(config_file)).to_dict())
    for name, raw in env_values(environ).items():
        merged[name] = _coerce(_field(name), raw, f"environment variable {ENV_PREFIX}{name.upper()}")
    for name, value in (overrides or {}).items():
        if value is not None:
            merged[name] = value
    config = PromptCacheConfig.from_dict(merged, "promptcache options")
    if config.disk_enabled:
        # Fail at start-up, before any engine exists, not at the first save.
        from .store.disk_tier import DiskTierError, prepare_directory

        try:
            prepare_directory(config.disk_dir)
        except DiskTierError as e:
            raise PromptCacheConfigError(f"invalid promptcache option {FLAGS['disk_path']}: {e}") from None
    return config


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in fields(PromptCacheConfig)}[name]


def _masked(url: str) -> str:
    from .store.remote_url import parse_remote_url

    try:
        return parse_remote_url(url, environ={}).masked()
    except ValueError:
        return "(invalid)"
