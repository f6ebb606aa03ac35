"""Prompt modules on the OpenAI server.

- Routes (a `vllm.endpoint_plugins` plugin, present in vLLM 0.26 and 0.32):
  ``POST /v1/promptcache/modules`` with ``{"name": ..., "text": ...}``,
  ``{"modules": {name: text, ...}}`` or ``{"schema": "<schema ...>...</schema>"}``
  registers modules; ``GET /v1/promptcache/modules`` lists them.  A module that
  would exceed the tier caps is refused with HTTP 507 and the reason.
- Registering is an operator's act: POST needs ``X-PromptCache-Admin-Key`` equal
  to ``--promptcache-admin-key`` (401 otherwise; 403 when no key is configured),
  on top of vLLM's own ``--api-key`` where one is set.  Bodies over
  ``--promptcache-max-request-bytes`` and modules over
  ``--promptcache-max-module-tokens`` get HTTP 413 naming the limit.
  Tokenizing and parsing run off the event loop.
- ``--promptcache-modules FILE`` registers a file's modules at start-up (a PML
  schema, or a YAML/JSON mapping of name: text); a refusal stops start-up.
- A completion or chat request names modules in ``kv_transfer_params``:
  ``{"promptcache_modules": ["system", "doc-b"]}``.  A module whose text the
  request's prompt holds (the rendered chat for chat requests: a message may hold a
  document) takes its place there, in the order named; the others go right after
  the prompt's BOS, in that order.  The text between modules (chat markers, labels)
  is encoded before the request runs, so that every module loads at its position
  (layout.py).  An unknown name is a 400 naming it.
- Clients that send plain text need none of this: registered modules are found
  inside any prompt by their tokens (the segment index), as long as the prompt's
  tokenization of the module text equals the module's own (module texts that
  start and end at a line break usually do).

vLLM loads endpoint plugins only when named in VLLM_PLUGINS; with --promptcache
the plugin is attached whether or not it was (`install_server_modules`).  The
module table lives in the API server process: with --api-server-count > 1 each
process has its own, so register through the file (every process reads it), not
the route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import uuid
from http import HTTPStatus
from typing import Any, Mapping

from fastapi import APIRouter, Request  # vLLM's own server dependency
from fastapi.responses import JSONResponse

from .. import request_params
from ..config import PromptCacheConfig
from .registry import (ModuleCapacityError, ModuleError, ModuleTable, ModuleTooLarge,
                       UnknownModuleError, encoding_params, encoding_result)
from .shared_table import shared_module_table

logger = logging.getLogger("vllm.promptcache")
ROUTE = "/v1/promptcache/modules"
PLUGIN_NAME = "promptcache"
ADMIN_HEADER = "x-promptcache-admin-key"
SHARED_REFRESH_S = 2.0

_config: PromptCacheConfig | None = None
_active: "ServerModules | None" = None
_installed = False


class ServerModules:
    """The module table of one API server, encoding through its engine client."""

    def __init__(self, engine_client: Any, max_tokens: int | None = None):
        self.engine = engine_client
        tokenizer = engine_client.renderer.get_tokenizer()
        self.table = ModuleTable(tokenizer, engine_client.vllm_config.cache_config.block_size,
                                 max_tokens)
        # With a shared remote tier: modules registered on other instances, by name.
        # Entries are adopted only where this tokenizer gives their token ids.
        self.shared = shared_module_table(_config, engine_client.vllm_config,
                                          self.table.tokenize)

    async def follow_shared(self) -> None:
        """Keep the table in step with the shared one (modules other instances registered)."""
        while True:
            try:
                for module in await asyncio.to_thread(self.shared.fetch_all):
                    if module.name not in self.table or self.table.get(module.name) != module:
                        self.table.add(module)
            except Exception:  # noqa: BLE001 - never let the follower die
                logger.exception("promptcache: reading the shared module table failed")
            await asyncio.sleep(SHARED_REFRESH_S)

    async def register(self, modules: Mapping[str, str]) -> list[dict]:
        """Encode and store modules in order; raises ModuleError at the first failure
        (modules before it stay registered)."""
        done = []
        for name, text in modules.items():
            # A long text takes a while to tokenize: never on the event loop.
            module, seq = await asyncio.to_thread(self.table.prepare, name, text)
            final = None
            async for out in self.engine.generate({"prompt_token_ids": seq}, encoding_params(name),
                                                  f"promptcache-module-{uuid.uuid4().hex}"):
                final = out
            result = encoding_result(name, final.kv_transfer_params if final else None)
            self.table.add(module)
            if self.shared is not None:
                await asyncio.to_thread(self.shared.publish, module)
            done.append({"name": name, "tokens": len(module.token_ids),
                         "blocks": result.get("blocks", 0), "bytes": result.get("bytes", 0)})
            logger.info("promptcache: module %r registered (%d tokens)", name,
                        len(module.token_ids))
        return done

    async def encode_gaps(self, prompt: Any) -> None:
        """Run a composed prompt's gap encoding, if it needs one (modules/layout.py)."""
        request = self.table.gap_encoding(prompt)
        if request is None:
            return
        async for _ in self.engine.generate(request[0], request[1],
                                            f"promptcache-gaps-{uuid.uuid4().hex}"):
            pass
        self.table.gaps_encoded(prompt)

    async def register_schema(self, schema_text: str) -> list[dict]:
        from .pml import chat_role_wrappers, parse_schema

        def pieces():
            schema = parse_schema(schema_text)
            wrappers = chat_role_wrappers(self.table.tokenizer)
            return self.table.cacheable(schema.module_pieces(wrappers))

        return await self.register(await asyncio.to_thread(pieces))

    def listing(self) -> list[dict]:
        return [{"name": m.name, "tokens": len(m.token_ids)} for m in self.table]


def load_modules_file(path: str) -> tuple[str, Any]:
    """("schema", text) for a PML file, ("modules", {name: text}) for YAML/JSON."""
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".xml", ".pml")) or text.lstrip().startswith("<"):
        return "schema", text
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise ModuleError(f"--promptcache-modules: {path} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ModuleError(f"--promptcache-modules: {path} must map module names to texts")
    return "modules", data


class ModulesEndpoint:
    """The `vllm.endpoint_plugins` entry point (a zero-argument factory)."""

    name = PLUGIN_NAME
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        # Route handlers' annotations must resolve at module level (FastAPI reads them).
        router = APIRouter()

        def error(status: HTTPStatus, message: str) -> JSONResponse:
            return JSONResponse(status_code=status.value, content={"error": {
                "message": message, "type": status.phrase.replace(" ", ""), "code": status.value}})

        @router.get(ROUTE)
        async def list_modules(raw: Request):
            modules = getattr(raw.app.state, "promptcache_modules", None)
            if modules is None:
                return error(HTTPStatus.NOT_FOUND, "the prompt cache is off (--promptcache)")
            return {"modules": modules.listing()}

        @router.post(ROUTE)
        async def register_modules(raw: Request):
            modules = getattr(raw.app.state, "promptcache_modules", None)
            if modules is None:
                return error(HTTPStatus.NOT_FOUND, "the prompt cache is off (--promptcache)")
            refusal = _admin_refusal(raw.headers.get(ADMIN_HEADER))
            if refusal is not None:
                return error(*refusal)
            limit = _config.max_request_bytes if _config else PromptCacheConfig.max_request_bytes
            data = await _read_body(raw, limit)
            if data is None:
                return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"the body is over {limit} bytes (--promptcache-max-request-bytes)")
            try:
                body = await asyncio.to_thread(json.loads, data)
            except (ValueError, RecursionError):
                return error(HTTPStatus.BAD_REQUEST, "the body must be JSON")
            try:
                if isinstance(body, dict) and isinstance(body.get("schema"), str):
                    done = await modules.register_schema(body["schema"])
                elif isinstance(body, dict) and isinstance(body.get("modules"), dict):
                    done = await modules.register(body["modules"])
                elif isinstance(body, dict) and {"name", "text"} <= body.keys():
                    done = await modules.register({body["name"]: body["text"]})
                else:
                    return error(HTTPStatus.BAD_REQUEST, 'expected {"name": ..., "text": ...}, '
                                 '{"modules": {name: text}} or {"schema": "<schema ...>"}')
            except ModuleCapacityError as e:
                return error(HTTPStatus.INSUFFICIENT_STORAGE, str(e))
            except ModuleTooLarge as e:
                return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e))
            except ValueError as e:  # ModuleError, PML errors
                return error(HTTPStatus.BAD_REQUEST, str(e))
            return {"modules": done}

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        global _active
        if engine_client is None or not getattr(args, "promptcache", False):
            state.promptcache_modules = None
            return
        _active = state.promptcache_modules = ServerModules(
            engine_client, _config.max_module_tokens if _config else None)
        if _active.shared is not None:
            state.promptcache_follower = asyncio.get_running_loop().create_task(
                _active.follow_shared())
        if _config is not None and _config.modules_file:
            kind, content = load_modules_file(_config.modules_file)
            done = await (_active.register_schema(content) if kind == "schema"
                          else _active.register(content))
            logger.info("promptcache: %d module(s) registered from %s: %s", len(done),
                        _config.modules_file, ", ".join(d["name"] for d in done))


def _admin_refusal(given: str | None) -> tuple[HTTPStatus, str] | None:
    """Why a registration is refused (status, message), or None."""
    key = _config.admin_key if _config else ""
    if not key:
        return (HTTPStatus.FORBIDDEN, "registering prompt modules over HTTP is off: start the "
                "server with --promptcache-admin-key (or register them with "
                "--promptcache-modules FILE)")
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        return (HTTPStatus.UNAUTHORIZED, f"registering prompt modules needs the admin key in "
                f"the {ADMIN_HEADER} header")
    return None


async def _read_body(raw: Any, limit: int) -> bytes | None:
    """The request body, or None if it is over `limit` bytes (read no further)."""
    declared = raw.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def apply_request_params(serving: Any, request: Any, engine_inputs: list) -> Any:
    """Check a request's promptcache options and place the modules it names in its
    rendered prompts (encoding the text between them); returns an error response
    (400), or None."""
    params = getattr(request, "kv_transfer_params", None)
    if not isinstance(params, dict):
        return None
    # Only the plugin encodes modules and layouts: a client cannot.  The engine
    # ignores a marker without the server's token anyway.
    for key in (request_params.ENCODE_MODULE, request_params.MODULE_TOKEN,
                request_params.LAYOUT):
        params.pop(key, None)
    names = params.get(request_params.MODULES)
    try:
        request_params.validate(params)
        if names is None:
            return None
        if _active is None:
            raise ModuleError("prompt modules need the prompt cache (--promptcache)")
        for engine_input in engine_inputs:
            if engine_input.get("type", "token") != "token" or any(
                    k in engine_input for k in ("multi_modal_data", "mm_placeholders",
                                                "prompt_embeds")):
                raise ModuleError(f"kv_transfer_params.{request_params.MODULES}: prompt "
                                  f"modules work with text prompts only")
            composed = await asyncio.to_thread(
                _active.table.place, names, engine_input["prompt_token_ids"],
                _prompt_text(_active.table.tokenizer, engine_input))
            engine_input["prompt_token_ids"] = composed.token_ids
            if derived_requests_refused(serving, request, params) is None:
                await _active.encode_gaps(composed)
    except ValueError as e:
        return serving.create_error_response(str(e))
    return None


def derived_requests_refused(serving: Any, request: Any, params: dict) -> str | None:
    """Why the prompt's gap encoding must not run, or None.  The encoding is a request
    of its own, stored under the base model and no salt, whose KV any prompt of its
    template loads: for a request with a cache salt, a LoRA adapter or
    `promptcache_save: false` it would store the client's text outside its isolation
    or against its opt-out.  (Layouts serve only such requests' plain peers anyway:
    a salted or LoRA prompt is never planned from a layout.)"""
    if getattr(request, "cache_salt", None):
        return "cache_salt"
    if params.get(request_params.SAVE) is False:
        return request_params.SAVE
    loras = getattr(getattr(serving, "models", None), "lora_requests", None) or {}
    if getattr(request, "model", None) in loras:
        return "lora"
    return None


def _prompt_text(tokenizer: Any, engine_input: dict) -> str | None:
    """The rendered prompt's text after its BOS (where modules are looked for)."""
    text = engine_input.get("prompt")
    ids = engine_input["prompt_token_ids"]
    bos_id = getattr(tokenizer, "bos_token_id", None)
    head = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
    if not isinstance(text, str):
        return tokenizer.decode(ids[head:], skip_special_tokens=False)
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if head and bos and text.startswith(bos) else text


def install_server_modules(config: PromptCacheConfig) -> None:
    """In the API server process (--promptcache given): attach the routes and wrap
    the completion and chat renderers; idempotent."""
    global _config, _installed
    if config.modules_file and not os.path.isfile(os.path.expanduser(config.modules_file)):
        raise SystemExit(f"error: --promptcache-modules: no such file: {config.modules_file}")
    if config.modules_file:
        try:  # read now, so a bad file stops the server before any engine is built
            load_modules_file(config.modules_file)
        except (ModuleError, OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {e}") from None
    _config = config
    if _installed:
        return
    from .. import compat

    compat.add_endpoint_plugin(PLUGIN_NAME, ModulesEndpoint)
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    render_completion = OpenAIServingCompletion.render_completion_request
    render_chat = OpenAIServingChat.render_chat_request

    async def completion(self, request):
        result = await render_completion(self, request)
        if isinstance(result, list):
            return await apply_request_params(self, request, result) or result
        return result

    async def chat(self, request):
        result = await render_chat(self, request)
        if isinstance(result, tuple):
            return await apply_request_params(self, request, result[1]) or result
        return result

    OpenAIServingCompletion.render_completion_request = completion
    OpenAIServingChat.render_chat_request = chat
    _installed = True


__all__ = ["ModulesEndpoint", "ServerModules", "UnknownModuleError", "install_server_modules"]
