"""Per-request options, carried in vLLM's `kv_transfer_params`.

vLLM hands a request's `kv_transfer_params` (the OpenAI request field, or
`SamplingParams.extra_args["kv_transfer_params"]` offline) to the connector as
`request.kv_transfer_params`, and returns what `request_finished` answers on the
finished `RequestOutput.kv_transfer_params`.  This module is the one place that
names those keys and checks their values.

Keys a client may send:
- ``promptcache_modules``: list of registered module names; the OpenAI server puts
  their tokens at the start of the prompt, in that order (modules/server.py).
- ``promptcache_recompute_ratio``: this request's boundary fix, overriding
  --promptcache-recompute-ratio (a fraction in [0, 1)).
- ``promptcache_load``: false computes the whole prompt: the reference run of an
  accuracy measurement.
- ``promptcache_save``: false keeps this request's KV out of the tiers (e.g. a
  private prompt, or a measurement that must not feed later ones).
Set by the plugin itself:
- ``promptcache_module``: this request encodes the named prompt module, and
- ``promptcache_module_token``: the token that proves it comes from the plugin's
  own front end.  The token is random per start, held in the environment of the
  process that started the engine (which the engine's processes inherit), and
  never leaves those processes; a marker without it is ignored by the engine, so
  no client request can pin, replace or register a module.
- ``promptcache_layout``: this request is the gap encoding of a composed prompt,
  and carries that prompt's layout (modules/layout.py); honoured with the token only.
The answer of a module encoding is ``{"promptcache": {"module", "ok", ...}}``.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any, Mapping

logger = logging.getLogger("vllm.promptcache")

MODULES = "promptcache_modules"
RECOMPUTE_RATIO = "promptcache_recompute_ratio"
LOAD = "promptcache_load"
SAVE = "promptcache_save"
ENCODE_MODULE = "promptcache_module"
MODULE_TOKEN = "promptcache_module_token"
LAYOUT = "promptcache_layout"
RESULT = "promptcache"
# Not VLLM_-prefixed: vLLM warns about (and lists) unknown VLLM_* variables.
TOKEN_ENV = "PROMPTCACHE_MODULE_TOKEN"


def module_token(create: bool = True) -> str | None:
    """This server's module-encoding token (created on first use by the process
    that starts the engine; engine processes inherit it)."""
    token = os.environ.get(TOKEN_ENV)
    if not token and create:
        token = os.environ[TOKEN_ENV] = secrets.token_hex(32)
    return token or None


class RequestParamsError(ValueError):
    """A request's promptcache parameters are malformed."""


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with one value, or None."""
    if key == MODULES and not (isinstance(value, list)
                               and all(isinstance(n, str) and n for n in value)):
        return f"kv_transfer_params.{MODULES} must be a list of module names, got {value!r}"
    if key == RECOMPUTE_RATIO and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or not 0 <= value < 1):
        return f"kv_transfer_params.{RECOMPUTE_RATIO} must be a fraction in [0, 1), got {value!r}"
    if key in (LOAD, SAVE) and not isinstance(value, bool):
        return f"kv_transfer_params.{key} must be true or false, got {value!r}"
    if key == ENCODE_MODULE and not (isinstance(value, str) and value):
        return f"kv_transfer_params.{ENCODE_MODULE} must be a module name, got {value!r}"
    if key == LAYOUT and not isinstance(value, list):
        return f"kv_transfer_params.{LAYOUT} must be a list of spans"
    if key == MODULE_TOKEN and not isinstance(value, str):
        return f"kv_transfer_params.{MODULE_TOKEN} must be a string"
    return None


def validate(params: Mapping[str, Any] | None) -> None:
    """Raise RequestParamsError for a malformed value (front ends call this)."""
    for key, value in (params or {}).items():
        if value is not None and (problem := _problem(key, value)):
            raise RequestParamsError(problem)


def of(request: Any) -> dict[str, Any]:
    """A request's params as the scheduler sees them.  A malformed value is dropped
    with a warning (the engine must never fail on a client's value); a malformed
    `promptcache_save` counts as false: when in doubt, store nothing."""
    params = getattr(request, "kv_transfer_params", None) or {}
    if not isinstance(params, Mapping):
        return {}
    out = {}
    for key, value in params.items():
        problem = None if value is None else _problem(key, value)
        if problem is None:
            out[key] = value
            continue
        logger.warning("promptcache: request %s: %s; ignored",
                       getattr(request, "request_id", "?"), problem)
        if key == SAVE:
            out[SAVE] = False
    return out
