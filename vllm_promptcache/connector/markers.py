"""Requests marked by the plugin's own front ends, trusted only with the module token.

Two markers ride in `kv_transfer_params` (request_params.py):
- ``promptcache_module``: the request encodes a prompt module (registry.py), whose
  KV the scheduler side pins and serves to every later prompt;
- ``promptcache_layout``: the request is the gap encoding of a composed prompt and
  carries that prompt's layout (modules/layout.py, connector/layouts.py).

Either one changes what later requests load, so it is honoured only with the random
token of the process that started the engine (which only the plugin's front ends
hold); a client's marker is ignored, the request served as an ordinary one, and
the attempt logged and counted in ``rejected_module_encodings_total`` once.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable

from .. import request_params
from ..metrics import PromptCacheStats

logger = logging.getLogger("vllm.promptcache")


class FrontEndMarkers:
    def __init__(self, module_token: str | None, stats: PromptCacheStats,
                 params: Callable[[Any], dict]):
        self._token = module_token
        self.stats = stats
        self._params = params  # request -> its parsed kv_transfer_params
        self._rejected: set[str] = set()
        self._gap_encodings: set[str] = set()

    def module(self, request: Any) -> str | None:
        """The module this request encodes, if it carries the server's token."""
        name = self._params(request).get(request_params.ENCODE_MODULE)
        if name is None or not self._trusted(request, f"encode module {name!r}"):
            return None
        return name

    def gap_layout(self, request: Any) -> tuple[bool, Any]:
        """(is a trusted gap encoding, its layout value when seen for the first time,
        else None): the caller learns the layout once."""
        req_id = request.request_id
        if req_id in self._gap_encodings:
            return True, None
        value = self._params(request).get(request_params.LAYOUT)
        if value is None or not self._trusted(request, "announce a prompt layout"):
            return False, None
        self._gap_encodings.add(req_id)
        return True, value

    def is_gap_encoding(self, req_id: str) -> bool:
        """A trusted gap encoding, seen before."""
        return req_id in self._gap_encodings

    def forget(self, req_id: str) -> None:
        self._rejected.discard(req_id)
        self._gap_encodings.discard(req_id)

    def _trusted(self, request: Any, what: str) -> bool:
        token = self._params(request).get(request_params.MODULE_TOKEN)
        if (self._token and isinstance(token, str)
                and hmac.compare_digest(token.encode(), self._token.encode())):
            return True
        if request.request_id not in self._rejected:
            self._rejected.add(request.request_id)
            self.stats.inc("rejected_module_encodings_total")
            logger.warning("promptcache: request %s asks to %s without the server's token; "
                           "served as an ordinary request", request.request_id, what)
        return False
