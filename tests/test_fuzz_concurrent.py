"""Concurrent differential fuzz: the plugin under load, against vLLM without it.

The sequential fuzz (test_fuzz_no_wrong_token.py) sends one request at a time to
engines that never fail.  Here, as on a real server:

- E, exact-only (vLLM's prefix cache on), is an AsyncLLM (the engine behind
  `vllm serve`) under CONCURRENCY requests at once, with a KV pool of POOL_BLOCKS
  blocks, so that vLLM preempts requests (`vllm:num_preemptions` > 0, required);
  clients abort requests before their first token and during decode; the prefix
  cache is reset with the connector's (`reset_connector=True`) beside running
  requests (preempting them, and without: a reset vLLM refuses) and when idle.  E is
  restarted every RESTART_EVERY rounds on the same disk root and Redis.
- S, position-independent, is an OpenAI server in its own process, sharing E's disk
  root and a real Redis (disk and remote tiers both on in both): prompt modules are
  registered over HTTP with the admin key and one is re-registered with a new text
  every round, while concurrent completions name them (at shifted positions, the
  old texts too), some aborted by their client, under a small KV pool of its own.

Every request E finishes must give vLLM's greedy tokens (the session's reference,
tests/noop_connector.py), and a request aborted during decode a prefix of them; E
replays what S served (its prompt, its answer and more), so KV that S made
approximately and stored as exact would show as a wrong token.  E never reports a
shifted hit.  `--fuzz-concurrent-rounds N` runs a longer fuzz (default 3).  The seeds fix
what requests are made of, not how they interleave (which is the point): a failure
prints the request, its prompt length and both answers.

A second test runs E alone with tensor_parallel_size=2 (one CPU per rank), against
vLLM alone with the same two ranks.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import pytest

from tests.fuzz.async_engine import (BLOCK, TOKEN_BYTES, AsyncEngine, Counts, Request,
                                     pool_bytes, scoped_env)

pytestmark = pytest.mark.engine

SEED = 20261206
CONCURRENCY = 8
REQUESTS_PER_ROUND = 24
S_JOBS_PER_ROUND = 10
RESTART_EVERY = 2
# vLLM admits a request only when its whole prompt fits, and preempts when a running
# one needs a block that is not free: prompts end a few tokens short of a block, so
# that decoding takes a new block while the pool is full of admitted prompts.
POOL_BLOCKS = 14
MAX_MODEL_LEN = 1536  # 12 blocks: vLLM requires one request to fit in the pool
S_POOL_BLOCKS = 13  # two of S's prompts fit (vLLM wants one over max_model_len)
BATCHED_TOKENS = 384  # long prompts prefill over several steps: aborts land in them
MAX_PROMPT = 1200
# Each engine's host tier: a few requests' worth, so that it evicts to disk and Redis.
HOST_GB = 24 * BLOCK * TOKEN_BYTES / 2**30
SECRET = "fuzz-remote-secret-0123456789abcdef"
DOC_WORDS = 100  # ~190 tokens per module


def chunk(rng, lo, hi):
    return [rng.randrange(10, 2000) for _ in range(rng.randrange(lo, hi))]


def near_block_end(rng, lo_blocks, hi_blocks):
    """A prompt length a few tokens short of a block boundary."""
    return BLOCK * rng.randrange(lo_blocks, hi_blocks + 1) - rng.randrange(1, 6)


@dataclass
class Tally:
    compared: int = 0  # exact-only requests whose tokens were compared
    replays: int = 0  # of them, S's prompts (and answers) replayed on E
    mismatches: int = 0
    failures: list[str] = field(default_factory=list)
    shifted_on_e: float = 0.0
    e_hits: dict = field(default_factory=dict)


class ConcurrentFuzz:
    def __init__(self, model, reference, rng, counts, engine_options, shifting=None,
                 engine_kwargs_extra=None):
        self.model, self.reference, self.rng = model, reference, rng
        self.counts, self.tally = counts, Tally()
        self.engine_options = engine_options
        self.engine_kwargs_extra = engine_kwargs_extra or {}
        self.shifting = shifting  # a ShiftingSide, or None
        self.prefixes = [chunk(rng, 130, 420) for _ in range(4)]
        self.conversations: list[tuple[list[int], str | None]] = []  # prompt + answer
        self.engine: AsyncEngine | None = None
        self.lives = 0
        self.after_restart: list = []  # what S served, for E's first round after a restart

    # -- E ------------------------------------------------------------------------------
    def build_engine(self) -> None:
        from vllm_promptcache import engine_kwargs

        if self.engine is not None:
            self.record_metrics()
            self.engine.shutdown()
        self.engine = AsyncEngine(
            self.model, self.counts, enable_prefix_caching=True,
            kv_cache_memory_bytes=pool_bytes(POOL_BLOCKS), max_model_len=MAX_MODEL_LEN,
            max_num_batched_tokens=BATCHED_TOKENS, **self.engine_kwargs_extra,
            **engine_kwargs(**self.engine_options))
        self.lives += 1

    def record_metrics(self) -> None:
        """The plugin's counters of the engine about to stop (this process's newest)."""
        from vllm_promptcache.metrics import read_metrics

        m = read_metrics()
        shifted = sum(m.get("shifted_hit_tokens_total", {}).values())
        self.tally.shifted_on_e += shifted
        for tier, v in m.get("hit_tokens_total", {}).items():
            self.tally.e_hits[tier] = self.tally.e_hits.get(tier, 0) + v

    def next_request(self, r: int, i: int) -> Request:
        rng = self.rng
        salt = rng.choice([None, None, None, "s1"])
        kinds = ["fresh", "fresh", "turn", "turn"]
        if self.shifting is not None and self.shifting.served:
            kinds += ["replay", "replay"]
        kind = rng.choice(kinds)
        if self.after_restart:
            kind = "replay"
        if kind == "turn" and not self.conversations:
            kind = "fresh"
        if kind == "turn":
            history, salt = rng.choice(self.conversations)
            prompt = history + chunk(rng, 5, 30)
            pad = (BLOCK - len(prompt) % BLOCK - rng.randrange(1, 6)) % BLOCK
            prompt += chunk(rng, pad, pad + 1)
        elif kind == "replay":
            served = (self.after_restart.pop() if self.after_restart
                      else rng.choice(self.shifting.served))
            prompt = served.prompt + served.answer + chunk(rng, 5, 40)
            if rng.random() < 0.3:
                prompt = served.prompt  # the very tokens S ran
        else:
            n = near_block_end(rng, 2, 6)
            prefix = rng.choice(self.prefixes)[:rng.randrange(100, n - 5)]
            prompt = prefix + chunk(rng, n - len(prefix), n - len(prefix) + 1)
        prompt = prompt[:MAX_PROMPT]
        req = Request(f"r{r}-{i}-{kind}", prompt, rng.randrange(8, 25), salt)
        x = rng.random()
        if x < 0.15:
            req.abort, req.abort_at = "prefill", rng.uniform(0.01, 0.3)
        elif x < 0.3:
            req.abort, req.abort_at = "decode", rng.randrange(1, req.max_tokens - 2)
        return req

    async def exact_round(self, r: int) -> list[Request]:
        done: list[Request] = []
        total = REQUESTS_PER_ROUND + len(self.after_restart)
        todo = iter(range(total))

        async def worker():
            for i in todo:
                done.append(await self.engine.generate(self.next_request(r, i)))

        async def resetter():
            # One reset that preempts the running requests, one that vLLM refuses
            # while they hold blocks; both reset the connector.
            for running_requests in (True, False):
                while self.engine.running < 3 and len(done) < total - 3:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(self.rng.uniform(0.0, 0.2))
                await self.engine.reset(running_requests)
                await asyncio.sleep(0.3)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)), resetter())
        # Idle: vLLM refuses while blocks wait for their saves; a client retries.
        for _ in range(50):
            if await self.engine.reset(False):
                break
            await asyncio.sleep(0.1)
        return done

    # -- the reference --------------------------------------------------------------------
    def reference_tokens(self, req: Request) -> list[int]:
        from vllm import SamplingParams

        p = {"prompt_token_ids": req.prompt}
        if req.salt:
            p["cache_salt"] = req.salt
        sp = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True)
        return list(self.reference.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)

    def compare(self, requests: list[Request]) -> None:
        t = self.tally
        for req in requests:
            where = f"{req.name} salt={req.salt} len={len(req.prompt)} max={req.max_tokens}"
            if req.error is not None:
                t.failures.append(f"{where}: engine error {req.error}")
                t.mismatches += 1
                continue
            if req.aborted and not req.tokens:
                continue
            want = self.reference_tokens(req)
            t.compared += 1
            t.replays += "-replay" in req.name
            got_ok = (req.tokens == want[:len(req.tokens)] if req.aborted else req.tokens == want)
            if not got_ok:
                t.mismatches += 1
                t.failures.append(f"{where} aborted={req.aborted}: {req.tokens} != {want}")
            elif not req.aborted and len(req.prompt) + len(want) < MAX_PROMPT:
                self.conversations.append((req.prompt + want, req.salt))

    async def round(self, r: int) -> None:
        if r and r % RESTART_EVERY == 0:
            self.build_engine()
            await self.engine.start()
            # Everything S served so far, on the shared disk root and in Redis by now,
            # replayed first by the restarted engine.
            if self.shifting is not None:
                self.after_restart = list(self.shifting.served)
        jobs = [self.exact_round(r)]
        if self.shifting is not None:
            jobs.append(self.shifting.round(r))
        t0 = time.monotonic()
        results = await asyncio.gather(*jobs)
        t1 = time.monotonic()
        self.compare(results[0])
        print(f"round {r}: {t1 - t0:.1f} s, compared in {time.monotonic() - t1:.1f} s;"
              f" {self.tally.mismatches} mismatches so far", flush=True)

    def close(self) -> None:
        if self.engine is not None:
            self.record_metrics()
            self.engine.shutdown()
            self.engine = None

    def report(self, label: str, extra: str = "") -> str:
        c, t = self.counts, self.tally
        return (f"\n{label}: {c.requests} requests on E ({self.lives} engine lives), "
                f"{t.compared} compared with vLLM ({t.replays} replays of S's), "
                f"{t.mismatches} mismatches; "
                f"{c.preemptions:g} preemptions; aborts {c.aborted_prefill} before the first "
                f"token + {c.aborted_decode} during decode; resets {c.resets} "
                f"({c.resets_running} beside running requests, {c.resets_succeeded} "
                f"succeeded, {len(c.resets_refused)} refused by vLLM while a load was pending, "
                f"{len(c.reset_errors)} other errors); E's hits {t.e_hits}, shifted "
                f"{t.shifted_on_e:g}{extra}")

    def assert_clean(self, report: str, rounds: int) -> None:
        c, t = self.counts, self.tally
        problems = list(t.failures[:20]) + list(c.reset_errors[:5])
        assert t.mismatches == 0, report + "\n" + "\n".join(problems)
        assert not c.reset_errors, report + "\n" + "\n".join(problems)
        assert t.shifted_on_e == 0, "an exact-only engine served KV at a shifted position"
        assert c.preemptions > 0, report + ": vLLM never preempted: the KV pool is too big"
        assert c.aborted_prefill > 0 and c.aborted_decode > 0, report + ": no abort of a kind"
        assert c.resets_running > 0 and c.resets_succeeded > 0, report
        assert t.compared >= rounds * REQUESTS_PER_ROUND // 2, report


class ShiftingSide:
    """S's rounds: (re-)registration, concurrent module prompts, aborts, one reset."""

    def __init__(self, client, rng):
        from tests.modules.test_prompt_modules import text

        self.client, self.rng, self.text = client, rng, text
        self.docs = {f"doc{i}": text(DOC_WORDS, 40 + i) for i in range(3)}
        self.stale: list[str] = []  # doc0's earlier texts, which prompts still hold
        self.served = []

    async def round(self, r: int) -> None:
        rng = self.rng
        if r == 0:
            await self.client.register(self.docs)
        else:  # doc0 gets a new text of the same length; prompts keep the old ones
            self.stale.append(self.docs["doc0"])
            self.docs["doc0"] = self.text(DOC_WORDS, 1000 + r)
            await self.client.register({"doc0": self.docs["doc0"]})
        jobs = [self.job(*self.plan(r, j)) for j in range(S_JOBS_PER_ROUND)]
        if r % 2 == 1:
            jobs.append(self.reset_beside_requests())
        await asyncio.gather(*jobs)

    async def reset_beside_requests(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        for _ in range(10):  # vLLM refuses while a request waits for a load: retry
            if await self.client.reset():
                return
            await asyncio.sleep(0.2)

    def plan(self, r: int, j: int) -> tuple:
        """A job's text, the modules it names, its length and its client's abort."""
        rng = self.rng
        pool = list(self.docs.items()) + [("doc0", t) for t in self.stale]
        picked = rng.sample(pool, rng.randrange(2, 4))
        # Half the prompts start with a module right after BOS (its KV exact there, as
        # the blocks up to the next module); the rest with a label, shifting them all.
        head = f"Label {r}.{j}:\n" if rng.random() < 0.5 else ""
        text = head + "".join(t for _, t in picked) + \
            f"Question {j}: " + "why " * rng.randrange(3, 20)
        names = sorted({n for n, _ in picked}) if rng.random() < 0.5 else None
        max_tokens = rng.randrange(32, 97)  # decodes cross blocks: preemptions
        abort = at = None
        if rng.random() < 0.6:  # a client gives up first; the same prompt comes again
            # By time (whatever the request is doing then, waiting after a preemption
            # included) or after some streamed tokens.
            abort = rng.choice(["timeout", "timeout", "decode"])
            at = rng.uniform(0.05, 1.5) if abort == "timeout" else rng.randrange(1, 8)
        return rng.uniform(0, 0.2), text, names, max_tokens, abort, at

    async def job(self, delay, text, names, max_tokens, abort, at) -> None:
        await asyncio.sleep(delay)
        if abort is not None:
            await self.client.complete(text, names, max_tokens, abort, at)
        served = await self.client.complete(text, names, max_tokens)
        if served is not None:
            self.served.append(served)


@pytest.fixture
def shared_store(store, tmp_path):
    """One real Redis (conftest's `store`) and one disk root for every engine of the
    test; the remote tier's secret in the environment the engines' processes inherit."""
    from vllm_promptcache.config import REMOTE_SECRET_ENV

    with scoped_env(**{REMOTE_SECRET_ENV: SECRET, "VLLM_SERVER_DEV_MODE": "1"}):
        yield store.url, str(tmp_path / "kv")


def test_concurrent_fuzz_with_preemptions_aborts_resets_and_a_shared_store(
        tiny_model, shared_store, tmp_path, request):
    from tests.fuzz.shifting_server import (ServerCounts, ShiftingClient,
                                            start_shifting_server)

    rounds = request.config.getoption("--fuzz-concurrent-rounds")
    remote_url, disk = shared_store
    # S boots in its own process while the reference and E start here.
    server = start_shifting_server(tiny_model, tmp_path / "shifting.log", disk, remote_url,
                                   pool_bytes(S_POOL_BLOCKS), MAX_MODEL_LEN, BATCHED_TOKENS)
    reference = request.getfixturevalue("reference")
    rng, counts, s_counts = random.Random(SEED), Counts(), ServerCounts()
    fuzz = ConcurrentFuzz(tiny_model, reference, rng, counts, dict(
        host_gb=HOST_GB, disk_path=disk, disk_gb=1, remote_url=remote_url,
        remote_timeout_ms=500))

    async def main():
        fuzz.build_engine()
        await fuzz.engine.start()
        await asyncio.to_thread(server.wait_ready)
        client = ShiftingClient(server, tiny_model, s_counts)
        fuzz.shifting = ShiftingSide(client, random.Random(SEED + 1))
        try:
            for r in range(rounds):
                await fuzz.round(r)
            s_counts.preemptions = await client.preemptions()
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        fuzz.close()
        server.stop()
    s = s_counts
    report = fuzz.report(
        f"concurrent fuzz, seed {SEED}, {rounds} rounds",
        f"; S: {s.requests} requests ({len(fuzz.shifting.served)} answered in full), "
        f"{s.aborted_timeout}+{s.aborted_decode} aborts (by time + during decode), {s.registrations} registrations "
        f"({s.registrations - 1} re-registrations), {s.resets} resets ({s.resets_succeeded} succeeded, "
        f"{s.resets_refused} refused by vLLM while a load was pending), "
        f"{s.preemptions:g} preemptions, {len(s.errors)} errors")
    print(report)
    assert not s.errors, report + "\n" + "\n".join(s.errors[:5])
    assert s.registrations >= 2 and s.resets >= 1, report
    fuzz.assert_clean(report, rounds)


def test_concurrent_fuzz_with_tensor_parallel_2(tiny_model, reference, tmp_path):
    """E alone with two tensor-parallel ranks on the CPU backend, one CPU each: one
    round of the same load (preemptions, aborts, resets), host and disk tiers."""
    rng, counts = random.Random(SEED + 2), Counts()
    fuzz = ConcurrentFuzz(tiny_model, reference, rng, counts,
                          dict(host_gb=HOST_GB, disk_path=str(tmp_path / "kv"), disk_gb=1),
                          engine_kwargs_extra=dict(tensor_parallel_size=2,
                                                   distributed_executor_backend="mp"))
    cpus = min(os.cpu_count() or 1, 2)
    binding = dict(VLLM_CPU_OMP_THREADS_BIND="0|1" if cpus == 2 else "0|0",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    # Compared once E is gone, against vLLM alone with the same two ranks: in bf16, two
    # ranks sum in another order than one, and vLLM alone with tensor_parallel_size=2
    # gives other greedy tokens than with 1 for some prompts (3 of 24 on an AVX512-BF16
    # EPYC), so the session's one-rank reference would fail the plugin for vLLM's own
    # difference.
    finished: list[Request] = []
    fuzz.compare = finished.extend

    async def main():
        with scoped_env(**binding):
            fuzz.build_engine()
        tp = fuzz.engine.llm.vllm_config.parallel_config.tensor_parallel_size
        assert tp == 2
        await fuzz.engine.start()
        await fuzz.round(0)

    try:
        asyncio.run(main())
    finally:
        fuzz.close()
    from tests.conftest import REFERENCE_CONNECTOR, close_llm, make_llm

    with scoped_env(**binding):
        fuzz.reference = make_llm(tiny_model, enable_prefix_caching=True, max_model_len=4096,
                                  tensor_parallel_size=2, distributed_executor_backend="mp",
                                  **REFERENCE_CONNECTOR)
    try:
        assert fuzz.reference.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        ConcurrentFuzz.compare(fuzz, finished)
    finally:
        close_llm(fuzz.reference)
    report = fuzz.report(f"concurrent fuzz, tensor_parallel_size=2, seed {SEED + 2}")
    print(report)
    fuzz.assert_clean(report, 1)
