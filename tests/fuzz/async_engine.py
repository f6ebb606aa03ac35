"""An exact-only engine under concurrent load: vLLM's AsyncLLM (the engine behind
`vllm serve`), with client aborts, prefix-cache resets beside running requests, and
vLLM's own preemption counter.

A request is aborted as a client would abort it: "prefill" cancels it a moment after
it was sent, before its first token (its long prompt is still being prefilled in
`max_num_batched_tokens` chunks, or waits for room); "decode" drops it after some of
its tokens arrived.  Tokens received before a decode abort must still be vLLM's.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field

from tests.conftest import ENGINE_DEFAULTS

# The tiny model: 2 layers x K,V x 2 KV heads x head size 32 x the element, per token.
TOKEN_BYTES = 2 * 2 * 2 * 32 * (4 if ENGINE_DEFAULTS["dtype"] == "float32" else 2)
BLOCK = 128
WARMUP = list(range(100, 300))  # vLLM 0.32's CPU worker dies on a short first prompt
# vLLM 0.32 cannot reset with reset_running_requests while a request waits for an
# asynchronous connector load (the disk and remote tiers' loads), and says so.
REFUSED = "Failed to reset KV cache even when all the running requests are preempted"


@dataclass
class Request:
    name: str
    prompt: list[int]
    max_tokens: int
    salt: str | None = None
    abort: str | None = None  # None, "prefill" or "decode"
    abort_at: float = 0.0  # prefill: seconds after sending; decode: tokens received
    tokens: list[int] = field(default_factory=list)
    aborted: bool = False  # the abort landed before the request finished
    error: str | None = None


@dataclass
class Counts:
    requests: int = 0
    finished: int = 0
    aborted_prefill: int = 0
    aborted_decode: int = 0
    resets: int = 0
    resets_running: int = 0  # issued while requests were running
    resets_succeeded: int = 0
    resets_refused: list[str] = field(default_factory=list)  # vLLM's REFUSED, said why
    reset_errors: list[str] = field(default_factory=list)  # anything else raised
    preemptions: float = 0.0  # vllm:num_preemptions, summed over engine lives


def engine_args(model: str, **kwargs):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(model=model, **{**ENGINE_DEFAULTS, **kwargs})


def preemptions() -> float:
    """vllm:num_preemptions of the newest engine in this process (vLLM re-registers its
    Prometheus metrics for each engine it builds)."""
    from prometheus_client import REGISTRY

    total = 0.0
    for family in REGISTRY.collect():
        if family.name.startswith("vllm:num_preemptions"):
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


class AsyncEngine:
    """One AsyncLLM; build it inside the event loop that will drive it."""

    _ids = itertools.count()

    def __init__(self, model: str, counts: Counts, **kwargs):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.counts = counts
        self.llm = AsyncLLM.from_engine_args(engine_args(model, **kwargs))
        self.running = 0

    async def start(self) -> "AsyncEngine":
        await self.generate(Request("warm-up", WARMUP, 1))
        return self

    async def generate(self, req: Request) -> Request:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
        prompt = {"prompt_token_ids": req.prompt}
        if req.salt:
            prompt["cache_salt"] = req.salt
        rid = f"{req.name}-{next(self._ids)}"

        async def consume():
            async for out in self.llm.generate(prompt, sp, request_id=rid):
                req.tokens = list(out.outputs[0].token_ids)
                if out.finished:
                    return
                if req.abort == "decode" and len(req.tokens) >= req.abort_at:
                    req.aborted = True
                    await self.llm.abort(rid)
                    return

        self.running += 1
        task = asyncio.ensure_future(consume())
        try:
            if req.abort == "prefill":
                done, _ = await asyncio.wait([task], timeout=req.abort_at)
                if not done and not req.tokens:
                    req.aborted = True
                    task.cancel()  # AsyncLLM.generate aborts the request
                    await asyncio.gather(task, return_exceptions=True)
                elif not done:
                    await task
            else:
                await task
        except Exception as e:  # an engine error is a finding: reported, and fails
            req.error = f"{type(e).__name__}: {e}"
        finally:
            self.running -= 1
        self.counts.requests += 1
        if req.aborted:
            if req.tokens:
                self.counts.aborted_decode += 1
            else:
                self.counts.aborted_prefill += 1
        elif req.error is None:
            self.counts.finished += 1
        return req

    async def reset(self, running_requests: bool) -> bool | None:
        """vLLM's prefix-cache reset with the connector's (`reset_connector=True`, the
        server's `reset_external`); None where the engine refused with an error."""
        c = self.counts
        c.resets += 1
        c.resets_running += self.running > 0
        try:
            ok = await self.llm.reset_prefix_cache(reset_running_requests=running_requests,
                                                   reset_connector=True)
        except Exception as e:
            where = c.resets_refused if REFUSED in str(e) else c.reset_errors
            where.append(f"reset(running_requests={running_requests}) with {self.running} "
                         f"running: {type(e).__name__}: {e}")
            return None
        c.resets_succeeded += bool(ok)
        return ok

    def shutdown(self) -> None:
        self.counts.preemptions += preemptions()
        self.llm.shutdown()


def pool_bytes(blocks: int) -> int:
    return blocks * BLOCK * TOKEN_BYTES


class scoped_env:
    """Environment variables set for the engines built inside (their processes inherit
    them), restored after."""

    def __init__(self, **values: str):
        self.values, self.old = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
