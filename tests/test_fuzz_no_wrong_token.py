"""Differential fuzz: seeded request sequences through the plugin, against vLLM without it.

Three engines share one disk tier's directory:
- R: vLLM without the plugin (the session's reference, LoRA on: conftest.py);
- S: the plugin with position-independent reuse and vLLM's prefix cache on, with
  three prompt modules: it serves modules in shuffled order, truncated
  conversations (oldest turns dropped) and shifted hand-offs -- approximate
  KV, which it may serve and must never store as exact;
- P: the plugin exact-only (vLLM's prefix cache on), LoRA on, restarted
  every RESTART_EVERY sequences so it opens what S and it wrote to disk.

Sequences mix cache salts, two LoRA adapters, shared prefixes, multi-turn
conversations, modules, shifted reuse and truncation.  Every request P serves
must give vLLM's greedy tokens, whatever S stored before; P must never report a
shifted hit.  `--fuzz-sequences N` runs a longer fuzz (default 200).
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import LORA, close_llm, make_llm

pytestmark = pytest.mark.engine

SMALL = dict(max_model_len=4096)
# Each restart costs an engine start (~35 s on 2 cores); the suite's 200 sequences
# restart P twice, each time with the requests deferred since the last.
RESTART_EVERY = 100


def chunk(rng, lo, hi):
    return [rng.randrange(10, 2000) for _ in range(rng.randrange(lo, hi))]


class Fuzz:
    def __init__(self, model, disk, adapters, reference, seed):
        from vllm_promptcache import PromptModules, engine_kwargs

        from tests.modules.test_prompt_modules import text

        self.model, self.disk, self.rng = model, disk, random.Random(seed)
        self.adapters = [None, ("A", 1, adapters[0]), ("B", 2, adapters[1])]
        self.reference = reference
        self.shifting = make_llm(model, enable_prefix_caching=True, **SMALL, **LORA,
                                 **engine_kwargs(host_gb=0.03, disk_path=disk, disk_gb=1,
                                                 position_independent=True))
        self.modules = PromptModules(self.shifting)
        self.modules.register_modules({f"doc{i}": text(150, 40 + i) for i in range(3)})
        self.exact = None
        self.restart()
        self.deferred: list[tuple] = []  # requests for P after its next restart
        self.served = self.mismatches = self.shifted_on_s = 0
        self.failures: list[str] = []

    def restart(self):
        from vllm_promptcache import engine_kwargs

        if self.exact is not None:
            self.check_no_shifted_hits()
            close_llm(self.exact)
        # Built last, so read_metrics() reads it.
        self.exact = make_llm(self.model, enable_prefix_caching=True, **SMALL, **LORA,
                              **engine_kwargs(host_gb=0.02, disk_path=self.disk, disk_gb=1))

    def check_no_shifted_hits(self):
        from vllm_promptcache import read_metrics

        shifted = read_metrics(self.exact).get("shifted_hit_tokens_total", {})
        assert not any(shifted.values()), "an exact-only engine served KV at a shifted position"

    def run(self, llm, prompt, salt=None, lora=None, max_tokens=4):
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        p = {"prompt_token_ids": prompt}
        if salt:
            p["cache_salt"] = salt
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        out = llm.generate([p], sp, lora_request=LoRARequest(*lora) if lora else None,
                           use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    def exact_request(self, name, prompt, salt=None, lora=None):
        """Served by P and by R: the greedy tokens must be equal."""
        got = self.run(self.exact, prompt, salt, lora)
        want = self.run(self.reference, prompt, salt, lora)
        self.served += 1
        if got != want:
            self.mismatches += 1
            self.failures.append(f"{name}: salt={salt} lora={lora and lora[0]} "
                                 f"len={len(prompt)}: {got} != {want}")
        return want

    def pick(self):
        return (self.rng.choice([None, None, "s1", "s2"]), self.rng.choice(self.adapters))

    # -- sequence kinds ---------------------------------------------------------------
    def conversation(self, i):
        salt, lora = self.pick()
        history = chunk(self.rng, 130, 400)
        for turn in range(self.rng.randrange(2, 4)):
            answer = self.exact_request(f"seq{i} turn{turn}", history, salt, lora)
            history = history + answer + chunk(self.rng, 20, 150)

    def shared_prefix(self, i):
        prefix = chunk(self.rng, 260, 500)
        for j in range(3):
            salt, lora = self.pick()
            self.exact_request(f"seq{i} share{j}", prefix + chunk(self.rng, 5, 60), salt, lora)

    def modules_then_exact(self, i):
        from vllm_promptcache import Text

        order = self.rng.sample(["doc0", "doc1", "doc2"], self.rng.randrange(1, 4))
        items = [*order, Text(f"question {i}: " + "why " * self.rng.randrange(3, 30))]
        prompt = self.modules.compose(items).token_ids
        self.run(self.shifting, prompt)
        self.deferred.append((f"seq{i} modules {order}", prompt, None, None))

    def truncation(self, i):
        salt, _ = self.pick()  # position-independent reuse is keyed by salt too
        system, turns = chunk(self.rng, 130, 200), [chunk(self.rng, 100, 260) for _ in range(4)]
        history = list(system)
        for t in turns:
            history = history + t
            history = history + self.run(self.shifting, history, salt)
        kept = system + turns[2] + turns[3] + chunk(self.rng, 10, 40)  # oldest turns dropped
        self.run(self.shifting, kept, salt)
        self.deferred.append((f"seq{i} truncated", kept, salt, None))

    def handoff(self, i):
        from vllm_promptcache import Text

        order = self.rng.sample(["doc0", "doc1", "doc2"], 2)
        a = self.modules.compose([*order, Text(f"note {i} " * 5)]).token_ids
        self.run(self.shifting, a)
        b = a + chunk(self.rng, 150, 300)  # vLLM's prefix cache hands it A's blocks
        answer = self.run(self.shifting, b)
        self.deferred.append((f"seq{i} handoff", b + answer + chunk(self.rng, 5, 30), None, None))

    def sequence(self, i):
        kind = self.rng.choice([self.conversation, self.conversation, self.shared_prefix,
                                self.modules_then_exact, self.truncation, self.handoff])
        kind(i)
        if (i + 1) % RESTART_EVERY == 0:
            self.restart()
            for name, prompt, salt, lora in self.deferred:
                self.exact_request(name, prompt, salt, lora)
            self.deferred = []

    def close(self):
        self.check_no_shifted_hits()
        for llm in (self.exact, self.shifting):  # (the reference is the session's)
            close_llm(llm)


def test_differential_fuzz_against_vllm_without_the_plugin(tiny_model, tmp_path, request,
                                                           lora_reference, lora_adapters):
    from vllm_promptcache import read_metrics

    n = request.config.getoption("--fuzz-sequences")
    adapters = [lora_adapters["A"], lora_adapters["B"]]  # ids 1 and 2, as everywhere
    fuzz = Fuzz(tiny_model, str(tmp_path / "kv"), adapters, lora_reference, seed=20261201)
    try:
        for i in range(n):
            fuzz.sequence(i)
        if fuzz.deferred:
            fuzz.restart()
            for name, prompt, salt, lora in fuzz.deferred:
                fuzz.exact_request(name, prompt, salt, lora)
        hits = read_metrics(fuzz.exact).get("hit_tokens_total", {})
    finally:
        fuzz.close()
    print(f"\nfuzz: {n} sequences, {fuzz.served} requests served exact-only and compared, "
          f"{fuzz.mismatches} mismatches; last exact engine's hits {hits}")
    assert fuzz.served >= n
    assert fuzz.mismatches == 0, "\n".join(fuzz.failures[:20])
