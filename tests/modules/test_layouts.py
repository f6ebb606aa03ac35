"""End to end through vLLM: prompts laid out as real prompts are -- labels, separators,
parameters between modules, short modules, modules off block edges -- load every
module, with the text between them encoded (modules/layout.py), and stored runs keep
their partial last block (connector/tails.py).

One engine (tiny model, 128-token blocks, position-independent reuse on, vLLM's
prefix cache off so every reuse is a load the metrics count, an 8 MiB host tier).
"""

from __future__ import annotations

import pytest

from tests.conftest import KV_SCALE, settled
from tests.modules.test_prompt_modules import generate, text

pytestmark = pytest.mark.engine
BLOCK = 128


# The `llm` and `modules` fixtures (tests/conftest.py) build these.
ENGINE = dict(host_gb=0.008 * KV_SCALE, position_independent=True)
MODULES = {"docA": text(170, 2), "docB": text(150, 3), "heading": "Results of the second study:\n"}


def counters(llm):
    """(hit tokens, shifted-hit tokens, gap tokens) once the last steps have reported."""
    from vllm_promptcache import read_metrics

    def read():
        m = read_metrics(llm)
        return tuple(m.get(name, {}).get("host", 0) for name in
                     ("hit_tokens_total", "shifted_hit_tokens_total", "gap_tokens_total"))

    return settled(read, lambda: generate(llm, {"prompt_token_ids": [5, 6, 7]}, max_tokens=1))


def loaded(llm, prompt, **params):
    """(hit, shifted, gap) tokens of one prompt."""
    before = counters(llm)
    generate(llm, prompt, **params)
    return tuple(b - a for a, b in zip(before, counters(llm)))


def test_labels_between_modules_are_encoded_and_every_module_loads(llm, modules, monkeypatch):
    from vllm_promptcache import Text

    prompt = modules.compose([Text("Document 1:"), "docB", Text("\nDocument 2:"), "docA",
                              Text(text(20, 11, "Question: yacht"))])
    layout = prompt.layout
    assert layout is not None and [s.module for s in layout.spans] == [None, None, "docB",
                                                                       None, "docA"]
    hits, shifted, gaps = loaded(llm, prompt)
    # Everything up to docA's end is loaded: BOS, both labels, both modules; vLLM
    # computes only the question.
    assert hits == layout.end == prompt.boundaries[3].end
    assert layout.gap_tokens == 1 + sum(b.end - b.start for b in prompt.boundaries[:3:2])
    # BOS and the first label start the prompt as they start the gap encoding: they
    # load as that run's (partial) block, exactly; the second label is a gap.
    first = prompt.boundaries[0].end
    assert gaps == layout.gap_tokens - first
    assert shifted > 0
    # The same labels with the modules swapped: the same template, whose gap encoding
    # ran already -- compose() sends no request -- and the prompt loads whole again,
    # matched to the template by the scheduler (modules/layout.py, Template).
    sent = []
    real = modules.llm.generate
    monkeypatch.setattr(modules.llm, "generate", lambda *a, **k: sent.append(a) or real(*a, **k))
    swapped = modules.compose([Text("Document 1:"), "docA", Text("\nDocument 2:"), "docB",
                               Text(text(20, 12, "Question: kayak"))])
    assert sent == []
    monkeypatch.undo()
    assert loaded(llm, swapped)[0] == swapped.layout.end
    # A plain client sending the same labels around the modules (token ids, no layout
    # of its own) is matched to the template as well.
    plain = modules.table.compose([Text("Document 1:"), "docB", Text("\nDocument 2:"), "docA",
                                   Text(text(20, 19, "Question: canoe"))])
    assert loaded(llm, {"prompt_token_ids": plain.token_ids})[0] == plain.layout.end


def test_a_module_shorter_than_a_block_loads_between_texts(llm, modules):
    from vllm_promptcache import Text

    assert len(modules.table.get("heading").token_ids) < 32
    prompt = modules.compose([Text("Intro."), "heading", Text(" and then "), "docB",
                              Text(text(10, 13, "Question: jungle"))])
    hits, _, gaps = loaded(llm, prompt)
    assert hits == prompt.layout.end == prompt.boundaries[3].end
    assert gaps == prompt.layout.gap_tokens - prompt.boundaries[0].end  # BOS + "Intro." exact


def test_a_module_45_tokens_after_an_exact_hit_that_ends_mid_block(llm, modules):
    from vllm_promptcache import Text

    history = Text(text(180, 14))
    first = modules.compose([history])  # no module: a plain prompt, stored when done
    assert first.layout is None
    generate(llm, first, max_tokens=1)
    between = modules.table.tokenize(text(40, 15))
    assert len(between) >= 45 and (1 + len(modules.table.tokenize(history.text))) % BLOCK
    prompt = modules.compose([history, Text(text(40, 15)), "docA",
                              Text(text(10, 16, "Question: violin"))])
    hits, _, _ = loaded(llm, prompt)
    assert hits == prompt.layout.end == prompt.boundaries[2].end


def test_a_plain_prompt_goes_on_from_the_partial_last_block_of_a_stored_run(llm, modules):
    """No layout: the run's full block is an exact hit, its partial last block (kept,
    not dropped) brings the prompt exactly to where docA starts, and the token-level
    search finds docA there."""
    tok = modules.table
    run = [tok.bos] + tok.tokenize(text(120, 17))
    assert len(run) % BLOCK >= 32
    generate(llm, {"prompt_token_ids": run}, max_tokens=1)
    docA = list(tok.get("docA").token_ids)
    ids = run + docA + tok.tokenize(text(10, 18, "Question: tulip"))
    hits, shifted, gaps = loaded(llm, {"prompt_token_ids": ids})
    assert hits == len(run) + len(docA)
    assert shifted == len(docA) and gaps == 0


def test_the_next_turn_loads_the_previous_turns_tail_exactly(llm, modules):
    """Position-independent or not, a conversation's next turn loads the previous
    turn's partial last block as an exact copy: its answer equals vLLM's own."""
    tok = modules.table
    turn1 = [tok.bos] + tok.tokenize(text(200, 19))
    answer = generate(llm, {"prompt_token_ids": turn1}, max_tokens=6)
    turn2 = turn1 + answer + tok.tokenize(text(30, 20, "And then?"))
    before = counters(llm)
    cached = generate(llm, {"prompt_token_ids": turn2}, max_tokens=8)
    hits, shifted, _ = (b - a for a, b in zip(before, counters(llm)))
    assert hits == len(turn1) + len(answer) - 1 and shifted == 0
    assert cached == generate(llm, {"prompt_token_ids": turn2}, max_tokens=8,
                              promptcache_load=False)


def test_pml_parameters_and_unions_load_the_modules_after_them(llm, modules):
    schema = (f'<schema name="trip">\n'
              f'  <module name="plan">{text(50, 30)} <parameter name="days" length="6"/> '
              f'{text(50, 31)}\n'
              f'    <union>\n      <module name="paris">{text(50, 32)}</module>\n'
              f'      <module name="rome">{text(50, 33)}</module>\n    </union>\n'
              f'  </module>\n  <module name="guide">{text(60, 34)}</module>\n</schema>')
    modules.register_schema(schema)
    prompt = modules.compose_pml('<prompt schema="trip"><plan days="three"><rome/></plan>'
                                 '<guide/> What should I pack?</prompt>')
    names = [b.name for b in prompt.boundaries]
    assert names == ["trip/plan#0", None, "trip/plan#1", "trip/plan/rome", "trip/guide", None]
    hits, _, gaps = loaded(llm, prompt)
    # The argument is a gap: the module text after it, the union's member and the
    # module after the union all load.
    assert hits == prompt.layout.end == prompt.boundaries[4].end
    assert gaps == prompt.boundaries[1].end - prompt.boundaries[1].start  # BOS: exact
    from vllm_promptcache.modules.pml import PMLError

    with pytest.raises(PMLError, match="at most 6"):
        modules.compose_pml('<prompt schema="trip"><plan days="one two three four five six '
                            'seven eight nine"/></prompt>')
