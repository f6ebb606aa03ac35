"""Composed prompts' layouts (modules/layout.py) and module placement, without an engine."""

from __future__ import annotations

import pytest

from vllm_promptcache.modules.layout import Layout, LayoutError, Span, layout_of
from vllm_promptcache.modules.registry import Boundary, ModuleTable, Text

BOS, EOS = 1, 2


class WordTokenizer:
    """One token per word (ids from a growing vocabulary); BOS 1, EOS 2."""

    bos_token_id, eos_token_id, bos_token = BOS, EOS, "<s>"

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]


def table(block_size=8):
    t = ModuleTable(WordTokenizer(), block_size)
    for name, words in (("long", 40), ("other", 36), ("short", 3)):
        module, _ = t.prepare(name, " ".join(f"{name}{i}" for i in range(words)))
        t.add(module)
    return t


def test_modules_back_to_back_need_no_layout_but_text_between_them_does():
    t = table()
    assert t.compose(["long", "other", Text("a question")]).layout is None
    prompt = t.compose([Text("Doc one:"), "long", Text("Doc two:"), "other", Text("why?")])
    spans = prompt.layout.spans
    assert [s.module for s in spans] == [None, None, "long", None, "other"]
    assert spans[0] == Span(0, 1, None, 0)  # BOS starts the gap encoding
    assert spans[2].offset == 1  # a module's tokens follow its encoding's BOS
    assert prompt.layout.end == prompt.boundaries[3].end  # the question is not covered
    # The gap encoding: BOS and both labels, nothing else (no filler: its partial
    # last block is kept like any run's).
    seq = prompt.layout.gap_sequence(prompt.token_ids)
    assert seq == [BOS] + t.tokenize("Doc one: Doc two:")


def test_a_short_module_needs_a_layout_even_back_to_back():
    t = table()
    prompt = t.compose(["long", "short", Text("q")])
    assert prompt.layout is not None
    assert [s.module for s in prompt.layout.spans] == [None, "long", "short"]


def test_layout_round_trips_and_malformed_ones_are_refused():
    layout = Layout((Span(0, 1, None), Span(1, 5, "m", 1), Span(5, 7, None)))
    assert Layout.from_params(layout.to_params()) == layout
    assert layout.gap_offsets() == [0, 1] and layout.gap_tokens == 3
    for bad in ([], [[1, 2, None, 0]], [[0, 2, None, 0], [3, 4, None, 0]],
                [[0, 0, None, 0]], [[0, 2, 5, 0]], [[0, 2, None, -1]], [[0, 2, None]],
                [[0, True, None, 0]], "spans"):
        with pytest.raises(LayoutError):
            Layout.from_params(bad)


def test_layout_of_skips_empty_parts_and_needs_a_module():
    assert layout_of([Boundary(None, 1, 4)], BOS, 32) is None
    spans = layout_of([Boundary(None, 1, 1), Boundary("m", 1, 3), Boundary(None, 3, 5),
                       Boundary("n", 5, 40)], BOS, 32).spans
    assert [(s.start, s.end, s.module) for s in spans] == [(0, 1, None), (1, 3, "m"),
                                                         (3, 5, None), (5, 40, "n")]


def test_place_puts_a_module_where_the_prompt_holds_its_text_and_prepends_the_rest():
    t = table()
    long_text = t.get("long").text
    rendered = f"<|user|> Read: {long_text} then answer <|end|>"
    ids = [BOS] + t.tokenize(rendered)
    placed = t.place(["short", "long"], ids, rendered)
    # "short" is not in the text: right after BOS; "long" in place, text around it.
    assert [b.name for b in placed.boundaries] == ["short", None, "long", None]
    assert placed.token_ids == ([BOS] + list(t.get("short").token_ids)
                                + t.tokenize("<|user|> Read:") + list(t.get("long").token_ids)
                                + t.tokenize("then answer <|end|>"))
    assert [s.module for s in placed.layout.spans] == [None, "short", None, "long"]
    # No module text in the prompt: the old behaviour, modules after BOS, ids kept.
    plain = t.place(["long"], [BOS, 50, 51], "x y")
    assert plain.token_ids == [BOS] + list(t.get("long").token_ids) + [50, 51]
    assert plain.layout is None


def test_a_prompt_without_bos_still_reads_modules_after_their_encodings_bos():
    """Chat templates that render no BOS: the prompt has none, a module's encoding
    does, so the module's tokens start at offset 1 of its encoding."""
    t = table()
    rendered = f"<|user|> {t.get('long').text} why"
    placed = t.place(["long"], t.tokenize(rendered), rendered)
    assert placed.token_ids[0] != BOS
    assert [(s.module, s.offset) for s in placed.layout.spans] == [(None, 0), ("long", 1)]
