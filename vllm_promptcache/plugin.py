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
import dataclasses
import logging
from typing import Any

from .config import (CONFIG_FLAG, CONFIG_HELP, FLAGS, SECRET_FIELDS, SWITCH_FLAG, SWITCH_HELP,
                     PromptCacheConfig, PromptCacheConfigError, build_config, cli_help, masked_url,
                     migrate_legacy_env, option_kind)

logger = logging.getLogger("vllm.promptcache")  # under vLLM's handlers and VLLM_LOGGING_LEVEL
_installed = False


class Redacted:
    """A secret in vLLM's parsed arguments: vLLM logs its non-default arguments at
    start-up (repr of each value) and redacts only its own secrets, so ours are
    never a plain string there.  `value` is the secret."""

    __slots__ = ("value", "shown")

    def __init__(self, value: str, shown: str = "***"):
        self.value, self.shown = value, shown

    def __repr__(self) -> str:
        return repr(self.shown)

    __str__ = __repr__

    def __reduce__(self):
        return (Redacted, (self.value, self.shown))


class _StoreSecret(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, Redacted(values))


class _StoreURL(argparse.Action):
    """The remote URL, whose password (if any) is shown as ***."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, Redacted(values, masked_url(values)))


def _dest(name: str) -> str:
    return f"promptcache_{name}"


def add_promptcache_args(parser: Any) -> Any:
    if any(a.dest == "promptcache" for a in getattr(parser, "_actions", [])):
        return parser
    group = parser.add_argument_group(
        "vllm-promptcache", "Reuse KV of earlier prompts and conversations from host RAM, disk "
        "and a shared store. Every option is also a YAML key and a PROMPTCACHE_* variable.")
    group.add_argument(SWITCH_FLAG, action="store_true", default=False, help=SWITCH_HELP)
    group.add_argument(CONFIG_FLAG, default=None, metavar="FILE", help=CONFIG_HELP)
    for f in dataclasses.fields(PromptCacheConfig):
        kw: dict[str, Any] = dict(dest=_dest(f.name), default=None, help=cli_help(f))
        if option_kind(f) is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = f.metadata["metavar"]
            if f.name in SECRET_FIELDS:
                kw["action"] = _StoreSecret
            elif f.name == "remote_url":
                kw["action"] = _StoreURL
        group.add_argument(f.metadata["flag"], **kw)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(PromptCacheConfig):
        value = getattr(args, _dest(f.name), None)
        out[f.name] = value.value if isinstance(value, Redacted) else value
    return out


def apply_cli_args(engine_args: Any, args: argparse.Namespace) -> Any:
    """Set `engine_args.kv_transfer_config` from the --promptcache flags."""
    from .engine_config import kv_transfer_config_dict

    enabled = bool(getattr(args, "promptcache", False))
    given = [FLAGS[n] for n, v in _overrides(args).items() if v is not None]
    if getattr(args, "promptcache_config", None):
        given.append(CONFIG_FLAG)
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
    from .compat import check_vllm_version, keep_worker_cores_with_this_connector

    check_vllm_version()
    migrate_legacy_env()
    install_cli_hooks()
    keep_worker_cores_with_this_connector()
