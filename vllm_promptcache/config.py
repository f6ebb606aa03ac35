"""The plugin's one configuration object, and the three ways to build it.

Every option is written once, as a field of `PromptCacheConfig`: its default, and
in the field's metadata its flag, help, allowed values and whether it stays in the
API server (`server_only`).  The CLI group (plugin.py), `FLAGS`, the error
messages and the README's options table (`python -m vllm_promptcache.config
--options-table`) are generated from the fields.

Precedence, lowest first: defaults, the YAML file (`--promptcache-config` or
PROMPTCACHE_CONFIG), PROMPTCACHE_* environment variables, then CLI flags or
`engine_kwargs()` arguments.  Every source ends in `PromptCacheConfig.validate()`,
which names the bad option and its allowed values, and refuses combinations that
could not work before any engine starts.

The variables are PROMPTCACHE_*, outside vLLM's VLLM_* namespace (vLLM warns about
every VLLM_* name it does not know).  The old VLLM_PROMPTCACHE_* names still work
for one release, with a deprecation warning.

Secrets (the admin key, the remote tier's secret, the remote store's password) are
never logged: they are left out of the engine's config (which vLLM logs), shown as
`***` in the summary, and each has a file form (`--promptcache-admin-key-file`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .store.policies import POLICIES
from .store.remote_url import PASSWORD_ENV

logger = logging.getLogger("vllm.promptcache")

ENV_PREFIX = "PROMPTCACHE_"
LEGACY_ENV_PREFIX = "VLLM_PROMPTCACHE_"  # until the next release
EVICTION_POLICIES = tuple(POLICIES)
CALIBRATION_MODES = ("enforce", "warn", "off")
# connector/load_cost.py: MEASURED, ALWAYS_LOAD (not imported: config.py stays at the root)
LOAD_DECISION_MODES = ("measured", "always-load")
DEFAULT_DISK_DIR = os.path.join("~", ".cache", "vllm-promptcache", "kv")
MIN_SECRET_CHARS = 16
# The remote tier's secret and the store's password reach the engine's processes
# through their environment, never through the engine's (logged) config.
REMOTE_SECRET_ENV = ENV_PREFIX + "REMOTE_SECRET"  # store.remote_store.SECRET_ENV (a test checks)
REMOTE_PASSWORD_ENV = PASSWORD_ENV
# The two flags that are not fields: the switch, and the YAML file.
SWITCH_FLAG, SWITCH_HELP = "--promptcache", "Turn the prompt cache on (a KV connector)."
CONFIG_FLAG, CONFIG_ENV = "--promptcache-config", ENV_PREFIX + "CONFIG"
CONFIG_HELP = "A YAML mapping of the keys below (flat, or under `promptcache:`)."
# PROMPTCACHE_* variables that are not options: read elsewhere, never refused.
OTHER_ENV = ("bench_allow_noisy", "config", "model_dir", "module_token", "native",
             "native_dir", "remote_password", "test_device", "test_dtype", "vllm033_src")


class PromptCacheConfigError(ValueError):
    """A configuration value is out of range or of the wrong type."""


def option(default: Any, flag: str, help: str, allowed: str, *, metavar: str | None = None,
           default_text: str | None = None, server_only: bool = False, secret: bool = False,
           bounds: tuple[str, float, float, str] | None = None) -> Any:
    """A field of PromptCacheConfig with everything the CLI, the environment, the
    errors and the README say about it.  `bounds` = ("(" or "[", low, high, ")" or
    "]") checks a number; `secret` values are never shown; `server_only` ones stay
    in the API server process (left out of the engine's config)."""
    return field(default=default, metadata=dict(
        flag=flag, help=help, allowed=allowed, metavar=metavar, default_text=default_text,
        server_only=server_only or secret, secret=secret, bounds=bounds))


@dataclass(frozen=True)
class PromptCacheConfig:
    host_gb: float = option(
        4.0, "--promptcache-host-gb", "Host-RAM tier size: one buffer allocated at start, "
        "never exceeded.", "a number of GiB in (0, 4096]", metavar="GIB",
        bounds=("(", 0, 4096, "]"))
    disk_path: str = option(
        "", "--promptcache-disk-path", "Disk tier: a directory of KV files, written through on "
        "every save and kept across restarts.", "a writable directory", metavar="DIR",
        default_text=f"`{DEFAULT_DISK_DIR}`")
    disk_gb: float = option(
        32.0, "--promptcache-disk-gb", "Disk tier cap.",
        "a number of GiB in [0, 1048576]; 0 turns the disk tier off", metavar="GIB",
        bounds=("[", 0, 1 << 20, "]"))
    disk_reclaim_others: bool = option(
        False, "--promptcache-disk-reclaim-others", "Disk tier: also evict other model "
        "fingerprints' files under the same directory (another model's engine on this host "
        "keeps its own by default).", "on or off")
    load_decisions: str = option(
        "measured", "--promptcache-load-decisions", "Load a stored run only where its "
        "measured load time beats recomputing it (measured), or always load it "
        "(always-load: benchmarks, tiers known to be fast).",
        f"one of {', '.join(LOAD_DECISION_MODES)}", metavar="MODE")
    position_independent: bool = option(
        False, "--promptcache-position-independent", "Reuse stored KV wherever its tokens "
        "reappear, not only as a prefix: K is rotated to the new position (RoPE shift). "
        "Approximate where the earlier context differs, so opt-in.", "on or off")
    truncate: bool = option(
        False, "--promptcache-truncate", "OpenAI server: a chat over `max_model_len` drops its "
        "oldest turns (keeping the system prompt and the newest turns) instead of failing; "
        "implies position-independent.", "on or off")
    recompute_ratio: float = option(
        0.0, "--promptcache-recompute-ratio", "Of the tokens found at other positions (prompt "
        "modules, truncated chats), prefill this last fraction instead of loading it, so the "
        "prompt after them attends to what is really before it (CacheBlend: about 0.15).",
        "a fraction in [0, 1)", metavar="FRACTION", bounds=("[", 0, 1, ")"))
    modules_file: str = option(
        "", "--promptcache-modules", "OpenAI server: prompt modules registered at start-up, "
        "from a PML schema (.xml/.pml) or a YAML/JSON mapping of name: text; implies "
        "position-independent.", "a file path", metavar="FILE")
    eviction_policy: str = option(
        "scheduler-aware", "--promptcache-eviction-policy", "How the host and disk tiers evict: "
        "scheduler-aware keeps blocks of queued requests (CachedAttention); lru ignores the "
        "queue.", f"one of {', '.join(EVICTION_POLICIES)}", metavar="NAME")
    save_decode_tokens: bool = option(
        True, "--promptcache-save-decode-tokens", "Save the KV of generated tokens too "
        "(multi-turn reuse needs it).", "on or off")
    min_load_blocks: int = option(
        1, "--promptcache-min-load-blocks", "Shortest hit worth loading; shorter ones are "
        "recomputed.", "an integer in [1, 1048576]", metavar="N", bounds=("[", 1, 1 << 20, "]"))
    model_id: str = option(
        "", "--promptcache-model-id", "The weights' identity in the persistent tiers, instead "
        "of the one derived from the model's files or hub revision; KV saved under one id is "
        "never served under another.", "a string of at most 512 characters", metavar="ID",
        default_text="derived from the weights")
    calibration: str = option(
        "enforce", "--promptcache-calibration", "What a position-independent engine does when "
        "the model's calibration (`vllm-promptcache calibrate`) found no recompute ratio "
        "within its bound: enforce (refuse to start), warn (log and start); off ignores the "
        "calibration. A calibrated ratio replaces a configured 0.", f"one of {', '.join(CALIBRATION_MODES)}", metavar="MODE")
    admin_key: str = option(
        "", "--promptcache-admin-key", "OpenAI server: the key that POST "
        "/v1/promptcache/modules needs in its X-PromptCache-Admin-Key header (beside "
        "`--api-key`); unset, HTTP registration is off.",
        f"at least {MIN_SECRET_CHARS} characters", metavar="KEY", secret=True,
        default_text="(HTTP registration off)")
    admin_key_file: str = option(
        "", "--promptcache-admin-key-file", "A file holding the admin key (its first line).",
        "a readable file", metavar="PATH", server_only=True)
    max_module_tokens: int = option(
        32768, "--promptcache-max-module-tokens", "OpenAI server: the longest module it "
        "registers (HTTP 413 beyond).", "an integer in [32, 16777216]", metavar="N",
        bounds=("[", 32, 1 << 24, "]"))
    max_request_bytes: int = option(
        8 << 20, "--promptcache-max-request-bytes", "OpenAI server: the largest body the "
        "module route reads (HTTP 413 beyond).", "an integer number of bytes in "
        "[1024, 4294967296]", metavar="BYTES", bounds=("[", 1024, 1 << 32, "]"))
    remote_url: str = option(
        "", "--promptcache-remote-url", "A store shared by several servers, below disk (Redis "
        ">= 6 or Valkey). A password in it is never logged.",
        "redis://HOST:PORT/DB, rediss://..., unix:///path.sock or "
        "redis+cluster://HOST:PORT,HOST:PORT", metavar="URL", default_text="(off)")
    remote_password_file: str = option(
        "", "--promptcache-remote-password-file", "A file holding the remote store's password "
        "(its first line), for a URL without one.", "a readable file", metavar="PATH",
        server_only=True)
    remote_timeout_ms: int = option(
        50, "--promptcache-remote-timeout-ms", "Remote lookups slower than this are misses; a "
        "step never waits on the network.", "an integer number of milliseconds in [1, 60000]",
        metavar="MS", bounds=("[", 1, 60000, "]"))
    remote_secret: str = option(
        "", "--promptcache-remote-secret", "The key of every remote value's checksum, the same "
        "on every instance that shares the store.", f"at least {MIN_SECRET_CHARS} characters",
        metavar="SECRET", secret=True, default_text="(required with a remote URL)")
    remote_secret_file: str = option(
        "", "--promptcache-remote-secret-file", "A file holding the remote secret (its first "
        "line).", "a readable file", metavar="PATH", server_only=True)
    load_cpu: str = option(
        "auto", "--promptcache-load-cpu", "CPU backend: the CPU on which a thread moves a "
        "step's loads layer by layer beside the forward: auto (one the worker's OpenMP threads "
        "leave free, if any), off (loads run before the forward), or a CPU number.",
        "auto, off, or a CPU number", metavar="CPU")

    def validate(self, environ: Mapping[str, str] | None = None) -> "PromptCacheConfig":
        """Check every field, then the combinations; `environ` (default os.environ)
        is where an engine process finds the remote secret the server exported."""
        for f in fields(self):
            _check_field(self, f)
        if isinstance(self.load_cpu, int):
            return dataclasses.replace(self, load_cpu=str(self.load_cpu)).validate(environ)
        if (self.truncate or self.modules_file) and not self.position_independent:
            return dataclasses.replace(self, position_independent=True).validate(environ)
        if self.recompute_ratio and not self.position_independent:
            raise _error("recompute_ratio", self.recompute_ratio, "it applies to KV found at "
                         "other positions: needs --promptcache-position-independent (or "
                         "--promptcache-truncate, --promptcache-modules)")
        if self.remote_url:
            self._check_remote(os.environ if environ is None else environ)
        return self

    def _check_remote(self, environ: Mapping[str, str]) -> None:
        """What the remote tier would otherwise find only in the worker, after start-up."""
        from .store.remote_url import RemoteURLError, parse_remote_url

        try:
            url = parse_remote_url(self.remote_url, environ={})
        except RemoteURLError as e:
            raise PromptCacheConfigError(str(e)) from None
        if not (self.remote_secret or environ.get(REMOTE_SECRET_ENV)):
            raise _error("remote_secret", None, "required with --promptcache-remote-url (or "
                         f"{REMOTE_SECRET_ENV}, or --promptcache-remote-secret-file): it keys "
                         "every value's checksum; "
                         f"{_field('remote_secret').metadata['allowed']}")
        if url.password and self.remote_password_file:
            raise _error("remote_password_file", self.remote_password_file,
                         "not both: --promptcache-remote-url already holds a password")
        for key, path in url.tls_options:
            if key != "ssl_cert_reqs" and not os.path.isfile(os.path.expanduser(path)):
                raise _error("remote_url", None, f"its {key} file does not exist: {path}")
        try:
            import redis  # noqa: F401
        except ImportError:
            raise _error("remote_url", None, "the remote tier needs redis-py: pip install "
                         "'vllm-promptcache[remote]'") from None

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

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers this configuration turns on (their metric label), fastest first."""
        return ("host",) + (("disk",) if self.disk_enabled else ()) + (
            ("remote",) if self.remote_url else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def engine_dict(self) -> dict[str, Any]:
        """The options the engine needs: server-only fields (secrets) left out."""
        return {k: v for k, v in self.to_dict().items() if k not in SERVER_ONLY_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config",
                  environ: Mapping[str, str] | None = None) -> "PromptCacheConfig":
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise PromptCacheConfigError(
                    f"unknown promptcache option {key!r} in {source}; "
                    f"known options: {', '.join(sorted(known))}")
            values[name] = _coerce(known[name], raw, source)
        return cls(**values).validate(environ)

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
                f"calibration: {self.calibration}, load decisions: {self.load_decisions}, "
                f"module registration over HTTP: {'on' if self.admin_key else 'off'}, "
                f"remote tier: {masked_url(self.remote_url) if self.remote_url else 'off'}, "
                f"load CPU: {self.load_cpu}")


# ---------------------------------------------------------------------------
# What the fields say about themselves
# ---------------------------------------------------------------------------

def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


FLAGS = {f.name: f.metadata["flag"] for f in fields(PromptCacheConfig)}
# Kept in the API server process only: never put into the engine's config (which
# vLLM logs), never shown in the summary.
SERVER_ONLY_FIELDS = tuple(f.name for f in fields(PromptCacheConfig) if f.metadata["server_only"])
SECRET_FIELDS = tuple(f.name for f in fields(PromptCacheConfig) if f.metadata["secret"])
# secret field -> the field naming a file that holds it
SECRET_FILES = {"admin_key": "admin_key_file", "remote_secret": "remote_secret_file"}


def option_kind(f: dataclasses.Field) -> type:
    return f.type if isinstance(f.type, type) else {"float": float, "int": int, "bool": bool,
                                                    "str": str}.get(str(f.type), str)


def _error(name: str, value: Any, why: str) -> PromptCacheConfigError:
    f = _field(name)
    shown = "" if value is None else (
        f": got a value of {len(str(value))} characters" if f.metadata["secret"]
        else f": got {value!r}")
    return PromptCacheConfigError(
        f"invalid promptcache option {f.metadata['flag']} (field '{name}', env "
        f"{env_name(name)}){shown}; {why}")


def _check_field(config: PromptCacheConfig, f: dataclasses.Field) -> None:
    value, kind, meta = getattr(config, f.name), option_kind(f), f.metadata
    allowed = "allowed: " + meta["allowed"]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int) \
            and not isinstance(value, bool)
        if ok and meta["bounds"]:
            lo_edge, lo, hi, hi_edge = meta["bounds"]
            ok = (lo < value if lo_edge == "(" else lo <= value) and \
                 (value < hi if hi_edge == ")" else value <= hi)
    elif f.name == "load_cpu":
        value_text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        ok = isinstance(value_text, str) and (value_text in ("auto", "off") or (
            value_text.isdigit() and int(value_text) < 1 << 16))
    else:
        ok = isinstance(value, str)
    if ok and f.name == "eviction_policy":
        ok = value in POLICIES
    elif ok and f.name == "calibration":
        ok = value in CALIBRATION_MODES
    elif ok and f.name == "load_decisions":
        ok = value in LOAD_DECISION_MODES
    elif ok and f.name == "model_id":
        ok = len(value) <= 512
    elif ok and meta["secret"] and value:
        ok = len(value) >= MIN_SECRET_CHARS
    if not ok:
        raise _error(f.name, value, allowed)


def _coerce(f: dataclasses.Field, raw: Any, source: str) -> Any:
    """Turn strings from the environment or CLI into the field's type."""
    target = option_kind(f)
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
        shown = "a secret value" if f.metadata["secret"] else repr(raw)
        raise PromptCacheConfigError(
            f"invalid promptcache option {FLAGS[f.name]} "
            f"(field '{f.name}') in {source}: {shown} is not a {target.__name__}") from None
    return text


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in fields(PromptCacheConfig)}[name]


# ---------------------------------------------------------------------------
# Sources: YAML, environment, secret files
# ---------------------------------------------------------------------------

def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise PromptCacheConfigError(f"{CONFIG_FLAG}: no such file: {path}") from None
    except yaml.YAMLError as e:
        raise PromptCacheConfigError(f"{CONFIG_FLAG}: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PromptCacheConfigError(
            f"{CONFIG_FLAG}: {path} must hold a mapping of option: value, "
            f"got {type(data).__name__}")
    # Accept both a flat file and one nested under `promptcache:`.
    inner = data.get("promptcache", data)
    if not isinstance(inner, dict):
        raise PromptCacheConfigError(f"{CONFIG_FLAG}: 'promptcache' in {path} must be a mapping")
    return inner


_warned_legacy: set[str] = set()


def _warn_legacy(old: str) -> None:
    if old not in _warned_legacy:
        _warned_legacy.add(old)
        logger.warning("promptcache: %s is deprecated and will stop working in the next "
                       "release; use %s (outside vLLM's VLLM_* namespace)", old,
                       ENV_PREFIX + old[len(LEGACY_ENV_PREFIX):])


def migrate_legacy_env(environ: Any = None) -> None:
    """Copy each VLLM_PROMPTCACHE_X to PROMPTCACHE_X where that is unset, with a
    deprecation warning, so code that reads the new names (the engine's processes,
    the native loop, the remote store) sees the old ones for one more release."""
    environ = os.environ if environ is None else environ
    for key in [k for k in environ if k.startswith(LEGACY_ENV_PREFIX)]:
        new = ENV_PREFIX + key[len(LEGACY_ENV_PREFIX):]
        _warn_legacy(key)
        environ.setdefault(new, environ[key])


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{field: text} from PROMPTCACHE_* variables (and the deprecated
    VLLM_PROMPTCACHE_* ones, where the new name is unset); an unknown name is refused."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(PromptCacheConfig)}
    out: dict[str, str] = {}
    for prefix in (LEGACY_ENV_PREFIX, ENV_PREFIX):  # the new names win
        for key, value in environ.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):].lower()
            if name in names:
                if prefix == LEGACY_ENV_PREFIX:
                    _warn_legacy(key)
                out[name] = value
            elif name not in OTHER_ENV:
                raise PromptCacheConfigError(
                    f"unknown environment variable {key}; known: "
                    + ", ".join(env_name(n) for n in sorted(names)))
    return out


def read_secret_file(name: str, path: str) -> str:
    """The secret in the file that option `name` names: its first line."""
    try:
        with open(os.path.expanduser(path)) as fh:
            text = fh.readline().strip()
    except OSError as e:
        raise _error(name, path, f"cannot read it: {e.strerror}") from None
    if not text:
        raise _error(name, path, "the file is empty")
    return text


def _merge(merged: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    """Lay one source over the lower ones.  A secret and its file are one option: a
    source that gives either replaces both below it, and may not give both."""
    for secret, file_field in SECRET_FILES.items():
        if source.get(secret) and source.get(file_field):
            raise _error(file_field, source[file_field], f"give {FLAGS[secret]} or "
                         f"{FLAGS[file_field]}, not both ({where})")
        if source.get(secret) or source.get(file_field):
            merged.pop(secret, None)
            merged.pop(file_field, None)
    merged.update(source)


def _read_secret_files(merged: dict[str, Any]) -> None:
    for secret, file_field in SECRET_FILES.items():
        if merged.get(file_field):
            merged[secret] = read_secret_file(file_field, merged[file_field])
    if merged.get("remote_password_file"):
        read_secret_file("remote_password_file", merged["remote_password_file"])


def build_config(config_file: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> PromptCacheConfig:
    """Merge defaults < YAML < environment < explicit overrides, read the secret
    files, then validate (fields one by one, then their combinations)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    config_file = config_file or environ.get(CONFIG_ENV) or environ.get(
        LEGACY_ENV_PREFIX + "CONFIG")
    if config_file:
        from_file = {k.replace("-", "_"): v for k, v in load_yaml(config_file).items()}
        _refuse_unknown(from_file, str(config_file))
        _merge(merged, {k: _coerce(_field(k), v, str(config_file))
                        for k, v in from_file.items()}, str(config_file))
    _merge(merged, {name: _coerce(_field(name), raw, f"environment variable {env_name(name)}")
                    for name, raw in env_values(environ).items()}, "environment")
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    _refuse_unknown(explicit, "promptcache options")
    _merge(merged, explicit, "flags")
    _read_secret_files(merged)
    config = PromptCacheConfig.from_dict(merged, "promptcache options", environ)
    if config.disk_enabled:
        # Fail at start-up, before any engine exists, not at the first save.
        from .store.disk_tier import DiskTierError, prepare_directory

        try:
            prepare_directory(config.disk_dir)
        except DiskTierError as e:
            raise PromptCacheConfigError(f"invalid promptcache option {FLAGS['disk_path']}: {e}") from None
    memory = _physical_memory()
    if memory and config.host_bytes > memory:
        raise _error("host_gb", config.host_gb, f"the host tier must fit in this machine's "
                     f"{memory / 2**30:.1f} GiB of memory (its buffer is allocated whole)")
    if config.load_cpu.isdigit() and hasattr(os, "sched_getaffinity") \
            and int(config.load_cpu) not in os.sched_getaffinity(0):
        raise _error("load_cpu", config.load_cpu, "this machine lets the server run on CPUs "
                     f"{sorted(os.sched_getaffinity(0))} only")
    return config


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: not checked
        return 0


def _refuse_unknown(values: Mapping[str, Any], source: str) -> None:
    unknown = [k for k in values if k not in FLAGS]
    if unknown:
        raise PromptCacheConfigError(
            f"unknown promptcache option {unknown[0]!r} in {source}; "
            f"known options: {', '.join(sorted(FLAGS))}")


def masked_url(url: str) -> str:
    from .store.remote_url import parse_remote_url

    try:
        return parse_remote_url(url, environ={}).masked()
    except ValueError:
        return "(invalid)"


# ---------------------------------------------------------------------------
# The README's options table
# ---------------------------------------------------------------------------

def _default_text(f: dataclasses.Field) -> str:
    if f.metadata["default_text"] is not None:
        return f.metadata["default_text"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    if isinstance(f.default, float):
        return f"{f.default:g}"
    return str(f.default)


def flag_text(f: dataclasses.Field) -> str:
    flag = f.metadata["flag"]
    if option_kind(f) is bool:
        return f"`--[no-]{flag[2:]}`"
    return f"`{flag} {f.metadata['metavar']}`"


def options_table() -> str:
    """The README's options table, generated from the fields (a test compares them)."""
    rows = ["| flag | YAML key / environment | default | allowed | what it does |",
            "|---|---|---|---|---|",
            f"| `{SWITCH_FLAG}` | | off | | {SWITCH_HELP} |",
            f"| `{CONFIG_FLAG} FILE` | `{CONFIG_ENV}` | | a YAML file | {CONFIG_HELP} |"]
    for f in fields(PromptCacheConfig):
        m = f.metadata
        rows.append(f"| {flag_text(f)} | `{f.name}` / `{env_name(f.name)}` | {_default_text(f)} "
                    f"| {m['allowed']} | {m['help']} |")
    return "\n".join(rows) + "\n"


def cli_help(f: dataclasses.Field) -> str:
    """The field's help for `--help`: what it does, allowed values, default, env."""
    default = _default_text(f).strip("`") or "unset"
    return (f"{f.metadata['help']} Allowed: {f.metadata['allowed']}. Default: {default}. "
            f"Env: {env_name(f.name)}.").replace("%", "%%")


if __name__ == "__main__":
    if sys.argv[1:] == ["--options-table"]:
        sys.stdout.write(options_table())
    else:
        sys.exit("usage: python -m vllm_promptcache.config --options-table")
