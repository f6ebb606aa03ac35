"""The module table in the shared remote store: a module registered through one
instance is known by name on every instance that shares the store.

Its KV is found by the engines through the shared segment entries
(`connector/shared_segments.py`); what a front end needs besides is the name ->
text and token ids mapping, so that requests (`promptcache_modules`, `compose`)
can name the module on any instance.  Entries live in the store's checksummed
metadata, namespaced by the model fingerprint, as the KV does.

An entry is untrusted input even when its checksum holds: the remote secret must
not be an admin key that puts token ids into every server's prompts.  So an entry
is adopted only if its fields are what they must be and its token ids are what
this instance's tokenizer makes of its text; anything else is skipped, counted
(`rejected`, and the store's rejected_store_entries_total) and logged once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Callable, Sequence

from ..store.untrusted import BadValue, json_object
from .registry import Module

logger = logging.getLogger("vllm.promptcache")

KIND = "modules"
# The longest module text adopted from the store (tokenizing it is the check).
MAX_TEXT_CHARS = 8 << 20
_MAX_TOKEN_ID = (1 << 31) - 1

Tokenize = Callable[[str], Sequence[int]]


class RejectedModule(ValueError):
    """A shared module entry that is not what it must be; the message says why."""


def check_module(name: str, data: bytes, tokenize: Tokenize) -> Module:
    """The module a shared entry describes, every field checked and its token ids
    compared with `tokenize(text)`; RejectedModule (never another exception) if not."""
    try:
        body = json_object(data, "the entry")
    except BadValue as e:
        raise RejectedModule(str(e)) from None
    text, tokens = body.get("text"), body.get("tokens")
    if not isinstance(name, str) or not name.strip():
        raise RejectedModule("the name is blank")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
        raise RejectedModule(f"the text must be a non-blank string of at most "
                             f"{MAX_TEXT_CHARS} characters")
    if not isinstance(tokens, list) or not tokens:
        raise RejectedModule("the token ids must be a non-empty list")
    for t in tokens:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _MAX_TOKEN_ID:
            raise RejectedModule(f"a token id {t!r:.40} is not an int in [0, {_MAX_TOKEN_ID}]")
    try:
        own = tuple(tokenize(text))
    except Exception as e:  # noqa: BLE001 - the tokenizer refused the text
        raise RejectedModule(f"the text does not tokenize ({type(e).__name__})") from None
    if own != tuple(tokens):
        raise RejectedModule("its token ids are not its text's")
    return Module(name, text, own)


class SharedModuleTable:
    def __init__(self, store: Any, tokenize: Tokenize):
        self.store = store
        self.tokenize = tokenize
        self.rejected = 0
        # name -> (entry bytes, its module or None): an unchanged entry is neither
        # tokenized again nor logged and counted again.
        self._checked: dict[str, tuple[bytes, Module | None]] = {}

    def publish(self, module: Module) -> bool:
        data = json.dumps({"text": module.text, "tokens": list(module.token_ids)}).encode()
        return self.store.put_meta(KIND, module.name, data)

    def fetch(self, name: str) -> Module | None:
        data = self.store.get_meta(KIND, name)
        return None if data is None else self._adopt(name, data)

    def fetch_all(self) -> list[Module]:
        return [m for name, data in self.store.items_meta(KIND).items()
                if (m := self._adopt(name, data)) is not None]

    def _adopt(self, name: str, data: bytes) -> Module | None:
        seen = self._checked.get(name)
        if seen is not None and seen[0] == data:
            return seen[1]
        try:
            module = check_module(name, data, self.tokenize)
        except RejectedModule as e:
            module = None
            self.rejected += 1
            count = getattr(self.store, "count_rejected", None)
            if count is not None:
                count()
            logger.warning("promptcache: ignoring the shared module %r: %s", name[:200], e)
        self._checked[name] = (data, module)
        return module

    def close(self) -> None:
        self.store.close()


def shared_module_table(config: Any, vllm_config: Any,
                        tokenize: Tokenize) -> SharedModuleTable | None:
    """The shared table of this model's modules, where the remote tier is on; entries
    are adopted only where `tokenize(text)` gives their token ids."""
    if config is None or not config.remote_url:
        return None
    from ..connector.remote import remote_store
    from ..store.keys import ModelFingerprint

    fingerprint = ModelFingerprint.from_vllm_config(vllm_config, 0, config.model_id)
    # The table holds text and token ids, no KV: engines of any KV layout share it (a
    # front end may not know the layout its engine core resolves).
    store = remote_store(config, replace(fingerprint, kv_layout=""))
    return SharedModuleTable(store, tokenize) if store is not None else None
