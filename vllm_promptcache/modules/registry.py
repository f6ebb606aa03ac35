"""Prompt modules (Prompt Cache): named token runs encoded once, reused anywhere.

A module is a piece of prompt text -- a system prompt, a template, a document --
registered under a name.  It is encoded once, *as its own sequence*
``[BOS] module [filler]``, and that KV is saved in the tiers like any other
segment, pinned in host RAM.  A prompt composed of modules in any order, with
free text between them, then finds each module's tokens through the segment
index and loads its KV RoPE-shifted to the module's new position
(connector/shifted.py); vLLM computes only what no module covers.

Why the sequence looks like that:
- ``BOS`` first: every prompt starts with it, so a module's KV is computed with
  the same attention sink it sees in use, and the first module's tokens keep
  their position (delta 0, an exact copy).
- ``filler`` (EOS tokens up to a whole number of blocks): a module is pinned block by
  block, so its encoding fills its last block (a conversation's partial last block
  is kept as a tail instead, connector/tails.py).  Filler after the module does not
  change the module's own KV (attention is causal).

`ModuleTable` is the pure part (tokenizing, the encoding sequence, composing
prompts); `offline.PromptModules` (for `LLM`) and `server` (for the OpenAI
server) run the encodings through vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

from .. import request_params
from ..request_params import ENCODE_MODULE, MODULE_TOKEN
from ..store.segments import SegmentIndex
from .encoded_gaps import EncodedGaps
from .layout import Layout, layout_of, template_of

# A module shorter than this is found at another position only where the prompt's
# layout is known (compose, compose_pml, modules named in a request: layout.py); the
# token-level search (store/segments.py) does not match shorter runs.
MIN_MODULE_TOKENS = SegmentIndex().min_piece


class ModuleError(ValueError):
    """A prompt module cannot be registered or used."""


class UnknownModuleError(ModuleError):
    """A prompt names a module that was never registered (or, from pml.py, that its
    schema does not have)."""


def _unknown(name: str, known: Iterable[str]) -> UnknownModuleError:
    known = sorted(known)
    return UnknownModuleError(f"unknown prompt module {name!r}; registered modules: "
                              f"{', '.join(map(repr, known)) if known else 'none'}")


class ModuleCapacityError(ModuleError):
    """Registering the module would exceed the prompt cache's tier caps."""


class ModuleTooLarge(ModuleError):
    """A module (or a registration) is over a configured size limit."""


@dataclass(frozen=True)
class Module:
    name: str
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Text:
    """Free text in a composed prompt: computed, never taken from a module."""

    text: str


@dataclass(frozen=True)
class Boundary:
    """Where a part of a composed prompt lies: tokens [start, end)."""

    name: str | None  # the module's name; None for free text
    start: int
    end: int


class ComposedPrompt(dict):
    """A `TokensPrompt` (pass it to `LLM.generate`) that also knows its parts, and
    its layout where the connector needs one (text between modules, short modules)."""

    def __init__(self, token_ids: list[int], boundaries: list[Boundary],
                 layout: Layout | None = None):
        super().__init__(prompt_token_ids=token_ids)
        self.boundaries = boundaries
        self.layout = layout

    @property
    def token_ids(self) -> list[int]:
        return self["prompt_token_ids"]

    @property
    def template_key(self) -> bytes:
        """Its layout's template key (layout.py), hashed once per prompt."""
        key = getattr(self, "_template_key", None)
        if key is None:
            key = self._template_key = template_of(self.layout, self.token_ids).key
        return key


Item = Union[str, Text, Module]


class ModuleTable:
    """Registered modules of one model: name -> token ids; no vLLM inside."""

    def __init__(self, tokenizer: Any, block_size: int, max_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_tokens = max_tokens
        self.bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.filler = eos if eos is not None else (self.bos if self.bos is not None else 0)
        self._modules: dict[str, Module] = {}
        self.encoded_gaps = EncodedGaps()  # templates whose gaps this front end encoded

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def get(self, name: str) -> Module:
        module = self._modules.get(name)
        if module is None:
            raise _unknown(name, self._modules)
        return module

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prepare(self, name: str, text: str) -> tuple[Module, list[int]]:
        """The module and the token sequence that encodes it (see the module doc)."""
        if not isinstance(name, str) or not name.strip():
            raise ModuleError(f"a module name must be a non-empty string, got {name!r}")
        if not isinstance(text, str) or not text.strip():
            raise ModuleError(f"module {name!r}: the text must be a non-blank string")
        ids = self.tokenize(text)
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise ModuleTooLarge(f"module {name!r} is {len(ids)} tokens; the limit is "
                                 f"{self.max_tokens} (--promptcache-max-module-tokens)")
        if not ids:
            raise ModuleError(f"module {name!r}: the text has no tokens")
        head = [self.bos] if self.bos is not None else []
        seq = head + ids
        seq += [self.filler] * (-len(seq) % self.block_size)
        return Module(name, text, tuple(ids)), seq

    def cacheable(self, pieces: Iterable[Any]) -> dict[str, str]:
        """{name: text} of a schema's module pieces long enough to register; shorter
        ones (chat markers, separators) are left to be computed where they appear."""
        return {p.name: p.text for p in pieces
                if len(self.tokenize(p.text)) >= MIN_MODULE_TOKENS}

    def add(self, module: Module) -> None:
        self._modules[module.name] = module

    def compose(self, items: Sequence[Item], bos: bool = True) -> ComposedPrompt:
        """Token prompt of the items in order, after BOS (unless bos=False): a str
        names a registered module, `Text` is free text."""
        if isinstance(items, (str, Text, Module)):
            raise TypeError("compose() takes a list of items, e.g. ['system', Text('...')]")
        head = self.bos if bos else None
        ids = [head] if head is not None else []
        boundaries = []
        for item in items:
            if isinstance(item, str):
                name, part = item, self.get(item).token_ids
            elif isinstance(item, Module):
                name, part = item.name, self.get(item.name).token_ids
            elif isinstance(item, Text):
                name, part = None, self.tokenize(item.text)
            else:
                raise TypeError(f"compose(): an item is a module name (str) or Text(...), "
                                f"got {type(item).__name__}")
            boundaries.append(Boundary(name, len(ids), len(ids) + len(part)))
            ids.extend(part)
        return ComposedPrompt(ids, boundaries, layout_of(boundaries, head, MIN_MODULE_TOKENS,
                                                         1 if self.bos is not None else 0))

    def gap_encoding(self, prompt: ComposedPrompt,
                     again: bool = False) -> tuple[dict, Any] | None:
        """(TokensPrompt, SamplingParams) of the request that encodes the prompt's gaps
        and tells the connector its layout; None if the prompt needs none, or if this
        front end ran its template's encoding before and the engine has not reported
        it gone (encoded_gaps.py; `again` runs it anyway).  Run it (to its end) before
        the prompt, then call `gaps_encoded`."""
        if prompt.layout is None:
            return None
        if not again and self.template_key(prompt) in self.encoded_gaps:
            return None
        seq = prompt.layout.gap_sequence(prompt.token_ids)
        return {"prompt_token_ids": seq}, gap_encoding_params(prompt.layout)

    def gaps_encoded(self, prompt: ComposedPrompt) -> None:
        """The prompt's gap encoding ran: later prompts of its template skip it."""
        if prompt.layout is not None:
            self.encoded_gaps.add(self.template_key(prompt))

    @staticmethod
    def template_key(prompt: ComposedPrompt) -> bytes:
        return prompt.template_key

    def place(self, names: Sequence[str], prompt_ids: Sequence[int],
              text: str | None = None) -> ComposedPrompt:
        """A rendered prompt with the named modules in it: where `text` (the prompt's
        text, after its BOS) holds a module's text, the module takes its place there;
        the others go right after the BOS, in order."""
        modules = [self.get(n) for n in names]
        ids = list(prompt_ids)
        head = 1 if ids and self.bos is not None and ids[0] == self.bos else 0
        found: list[tuple[int, int, Module]] = []
        if text is not None:
            at = 0
            for module in modules:
                i = text.find(module.text, at)
                if i < 0:
                    continue
                found.append((i, i + len(module.text), module))
                at = i + len(module.text)
        if not found:
            items: list[Item] = [*modules]
            rest = ids[head:]
        else:
            placed = {id(m) for _, _, m in found}
            items, at = [m for m in modules if id(m) not in placed], 0
            for i, j, module in found:
                if text[at:i]:
                    items.append(Text(text[at:i]))
                items.append(module)
                at = j
            rest = self.tokenize(text[at:]) if text[at:] else []
        if found:  # the prompt is re-tokenized piecewise, after its own BOS if it had one
            composed = self.compose(items, bos=bool(head))
        else:
            composed = self.compose(items)
        ids = composed.token_ids + rest
        if rest:
            composed.boundaries.append(Boundary(None, len(composed.token_ids), len(ids)))
        return ComposedPrompt(ids, composed.boundaries, composed.layout)

    def prepend(self, names: Sequence[str], prompt_ids: Sequence[int]) -> list[int]:
        """A rendered prompt with the named modules put right after its BOS."""
        return self.place(names, prompt_ids).token_ids


def encoding_params(name: str) -> Any:
    """SamplingParams of a module's encoding request: one prefill of every token
    (never read from vLLM's prefix cache: what is stored for a module must be
    exact), one sampled token, and the marker, with this process's token, that
    makes the connector save and pin it as module `name`."""
    from vllm import SamplingParams

    from ..compat import skip_prefix_cache_params

    token = request_params.module_token(create=False)
    if not token:
        raise ModuleError("prompt modules need the prompt cache's module token: build the "
                          "engine with engine_kwargs(...) or start the server with --promptcache")
    return SamplingParams(max_tokens=1, temperature=0, **skip_prefix_cache_params(),
                          extra_args={"kv_transfer_params": {ENCODE_MODULE: name,
                                                             MODULE_TOKEN: token}})


def gap_encoding_params(layout: Layout) -> Any:
    """SamplingParams of a gap encoding (layout.py): one prefill, one sampled token,
    the layout and this process's module token.  It may read vLLM's prefix cache
    and the tiers (its KV is exact for its own tokens, as any request's)."""
    from vllm import SamplingParams

    token = request_params.module_token(create=False)
    if not token:
        raise ModuleError("prompt modules need the prompt cache's module token: build the "
                          "engine with engine_kwargs(...) or start the server with --promptcache")
    return SamplingParams(max_tokens=1, temperature=0, extra_args={"kv_transfer_params": {
        request_params.LAYOUT: layout.to_params(), MODULE_TOKEN: token}})


def encoding_result(name: str, kv_transfer_params: Any) -> dict:
    """The connector's answer to a module encoding; raises ModuleCapacityError or
    ModuleError where the module was not stored."""
    result = (kv_transfer_params or {}).get("promptcache") if isinstance(
        kv_transfer_params, dict) else None
    if not result:
        raise ModuleError(f"module {name!r} was not stored: the prompt cache did not answer "
                          f"(is it enabled on this engine?)")
    if not result.get("ok"):
        raise ModuleCapacityError(result.get("error") or f"module {name!r} was not stored")
    return result
