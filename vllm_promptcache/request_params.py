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
- ``promptcache_module``: this request encodes the named prompt module.
The answer of a module encoding is ``{"promptcache": {"module", "ok", ...}}``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

logger = logging.getLogger("vllm.promptcache")

MODULES = "promptcache_modules"
RECOMPUTE_RATIO = "promptcache_recompute_ratio"
LOAD = "promptcache_load"
SAVE = "promptcache_save"
ENCODE_MODULE = "promptcache_module"
RESULT = "promptcache"


class RequestParamsError(ValueError):
    """A request's promptcache parameters are malformed."""


def validate(params: Mapping[str, Any] | None) -> None:
    """Raise RequestParamsError for a malformed value (front ends call this)."""
    if not params:
        return
    names = params.get(MODULES)
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) and n for n in names)):
        raise RequestParamsError(f"kv_transfer_params.{MODULES} must be a list of module "
                                 f"names, got {names!r}")
    ratio = params.get(RECOMPUTE_RATIO)
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0 <= ratio < 1):
        raise RequestParamsError(f"kv_transfer_params.{RECOMPUTE_RATIO} must be a fraction in "
                                 f"[0, 1), got {ratio!r}")
    for key in (LOAD, SAVE):
        value = params.get(key)
        if value is not None and not isinstance(value, bool):
            raise RequestParamsError(f"kv_transfer_params.{key} must be true or false, "
                                     f"got {value!r}")


def of(request: Any) -> Mapping[str, Any]:
    """A request's params as the scheduler sees them; malformed ones are dropped
    with a warning (the engine must never fail on a client's value)."""
    params = getattr(request, "kv_transfer_params", None) or {}
    if not isinstance(params, Mapping):
        return {}
    try:
        validate(params)
    except RequestParamsError as e:
        logger.warning("promptcache: request %s: %s; ignored",
                       getattr(request, "request_id", "?"), e)
        return {k: v for k, v in params.items() if k not in (MODULES, RECOMPUTE_RATIO, LOAD, SAVE)}
    return params
