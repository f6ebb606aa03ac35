"""Opt-in context-window truncation for chat (`--promptcache-truncate`).

When a conversation outgrows `max_model_len`, vLLM refuses the request.  With
this policy the OpenAI server instead drops the oldest turns -- keeping the
leading system message(s) and the newest turns -- until the prompt plus the
requested answer fits, and logs what it dropped.  The kept history's KV is then
found at its new, earlier position by position-independent reuse (CachedAttention's
truncation case), so it is loaded, not prefilled again.

`fit_messages` is the policy; `install_chat_truncation` wraps vLLM's
`OpenAIServingChat.render_chat_request` (present in vLLM 0.26 and 0.32) so every
chat request goes through it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

logger = logging.getLogger("vllm.promptcache")
_installed = False


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def drop_oldest_turn(messages: Sequence[Any]) -> tuple[list[Any], int] | None:
    """Messages without the oldest turn after the leading system messages, and how
    many messages that removed (a user message with the replies up to the next user
    message); None if only the newest turn is left."""
    head = 0
    while head < len(messages) and _role(messages[head]) in ("system", "developer"):
        head += 1
    users = [i for i in range(head, len(messages)) if _role(messages[i]) == "user"]
    if len(users) < 2:
        return None
    cut = users[1]
    return list(messages[:head]) + list(messages[cut:]), cut - head


def fit_messages(messages: Sequence[Any], fits: Callable[[list[Any]], bool]
                 ) -> tuple[list[Any], int]:
    """Drop oldest turns until `fits(messages)`; returns (messages, messages dropped).

    If even the system messages plus the newest turn do not fit, returns them
    anyway: vLLM then answers with its usual context-length error.
    """
    kept, dropped = list(messages), 0
    while not fits(kept):
        step = drop_oldest_turn(kept)
        if step is None:
            break
        kept, n = step
        dropped += n
    return kept, dropped


def _too_long(error: Any) -> bool:
    return "maximum context length" in str(getattr(error, "message", None) or error)


def install_chat_truncation() -> None:
    """Wrap OpenAIServingChat.render_chat_request with `fit_messages`; idempotent."""
    global _installed
    if _installed:
        return
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    original = OpenAIServingChat.render_chat_request

    async def render(self, request):
        max_len = self.model_config.max_model_len
        reserve = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None) or 1

        async def attempt(messages):
            try:
                result = await original(self, request.model_copy(update={"messages": messages}))
            except Exception as e:  # vLLM raises its length error from the renderer
                if _too_long(e):
                    return None
                raise
            if not isinstance(result, tuple):
                return None if _too_long(result) else result
            _, inputs = result
            tokens = _prompt_len(self, inputs)
            return result if tokens is None or tokens + reserve <= max_len else None

        first = await attempt(request.messages)
        if first is not None:
            return first
        kept = list(request.messages)
        dropped = 0
        while True:
            step = drop_oldest_turn(kept)
            if step is None:
                # Nothing left to drop: let vLLM give its usual error.
                return await original(self, request)
            kept, n = step
            dropped += n
            result = await attempt(kept)
            if result is not None:
                logger.warning("promptcache: conversation over max_model_len=%d: dropped its %d "
                            "oldest message(s), kept %d (system messages and newest turns)",
                            max_len, dropped, len(kept))
                return result

    OpenAIServingChat.render_chat_request = render
    _installed = True


def _prompt_len(serving: Any, inputs: Any) -> int | None:
    """Prompt tokens of the first engine input, or None where this vLLM hides them."""
    if not inputs:
        return None
    first = inputs[0]
    extract = getattr(serving, "_extract_prompt_components", None)
    ids = getattr(extract(first), "token_ids", None) if extract else None
    if ids is None and isinstance(first, dict):
        ids = first.get("prompt_token_ids")
    return len(ids) if ids is not None else None
