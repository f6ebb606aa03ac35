"""Prompt modules for offline batches: `PromptModules(llm)`.

    llm = LLM(model, **engine_kwargs(position_independent=True))
    modules = PromptModules(llm)
    modules.register_module("system", SYSTEM_PROMPT)
    modules.register_modules({"doc-a": DOC_A, "doc-b": DOC_B})   # one batch
    prompt = modules.compose(["system", "doc-b", "doc-a", Text("Question: ...")])
    llm.generate(prompt, SamplingParams(...))

Registering runs the module's encoding sequence through the engine (one prefill,
one sampled token) with a marker in `kv_transfer_params`; the connector saves and
pins its KV and answers whether it fit.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from .registry import (ComposedPrompt, Item, Module, ModuleError, ModuleTable, encoding_params,
                       encoding_result)

logger = logging.getLogger("vllm.promptcache")


def _connector_config(llm: Any) -> dict:
    """The prompt cache's options on this engine; ModuleError if it is off."""
    from ..engine_config import CONNECTOR_CLASS

    vllm_config = llm.llm_engine.vllm_config
    transfer = vllm_config.kv_transfer_config
    if transfer is None or transfer.kv_connector != CONNECTOR_CLASS:
        raise ModuleError("prompt modules need the prompt cache: build the LLM with "
                          "**engine_kwargs(position_independent=True)")
    return (transfer.kv_connector_extra_config or {}).get("promptcache", {})


class PromptModules:
    def __init__(self, llm: Any):
        options = _connector_config(llm)
        if not options.get("position_independent"):
            logger.warning("promptcache: position_independent is off: a module is reused only "
                           "where it starts the prompt (right after BOS)")
        self.llm = llm
        self.table = ModuleTable(llm.get_tokenizer(),
                                 llm.llm_engine.vllm_config.cache_config.block_size)
        self._schemas: dict[str, tuple[Any, Any]] = {}  # name -> (schema, role wrappers)
        from ..config import PromptCacheConfig
        from .shared_table import shared_module_table

        # With a shared remote tier: modules other instances registered, by name.
        self.shared = shared_module_table(PromptCacheConfig.from_dict(options),
                                          llm.llm_engine.vllm_config, self.table.tokenize)

    def register_module(self, name: str, text: str) -> Module:
        return self.register_modules({name: text})[0]

    def register_modules(self, modules: Mapping[str, str]) -> list[Module]:
        """Encode and store the modules, in one batch; raises ModuleCapacityError
        (naming the module) for any that did not fit, after storing the others."""
        prepared = [self.table.prepare(name, text) for name, text in modules.items()]
        params = [encoding_params(module.name) for module, _ in prepared]
        outputs = self.llm.generate([{"prompt_token_ids": seq} for _, seq in prepared], params,
                                    use_tqdm=False)
        errors = []
        for (module, seq), out in zip(prepared, outputs):
            try:
                result = encoding_result(module.name, out.kv_transfer_params)
            except ModuleError as e:
                errors.append(e)
                continue
            self.table.add(module)
            if self.shared is not None:
                self.shared.publish(module)
            logger.info("promptcache: module %r: %d tokens, %d blocks stored", module.name,
                        len(module.token_ids), result.get("blocks", 0))
        if errors:
            raise type(errors[0])("; ".join(map(str, errors)))
        return [module for module, _ in prepared]

    def register_schema(self, schema_text: str, role_wrappers: Any = None) -> list[Module]:
        """Register every cacheable piece of a PML schema (see modules/pml.py)."""
        from .pml import parse_schema

        schema = parse_schema(schema_text)
        self._schemas[schema.name] = (schema, role_wrappers)
        return self.register_modules(self.table.cacheable(schema.module_pieces(role_wrappers)))

    def compose(self, items: Sequence[Item], *, isolated: bool = False) -> ComposedPrompt:
        """The prompt of the items in order (a str names a module, `Text` is free text).
        Where text lies between modules (or a module is short), the text is encoded
        here, in one prefill of only its tokens, and the connector learns the layout,
        so that the prompt loads every module and vLLM computes only what follows
        the last one (modules/layout.py).  The encoding is stored under the base
        model and no cache salt: pass `isolated=True` for a prompt you will send with
        a `cache_salt`, a LoRA adapter or `promptcache_save: false`, and no encoding
        runs (its modules are still found by the token-level search)."""
        if self.shared is not None:  # names another instance registered
            for item in items:
                if isinstance(item, str) and item not in self.table:
                    module = self.shared.fetch(item)
                    if module is not None:
                        self.table.add(module)
        prompt = self.table.compose(items)
        if not isolated:
            self.encode_gaps(prompt)
        return prompt

    def encode_gaps(self, prompt: ComposedPrompt) -> None:
        """Run the prompt's gap encoding, if it needs one and its template's was not
        run before (compose does this)."""
        request = self.table.gap_encoding(prompt)
        if request is not None:
            self.llm.generate([request[0]], request[1], use_tqdm=False)
            self.table.gaps_encoded(prompt)

    def compose_pml(self, prompt_text: str) -> ComposedPrompt:
        """A PML prompt (`<prompt schema=...>`) over a registered schema."""
        from .pml import parse_prompt, resolve
        from .registry import Text

        prompt = parse_prompt(prompt_text)
        if prompt.schema_name not in self._schemas:
            raise ModuleError(f"prompt uses schema {prompt.schema_name!r}, which was not "
                              f"registered; registered: {sorted(self._schemas) or 'none'}")
        schema, wrappers = self._schemas[prompt.schema_name]
        parts = resolve(schema, prompt, role_wrappers=wrappers, tokenizer=self.table.tokenizer)
        # Pieces too short to register (chat markers) are text, encoded as gaps with
        # the arguments.  Whitespace-only text between modules is dropped: module
        # pieces keep their edge whitespace.
        return self.compose([p.name if p.kind == "module" and p.name in self.table
                             else Text(p.text) for p in parts if p.text.strip()])
