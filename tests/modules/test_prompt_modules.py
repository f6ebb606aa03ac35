"""End to end through vLLM: prompt modules registered once, reused in any order.

One engine (tiny model, position-independent reuse on, a 2 MiB host tier = 32
blocks, so half of it -- 16 blocks -- may hold pinned modules).  vLLM's own
prefix cache is off, so every reuse is a load the metrics count.
"""

from __future__ import annotations

import math
import random

import pytest

from tests.conftest import KV_SCALE, settled

pytestmark = pytest.mark.engine
BLOCK = 128
WORDS = ("the model cache reads every block of text before it answers a question about "
         "documents stored in memory and on disk while the server keeps running for many "
         "users who send long prompts with shared parts").split()


def text(n_words: int, seed: int, first: str = "") -> str:
    """Words of WORDS; `first` (a word not in WORDS) makes a question that no stored
    run continues into, so a found run ends exactly where the modules end."""
    rng = random.Random(seed)
    return " ".join([first] * bool(first) + [rng.choice(WORDS) for _ in range(n_words)]) + "\n"


# The `llm` and `modules` fixtures (tests/conftest.py) build these.
ENGINE = dict(host_gb=0.002 * KV_SCALE, position_independent=True)
MODULES = {"sys": text(60, 1), "docA": text(170, 2), "docB": text(170, 3)}


def generate(llm, prompt, max_tokens=8, **params):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": params} if params else None
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra)
    return list(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)


def counters(llm):
    """(hit tokens, shifted-hit tokens) once the engine's last steps have reported."""
    from vllm_promptcache import read_metrics

    def read():
        m = read_metrics(llm)
        return (m.get("hit_tokens_total", {}).get("host", 0),
                m.get("shifted_hit_tokens_total", {}).get("host", 0))

    return settled(read, lambda: generate(llm, {"prompt_token_ids": [5, 6, 7]}, max_tokens=1))


def test_a_module_at_its_own_position_gives_the_uncached_output(llm, modules):
    from vllm_promptcache import Text

    prompt = modules.compose(["docA", Text(text(30, 10, "zebra"))])
    hits0, _ = counters(llm)
    cached = generate(llm, prompt, max_tokens=16)
    loaded = counters(llm)[0] - hits0
    # Whole blocks by their exact keys, then the rest of docA from its stored run
    # (delta 0: the same bytes), up to where the question starts.
    assert loaded == 1 + len(modules.table.get("docA").token_ids)
    assert cached == generate(llm, prompt, max_tokens=16, promptcache_load=False)


def test_modules_in_any_order_are_loaded_at_their_new_positions(llm, modules):
    from vllm_promptcache import Text

    question = Text(text(20, 11, "yacht"))
    prompt = modules.compose(["sys", "docB", "docA", question])
    names = [b.name for b in prompt.boundaries]
    assert names == ["sys", "docB", "docA", None]
    assert prompt.boundaries[0].start == 1 and prompt.boundaries[-1].end == len(prompt.token_ids)
    hits0, shifted0 = counters(llm)
    out = generate(llm, prompt)
    hits, shifted = counters(llm)
    covered = prompt.boundaries[2].end  # BOS + sys + docB + docA
    assert hits - hits0 == covered
    # docB and docA moved (sys sits where it was encoded, right after BOS).
    assert shifted - shifted0 == covered - prompt.boundaries[1].start
    assert len(out) == 8


def test_boundary_fix_recomputes_the_tail_of_the_found_run(llm, modules):
    from vllm_promptcache import Text

    prompt = modules.compose(["docB", "sys", "docA", Text(text(20, 12, "kayak"))])
    hits0, _ = counters(llm)
    generate(llm, prompt, promptcache_recompute_ratio=0.5)
    # The blocks holding only BOS + docB are an exact prefix hit; the rest of the run
    # up to docA's end is found at other positions, and its last half is recomputed.
    exact = prompt.boundaries[0].end // BLOCK * BLOCK
    found = prompt.boundaries[2].end - exact
    recompute = math.ceil(found * 0.5)
    assert recompute > 0
    assert counters(llm)[0] - hits0 == exact + found - recompute


def test_plain_text_prompts_find_registered_modules(llm, modules):
    tokenizer = llm.get_tokenizer()
    plain = modules.table.get("docB").text + modules.table.get("sys").text + text(20, 13, "jungle")
    ids = tokenizer.encode(plain, add_special_tokens=False)
    docb, sys_ = modules.table.get("docB").token_ids, modules.table.get("sys").token_ids
    # The precondition of a plain-text hit: the text tokenizes as its modules do.
    assert list(ids[:len(docb) + len(sys_)]) == list(docb) + list(sys_)
    hits0, shifted0 = counters(llm)
    generate(llm, {"prompt_token_ids": ids})  # no BOS: every module sits one token earlier
    covered = len(docb) + len(sys_)
    hits, shifted = counters(llm)
    assert hits - hits0 == covered
    assert shifted - shifted0 == covered


def test_unknown_module_is_named(modules):
    from vllm_promptcache import Text, UnknownModuleError

    with pytest.raises(UnknownModuleError, match="'docC'.*registered modules: 'docA', 'docB', 'sys'"):
        modules.compose(["sys", "docC", Text("?")])


def test_a_blank_module_is_refused(modules):
    from vllm_promptcache import ModuleError

    with pytest.raises(ModuleError, match="'empty'.*non-blank"):
        modules.register_module("empty", " ")


def test_module_over_the_pinning_budget_is_refused_and_others_stay(llm, modules):
    from vllm_promptcache import ModuleCapacityError, Text

    # sys, docA and docB pin 1 + 3 + 3 blocks of the 16 allowed: 10 more do not fit.
    with pytest.raises(ModuleCapacityError, match="'huge'.*--promptcache-host-gb"):
        modules.register_module("huge", text(760, 20))
    assert "huge" not in modules.table
    prompt = modules.compose(["docA", Text(text(30, 10, "zebra"))])
    hits0, _ = counters(llm)
    generate(llm, prompt)
    assert counters(llm)[0] - hits0 > 0


def test_reregistering_a_name_replaces_the_module(llm, modules):
    from vllm_promptcache import Text

    modules.register_module("sys", text(60, 30))
    prompt = modules.compose(["sys", "docA", Text(text(20, 14, "violin"))])
    hits0, _ = counters(llm)
    generate(llm, prompt)
    assert counters(llm)[0] - hits0 == prompt.boundaries[1].end


def test_a_request_marked_no_save_leaves_nothing_behind(llm):
    prompt = {"prompt_token_ids": [random.Random(40).randrange(10, 2000) for _ in range(400)]}
    generate(llm, prompt, promptcache_save=False)
    hits0, _ = counters(llm)
    generate(llm, prompt)  # nothing stored: computed, and now saved
    hits1, _ = counters(llm)
    generate(llm, prompt)
    hits2, _ = counters(llm)
    assert hits1 == hits0
    # Its 3 full blocks, and 15 tokens of its partial last block (which holds 16
    # prompt tokens and 7 generated ones): all but the prompt's last token.
    assert hits2 - hits1 == 3 * BLOCK + 15


def test_pml_schema_and_prompt(llm, modules):
    from vllm_promptcache import UnknownModuleError

    schema = (f'<schema name="qa">\n  <module name="intro">{text(60, 50)}</module>\n'
              f'  <module name="doc1">{text(170, 51)}</module>\n'
              f'  <module name="doc2">{text(170, 52)}</module>\n</schema>')
    registered = modules.register_schema(schema)
    assert {m.name for m in registered} == {"qa/intro", "qa/doc1", "qa/doc2"}
    # doc2 follows intro here, not doc1 as in the schema: found at a new position.
    prompt = modules.compose_pml('<prompt schema="qa"><intro/><doc2/> tulip what is it?</prompt>')
    assert [b.name for b in prompt.boundaries] == ["qa/intro", "qa/doc2", None]
    hits0, shifted0 = counters(llm)
    generate(llm, prompt)
    hits, shifted = counters(llm)
    assert hits - hits0 == prompt.boundaries[1].end
    assert shifted - shifted0 == prompt.boundaries[1].end - prompt.boundaries[1].start
    with pytest.raises(UnknownModuleError, match="doc3"):
        modules.compose_pml('<prompt schema="qa"><doc3/> hi</prompt>')
