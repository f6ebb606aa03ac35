"""The position-independent side of the concurrent fuzz: an OpenAI server of its own
(another process, as another instance of a fleet would be) with prompt modules
registered over HTTP with the admin key, serving concurrent completions that name
modules, some aborted by their client.  Its answers may differ from vLLM's (shifted KV
is approximate); what it stores lands in the disk root and Redis it shares with the
exact-only engine, and the prompts it served are handed to that engine to replay.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field

from tests.conftest import ENGINE_DEFAULTS, TEST_DEVICE
from tests.fuzz.async_engine import REFUSED
from tests.test_server import Server, free_port

ADMIN_KEY = "fuzz-admin-key-0123456789abcdef"


@dataclass
class Served:
    """One completed completion: the tokens the engine ran and answered."""
    prompt: list[int]
    answer: list[int]


@dataclass
class ServerCounts:
    requests: int = 0
    aborted_timeout: int = 0  # the client gave up after a time, whatever the request did
    aborted_decode: int = 0  # the client left after some streamed tokens
    registrations: int = 0  # POSTs of modules, the re-registrations included
    resets: int = 0
    resets_succeeded: int = 0
    resets_refused: int = 0  # vLLM: a request waits for a connector's load (REFUSED)
    preemptions: float = 0.0  # vllm:num_preemptions on its /metrics
    errors: list[str] = field(default_factory=list)


def start_shifting_server(model: str, log_path, disk: str, remote_url: str, pool_bytes: int,
                          max_model_len: int, batched_tokens: int) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "vllm_promptcache", "serve", model, "--port", str(port),
            "--promptcache", "--promptcache-position-independent",
            "--promptcache-host-gb", "0.01", "--promptcache-disk-path", disk,
            "--promptcache-disk-gb", "1", "--promptcache-remote-url", remote_url,
            "--promptcache-remote-timeout-ms", "500",
            "--promptcache-admin-key", ADMIN_KEY, "--enable-prefix-caching",
            "--kv-cache-memory-bytes", str(pool_bytes), "--max-model-len", str(max_model_len),
            "--max-num-batched-tokens", str(batched_tokens),
            "--dtype", ENGINE_DEFAULTS["dtype"], "--seed", "0",
            *(["--enforce-eager"] if TEST_DEVICE == "cpu" else [])]
    return Server(argv, port, log_path)  # VLLM_SERVER_DEV_MODE comes from the environment


class ShiftingClient:
    def __init__(self, server: Server, model: str, counts: ServerCounts):
        import httpx

        self.server, self.model, self.counts = server, model, counts
        # A connection per request: one a client abort closed is never reused.
        self.http = httpx.AsyncClient(base_url=server.base, timeout=300,
                                      limits=httpx.Limits(max_keepalive_connections=0))

    async def register(self, modules: dict[str, str]) -> None:
        r = await self.http.post("/v1/promptcache/modules", json={"modules": modules},
                                 headers={"X-PromptCache-Admin-Key": ADMIN_KEY})
        assert r.status_code == 200, f"registering {sorted(modules)}: {r.status_code} {r.text}"
        self.counts.registrations += 1

    async def reset(self) -> bool:
        """The server's reset, the connector's included, beside running requests.  vLLM
        refuses it (HTTP 500, REFUSED) while a request waits for a connector's load."""
        r = await self.http.post("/reset_prefix_cache",
                                 params={"reset_running_requests": "true",
                                         "reset_external": "true"})
        self.counts.resets += 1
        if r.status_code == 500 and REFUSED in r.text:
            self.counts.resets_refused += 1
            return False
        assert r.status_code == 200, f"/reset_prefix_cache: {r.status_code} {r.text}"
        ok = bool(r.json().get("success"))
        self.counts.resets_succeeded += ok
        return ok

    def body(self, text: str, modules: list[str] | None, max_tokens: int, stream: bool) -> dict:
        body = {"model": self.model, "prompt": text, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                "stream": stream}
        if modules:
            body["kv_transfer_params"] = {"promptcache_modules": modules}
        return body

    async def complete(self, text: str, modules: list[str] | None, max_tokens: int,
                       abort: str | None = None, abort_at: float = 0.0) -> Served | None:
        """One completion; None where the client aborted it first ("timeout": gone
        `abort_at` seconds after sending, whether the request was prefilling, waiting
        after a preemption or decoding; "decode": gone after `abort_at` streamed chunks)."""
        self.counts.requests += 1
        if abort == "decode":
            chunks = 0
            body = self.body(text, modules, max_tokens, stream=True)
            async with self.http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks += 1
                        if chunks >= abort_at:
                            self.counts.aborted_decode += 1
                            return None  # leaving the block closes the connection
            return None
        post = self.http.post("/v1/completions",
                              json=self.body(text, modules, max_tokens, stream=False))
        if abort == "timeout":
            try:
                r = await asyncio.wait_for(post, timeout=abort_at)
            except asyncio.TimeoutError:
                self.counts.aborted_timeout += 1
                return None
        else:
            r = await post
        if r.status_code != 200:
            self.counts.errors.append(f"{r.status_code}: {r.text[:300]}")
            return None
        choice = r.json()["choices"][0]
        return Served(list(choice["prompt_token_ids"]), list(choice["token_ids"]))

    async def preemptions(self) -> float:
        text = (await self.http.get("/metrics")).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vllm:num_preemptions_total"))

    async def close(self) -> None:
        await self.http.aclose()
