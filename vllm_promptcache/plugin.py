"""The `vllm.general_plugins` entry point: adds `--promptcache` to vLLM's CLI.

vLLM calls `register()` inside `AsyncEngineArgs.add_cli_args`, before the serve
parser is built, and again in every engine and worker process.  It wraps
`EngineArgs.add_cli_args` (to add the flags) and `EngineArgs.from_cli_args` (to
turn them into a `kv_transfer_config` naming our connector, validating first so a
bad value stops start-up before any engine exists).  Both wrappers are installed
once per process; without `--promptcache` vLLM behaves exactly as before.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .config import DEFAULT_DISK_DIR, EVICTION_POLICIES, FLAGS, PromptCacheConfigError, build_config

logger = logging.getLogger("vllm.promptcache")  # under vLLM's handlers and VLLM_LOGGING_LEVEL
_installed = False


def add_promptcache_args(parser: Any) -> Any:
    if any(a.dest == "promptcache" for a in getattr(parser, "_actions", [])):
        return parser
    group = parser.add_argument_group(
        "vllm-promptcache", "Reuse KV of earlier prompts and conversations from host RAM and disk.")
    group.add_argument("--promptcache", action="store_true", default=False,
                       help="Turn the prompt cache on (a KV connector; needs no other flag).")
    group.add_argument("--promptcache-config", default=None, metavar="FILE",
                       help="YAML file of prompt-cache options (see README).")
    group.add_argument(FLAGS["host_gb"], dest="promptcache_host_gb", type=str, default=None,
                       metavar="GIB", help="Host-RAM tier size in GiB, (0, 4096]. Default 4.")
    group.add_argument(FLAGS["eviction_policy"], dest="promptcache_eviction_policy", default=None,
                       metavar="NAME", help=f"Eviction policy: {', '.join(EVICTION_POLICIES)}.")
    group.add_argument(FLAGS["save_decode_tokens"], dest="promptcache_save_decode_tokens",
                       default=None, metavar="BOOL",
                       help="Also save KV of generated tokens (true/false). Default true.")
    group.add_argument(FLAGS["min_load_blocks"], dest="promptcache_min_load_blocks", default=None,
                       metavar="N", help="Shortest hit, in blocks, worth loading. Default 1.")
    group.add_argument(FLAGS["disk_path"], dest="promptcache_disk_path", default=None,
                       metavar="DIR", help=f"Disk tier directory. Default {DEFAULT_DISK_DIR}.")
    group.add_argument(FLAGS["disk_gb"], dest="promptcache_disk_gb", default=None, metavar="GIB",
                       help="Disk tier cap in GiB; 0 turns the disk tier off. Default 32.")
    group.add_argument(FLAGS["position_independent"], dest="promptcache_position_independent",
                       default=None, metavar="BOOL",
                       help="Reuse stored KV wherever its tokens reappear (RoPE-shifted), e.g. "
                            "after a client dropped a conversation's oldest turns. Default false.")
    group.add_argument(FLAGS["truncate"], dest="promptcache_truncate", default=None,
                       metavar="BOOL",
                       help="Chat over max_model_len: drop the oldest turns (keep the system "
                            "prompt and the newest turns) instead of failing, and reuse the kept "
                            "turns' KV at its new position. Default false.")
    group.add_argument(FLAGS["recompute_ratio"], dest="promptcache_recompute_ratio", default=None,
                       metavar="FRACTION",
                       help="Of the tokens found at other positions (prompt modules, truncated "
                            "chats), prefill this last fraction instead of loading it, so the "
                            "prompt's end attends to the modules actually before it (a boundary "
                            "fix, as CacheBlend). [0, 1). Default 0.")
    group.add_argument(FLAGS["modules_file"], dest="promptcache_modules_file", default=None,
                       metavar="FILE",
                       help="Prompt modules to encode at start-up: a PML schema (.xml/.pml) or a "
                            "YAML/JSON mapping of name: text. Requests name them in "
                            "kv_transfer_params {\"promptcache_modules\": [...]}; more can be "
                            "registered with POST /v1/promptcache/modules.")
    group.add_argument(FLAGS["model_id"], dest="promptcache_model_id", default=None,
                       metavar="ID",
                       help="Name the weights' identity for the disk tier (default: derived from "
                            "the model's files, or its hub commit). KV saved under one id is "
                            "never served under another.")
    group.add_argument(FLAGS["admin_key"], dest="promptcache_admin_key", default=None,
                       metavar="KEY",
                       help="Key that POST /v1/promptcache/modules needs in its "
                            "X-PromptCache-Admin-Key header (separate from --api-key; both are "
                            "checked). Unset: modules are registered only from "
                            "--promptcache-modules. Env: VLLM_PROMPTCACHE_ADMIN_KEY.")
    group.add_argument(FLAGS["max_module_tokens"], dest="promptcache_max_module_tokens",
                       default=None, metavar="N",
                       help="Longest prompt module the server registers, in tokens (HTTP 413 "
                            "beyond). Default 32768.")
    group.add_argument(FLAGS["max_request_bytes"], dest="promptcache_max_request_bytes",
                       default=None, metavar="BYTES",
                       help="Largest body the module route reads (HTTP 413 beyond). "
                            "Default 8388608.")
    group.add_argument(FLAGS["remote_url"], dest="promptcache_remote_url", default=None,
                       metavar="URL",
                       help="A store shared by several servers, below disk: redis://HOST:PORT/DB, "
                            "rediss:// (TLS), unix:///path.sock, redis+cluster://h:p,h:p. The "
                            "password may also come from VLLM_PROMPTCACHE_REMOTE_PASSWORD.")
    group.add_argument(FLAGS["load_cpu"], dest="promptcache_load_cpu", default=None,
                       metavar="CPU",
                       help="CPU backend: where a step's loads run, layer by layer beside the "
                            "forward: auto (a CPU the worker's OpenMP threads leave free, if "
                            "any), off (before the forward), or a CPU number. Default auto.")
    group.add_argument(FLAGS["remote_timeout_ms"], dest="promptcache_remote_timeout_ms",
                       default=None, metavar="MS",
                       help="Remote lookups slower than this are misses. Default 50.")
    group.add_argument(FLAGS["remote_secret"], dest="promptcache_remote_secret", default=None,
                       metavar="SECRET",
                       help="Key of every remote value's checksum, shared by the instances (at "
                            "least 16 characters); better from VLLM_PROMPTCACHE_REMOTE_SECRET.")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, f"promptcache_{name}", None) for name in FLAGS}


def apply_cli_args(engine_args: Any, args: argparse.Namespace) -> Any:
    """Set `engine_args.kv_transfer_config` from the --promptcache flags."""
    from .engine_config import kv_transfer_config_dict

    enabled = bool(getattr(args, "promptcache", False))
    given = [FLAGS[n] for n, v in _overrides(args).items() if v is not None]
    if getattr(args, "promptcache_config", None):
        given.append("--promptcache-config")
    if not enabled:
        if given:
            raise SystemExit(f"error: {', '.join(given)} need(s) --promptcache")
        return engine_args
    if engine_args.kv_transfer_config is not None:
        raise SystemExit("error: --promptcache sets the KV connector; it cannot be combined "
                         "with --kv-transfer-config")
    try:
        config = build_config(args.promptcache_config,
                              {k: v for k, v in _overrides(args).items() if v is not None})
    except PromptCacheConfigError as e:
        raise SystemExit(f"error: {e}") from None
    from vllm.config import KVTransferConfig

    from .request_params import module_token

    module_token(create=True)  # before the engine's processes start: they inherit it
    engine_args.kv_transfer_config = KVTransferConfig(**kv_transfer_config_dict(config))
    # Modules first: truncation then wraps a render that already holds them, so it
    # fits the prompt with its modules into max_model_len.
    from .modules.server import install_server_modules

    install_server_modules(config)
    if config.truncate:
        from .truncation import install_chat_truncation

        install_chat_truncation()
    logger.info("vllm-promptcache enabled: %s", config.summary())
    return engine_args


def install_cli_hooks() -> None:
    global _installed
    if _installed:
        return
    from .compat import engine_args_class

    EngineArgs = engine_args_class()
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *a, **kw):
        return add_promptcache_args(original_add(parser, *a, **kw))

    def from_cli_args(cls, args):
        return apply_cli_args(original_from(cls, args), args)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    _installed = True


def register() -> None:
    """Entry point for `vllm.general_plugins`; safe to call many times."""
    from .compat import check_vllm_version

    check_vllm_version()
    install_cli_hooks()
