"""Turn a PromptCacheConfig into the vLLM engine settings that load the connector."""

from __future__ import annotations

import os
from typing import Any

from .config import (REMOTE_PASSWORD_ENV, REMOTE_SECRET_ENV, PromptCacheConfig, build_config,
                     read_secret_file)

CONNECTOR_CLASS = "PromptCacheConnector"
CONNECTOR_MODULE = "vllm_promptcache.connector"


def export_secrets(config: PromptCacheConfig) -> PromptCacheConfig:
    """Move the remote tier's secrets out of the options into this process's
    environment, which the engine's processes inherit: vLLM logs its config, and
    neither the shared secret nor the store's password may appear there."""
    import dataclasses

    if config.remote_secret:
        os.environ[REMOTE_SECRET_ENV] = config.remote_secret
    if config.remote_url:
        from .store.remote_url import parse_remote_url

        url = parse_remote_url(config.remote_url, environ={})
        password = url.password or (config.remote_password_file and read_secret_file(
            "remote_password_file", config.remote_password_file))
        if password:
            os.environ[REMOTE_PASSWORD_ENV] = password
            config = dataclasses.replace(config, remote_url=dataclasses.replace(
                url, password=None).masked())
    return dataclasses.replace(config, remote_secret="")


def kv_transfer_config_dict(config: PromptCacheConfig) -> dict[str, Any]:
    from . import compat

    config = export_secrets(config)
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"promptcache": config.engine_dict()},
        # A block the plugin cannot load is recomputed, not an error: a best-effort cache.
        **compat.load_failure_policy_field(),
    }


def engine_kwargs(host_gb: float | None = None, *, config_file: str | os.PathLike | None = None,
                  **options: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` (or `EngineArgs`) that turn the prompt cache on.

        from vllm_promptcache import engine_kwargs
        llm = LLM(model, **engine_kwargs(host_gb=4))

    Options are the fields of `PromptCacheConfig`; unset ones come from the YAML
    file and the PROMPTCACHE_* environment, as for the CLI.  Stat logging is
    kept on so `read_metrics(llm)` works.
    """
    config = build_config(config_file, {"host_gb": host_gb, **options})
    # Before the engine's processes start, so they inherit it (request_params).
    from .request_params import module_token

    module_token(create=True)
    if config.modules_file or config.truncate:
        from .config import PromptCacheConfigError

        raise PromptCacheConfigError(
            "modules_file is read by the OpenAI server; offline, register modules with "
            "PromptModules(llm).register_modules({name: text}) or .register_schema(xml)"
            if config.modules_file else "truncate is done by the OpenAI server's chat route; "
            "offline, drop the oldest turns yourself with position_independent=True, which "
            "reuses the kept turns' KV at their new positions")
    return {"kv_transfer_config": kv_transfer_config_dict(config), "disable_log_stats": False}
