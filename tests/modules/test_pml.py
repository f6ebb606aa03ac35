"""PML (modules/pml.py): parsing, resolving, errors, chat wrappers, Prompt Cache's examples."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pytest

from vllm_promptcache.modules.pml import (PLAIN_ROLE_WRAPPERS, Part, PMLError, PMLSyntaxError,
                                          UnknownModuleError, UnknownParameterError,
                                          Union, chat_role_wrappers, parse_prompt,
                                          parse_schema, resolve)

EXAMPLES = Path(__file__).parent / "pml_examples"
WRAPPERS = {"system": ("<S>", "</S>"), "user": ("<U>", "</U>"), "assistant": ("<A>", "</A>")}


def example(kind: str, name: str) -> str:
    return (EXAMPLES / kind / name).read_text(encoding="utf-8")


def joined(parts: list[Part]) -> str:
    return "".join(p.text for p in parts)


def check_pieces(schema, parts: list[Part], wrappers=None) -> None:
    """Every module Part resolve emits is exactly one of the schema's registered pieces."""
    pieces = {p.name: p for p in schema.module_pieces(wrappers)}
    assert len(pieces) == len(schema.module_pieces(wrappers)), "piece names are unique"
    for part in parts:
        if part.kind == "module":
            assert pieces[part.name] == part
        else:
            assert part.kind == "text" and part.name is None


# ---------------------------------------------------------------- Prompt Cache's examples

SCHEMA_FILES = sorted(p.name for p in (EXAMPLES / "schemas").glob("*.xml"))
# prompt file -> the schema files it fits (several files share a schema name)
PROMPT_SCHEMAS = {
    "prompt_mbti.xml": ["schema_mbti.xml", "schema_mbti_short.xml"],
    "readme_demo_prompt.xml": ["code_generation_game.xml"],
    "demo_prompt.xml": ["code_generation_game.xml"],
    "readme_persona_prompt.xml": ["persona_generation.xml", "schema_persona.xml",
                                  "schema_persona_long.xml"],
    **{p.name: [p.name] for p in (EXAMPLES / "prompts").glob("*.xml")
       if p.name.startswith(("squad_v2_", "multi_news_", "ms_marco_", "longbench_"))},
}


def test_example_files_are_all_used():
    prompts = {p.name for p in (EXAMPLES / "prompts").glob("*.xml")}
    assert prompts - set(PROMPT_SCHEMAS) == {"readme_prompt.xml"}  # see test_readme_examples
    assert len(SCHEMA_FILES) >= 20


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_example_schema_parses(name):
    schema = parse_schema(example("schemas", name))
    for wrappers in (None, WRAPPERS):
        pieces = schema.module_pieces(wrappers)
        assert pieces and all(p.kind == "module" and p.text for p in pieces)
        assert len({p.name for p in pieces}) == len(pieces)
        assert all(p.name == schema.name or p.name.startswith((schema.name + "/",
                                                               schema.name + "#"))
                   for p in pieces)


@pytest.mark.parametrize("prompt_name,schema_name",
                         [(p, s) for p, schemas in PROMPT_SCHEMAS.items() for s in schemas])
def test_example_prompt_resolves(prompt_name, schema_name):
    schema = parse_schema(example("schemas", schema_name))
    prompt = parse_prompt(example("prompts", prompt_name))
    for wrappers in (None, WRAPPERS):
        parts = resolve(schema, prompt, role_wrappers=wrappers)
        check_pieces(schema, parts, wrappers)


def test_benchmark_examples_keep_entities_and_literal_markup():
    squad = parse_schema(example("schemas", "squad_v2_schema_5a1b2c3d4e5f60718293a4b5.xml"))
    context = {p.name: p.text for p in squad.module_pieces()}[f"{squad.name}/context"]
    assert "The Rhine & Main rivers" in context and "depth at > 2.5 m." in context
    lcc = parse_schema(example(
        "schemas", "longbench_lcc_schema_0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c.xml"))
    code = joined(lcc.module_pieces())
    assert "'large' if a && b else None" in code and "\n    if os.path" in code


def test_longbench_turn_spans_schema_and_prompt():
    """LongBench's schema leaves <user> open; its prompt closes it and opens <assistant>."""
    name = "longbench_narrativeqa_schema_8c1f0e2a9b7d4c3e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c.xml"
    schema = parse_schema(example("schemas", name))
    prompt = parse_prompt(example("prompts", name))
    assert schema.open_role == "user" and prompt.closes_role == "user"
    parts = resolve(schema, prompt, role_wrappers=WRAPPERS)
    text = joined(parts)
    assert text.startswith("<U> You are given a story")
    assert text.endswith("Question: Who finds the message?</U><A>The concise answer is:")
    assert [p.role for p in parts] == ["user", "user", "user", "assistant"]


def test_readme_examples():
    schema = parse_schema(example("schemas", "readme_schema.xml"))
    prompt = parse_prompt(example("prompts", "readme_prompt.xml"))
    assert schema.name == prompt.schema_name == "default"
    # The README's prompt selects <task2/>, which its schema does not define.
    with pytest.raises(UnknownModuleError,
                       match=r"'task2' \(line 7, column 9\).*'default/preface'"):
        resolve(schema, prompt)
    fixed = parse_prompt(example("prompts", "readme_prompt.xml").replace(
        '<task2 val1="test1" val2="test2"/>', ""))
    parts = resolve(schema, fixed, role_wrappers=WRAPPERS)
    check_pieces(schema, parts, WRAPPERS)
    assert joined(parts) == (
        " Just some text with parameter: test Nested<S>System prompt type 3,\n"
        "                    with parameter: just doing some test User 2 information</S> "
        "Task description 1 fast<U>What will be the next movement of the robot?</U>"
        "<A>It will move forward.</A><U>What would be the speed then?</U>")
    union = next(n for n in schema.root.modules["preface"].body if isinstance(n, Union))
    assert union.scaffold == "system1" and [m.name for m in union.members] == [
        "system1", "system2", "system3"]
    assert schema.root.modules["preface"].modules["system2"].cached is False
    param = schema.root.modules["preface"].parameters["param-name"]
    assert (param.length, param.scaffold) == (5, "[to be filled later]")


# ---------------------------------------------------------------- semantics


def test_module_docstring_example():
    from vllm_promptcache.modules import pml

    schema_text, prompt_text = re.findall(r"    (<(?:schema|prompt) .*?</(?:schema|prompt)>)",
                                          pml.__doc__, re.S)
    schema = parse_schema(schema_text)
    parts = resolve(schema, parse_prompt(prompt_text), role_wrappers=WRAPPERS)
    check_pieces(schema, parts, WRAPPERS)
    assert joined(parts) == ("<S>You plan trips.</S><U>A trip of 3 days to Rome.</U>"
                             "<U>What to pack?</U>")
    assert [(p.kind, p.name) for p in parts] == [
        ("module", "travel#0"), ("module", "travel#1"), ("module", "travel/plan#0"),
        ("text", None), ("module", "travel/plan#1"), ("text", None), ("module", "travel#2"),
        ("text", None)]

DOCS = """<schema name="docs">
  Shared preamble.
  <module name="intro">Intro text.</module>
  <module name="doc">
    Document head.
    <module name="appendix">Appendix text.</module>
    Document tail.
  </module>
  <union>
    <module name="short">Answer briefly.</module>
    <module name="long">Answer at length.</module>
  </union>
</schema>"""


def test_resolve_concatenates_schema_text_and_selected_modules_in_schema_order():
    schema = parse_schema(DOCS)
    prompt = parse_prompt('<prompt schema="docs"><long/><doc><appendix/></doc>'
                          '  Question?  </prompt>')
    parts = resolve(schema, prompt)
    assert [(p.kind, p.name) for p in parts] == [
        ("module", "docs#0"), ("module", "docs#1"), ("module", "docs/doc#0"),
        ("module", "docs/doc/appendix"), ("module", "docs/doc#1"), ("module", "docs#2"),
        ("module", "docs/long"), ("text", None)]
    # The schema's own text (here the spaces between its modules) is always there.
    assert [p.text for p in parts] == [
        " Shared preamble. ", " ", " Document head. ", "Appendix text.", " Document tail. ",
        " ", "Answer at length.", "Question?"]
    check_pieces(schema, parts)


def test_module_pieces_list_every_piece_once_in_document_order():
    names = [p.name for p in parse_schema(DOCS).module_pieces()]
    assert names == ["docs#0", "docs/intro", "docs#1", "docs/doc#0", "docs/doc/appendix",
                     "docs/doc#1", "docs#2", "docs/short", "docs/long"]


def test_unselected_child_and_union_produce_no_text():
    schema = parse_schema(DOCS)
    parts = resolve(schema, parse_prompt('<prompt schema="docs"><doc/></prompt>'))
    assert joined(parts) == " Shared preamble.   Document head.  Document tail.  "


def test_nested_module_is_selected_inside_its_parent_only():
    schema = parse_schema(DOCS)
    with pytest.raises(UnknownModuleError, match=r"'appendix'.*schema 'docs'.*intro, doc"):
        resolve(schema, parse_prompt('<prompt schema="docs"><appendix/></prompt>'))
    with pytest.raises(UnknownModuleError, match=r"'nope' \(line 1, column 28\).*'docs/doc'"):
        resolve(schema, parse_prompt('<prompt schema="docs"><doc><nope/></doc></prompt>'))


def test_two_members_of_one_union_is_an_error():
    with pytest.raises(PMLError, match="short and long from one union of schema 'docs'"):
        resolve(parse_schema(DOCS), parse_prompt('<prompt schema="docs"><short/><long/></prompt>'))


def test_prompt_for_another_schema_is_an_error():
    with pytest.raises(PMLError, match="prompt is for schema 'other', not 'docs'"):
        resolve(parse_schema(DOCS), parse_prompt('<prompt schema="other"/>'))


PARAMS = """<schema name="trip">
  <module name="plan">A trip of <parameter name="days" length="3" scaffold="two"/> days
    to <parameter name="city" length="4"/>.</module>
</schema>"""


class WordTokenizer:
    """One token per word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return list(range(len(text.split())))


def test_parameter_arguments_replace_parameters_and_split_the_module():
    schema = parse_schema(PARAMS)
    pieces = schema.module_pieces()
    assert [(p.name, p.text) for p in pieces] == [
        ("trip/plan#0", "A trip of "), ("trip/plan#1", " days\n    to "), ("trip/plan#2", ".")]
    plan = schema.root.modules["plan"]
    assert (plan.parameters["days"].length, plan.parameters["days"].scaffold) == (3, "two")
    assert plan.parameters["city"].scaffold is None
    parts = resolve(schema, parse_prompt('<prompt schema="trip"><plan days="five" '
                                         'city="New York"/></prompt>'), tokenizer=WordTokenizer())
    assert [(p.kind, p.text) for p in parts] == [
        ("module", "A trip of "), ("text", "five"), ("module", " days\n    to "),
        ("text", "New York"), ("module", ".")]
    check_pieces(schema, parts)


def test_omitted_argument_produces_no_text():
    parts = resolve(parse_schema(PARAMS), parse_prompt('<prompt schema="trip"><plan city="Rome"/>'
                                                       '</prompt>'))
    assert joined(parts) == "A trip of  days\n    to Rome."


def test_argument_longer_than_its_parameter_is_an_error_with_a_tokenizer():
    prompt = parse_prompt('<prompt schema="trip"><plan days="one two three four"/></prompt>')
    with pytest.raises(PMLError, match=r"parameter 'days' of module 'trip/plan' is 4 tokens; "
                                       r"it takes at most 3"):
        resolve(parse_schema(PARAMS), prompt, tokenizer=WordTokenizer())
    assert "one two three four" in joined(resolve(parse_schema(PARAMS), prompt))


def test_unknown_parameter_names_parameter_and_module():
    prompt = parse_prompt('<prompt schema="trip"><plan weeks="2"/></prompt>')
    with pytest.raises(UnknownParameterError, match=r"module 'trip/plan' has no parameter "
                                                    r"'weeks' \(it has: days, city\)"):
        resolve(parse_schema(PARAMS), prompt)


def test_uncached_module_is_text_and_its_children_too():
    schema = parse_schema('<schema name="s"><module name="a">A text.</module>'
                          '<module name="b" cache="false">B text.<module name="c">C.</module>'
                          '</module></schema>')
    assert [p.name for p in schema.module_pieces()] == ["s/a"]
    parts = resolve(schema, parse_prompt('<prompt schema="s"><a/><b><c/></b></prompt>'))
    assert parts == [Part("module", "A text.", "s/a"), Part("text", "B text.C.", None)]


def test_chat_tags_wrap_text_and_wrappers_join_the_enclosing_piece():
    schema = parse_schema("""<schema name="chat">
      <system>  Be brief.  </system>
      <user>Read this: <module name="doc">  The document. </module></user>
      <module name="hint"><assistant>Ready.</assistant></module>
    </schema>""")
    assert schema.module_pieces(WRAPPERS) == [
        Part("module", "<S>Be brief.</S>", "chat#0", "system"),
        Part("module", "<U>Read this: ", "chat#1", "user"),
        Part("module", " The document. ", "chat/doc", "user"),
        Part("module", "</U>", "chat#2", "user"),
        Part("module", "<A>Ready.</A>", "chat/hint", "assistant")]
    assert [p.text for p in schema.module_pieces()] == [
        "Be brief.", "Read this: ", " The document. ", "Ready."]
    prompt = parse_prompt('<prompt schema="chat"><doc/>\n <user> Why? </user>\n'
                          '<assistant>Because.</assistant>  <user>And?</user></prompt>')
    parts = resolve(schema, prompt, role_wrappers=WRAPPERS)
    check_pieces(schema, parts, WRAPPERS)
    assert parts[-3:] == [Part("text", "<U>Why?</U>", None, "user"),
                          Part("text", "<A>Because.</A>", None, "assistant"),
                          Part("text", "<U>And?</U>", None, "user")]
    assert joined(resolve(schema, prompt)).endswith(" The document. Why?Because.And?")


def test_empty_system_tag_produces_no_text():
    schema = parse_schema('<schema name="s"><system/><user><module name="m">M</module>'
                          '</user></schema>')
    assert joined(schema.module_pieces(WRAPPERS)) == "<U>M</U>"


def test_adjacent_text_parts_of_one_role_merge():
    schema = parse_schema('<schema name="s"><module name="m" cache="false">x '
                          '<parameter name="p" length="9"/> y </module></schema>')
    parts = resolve(schema, parse_prompt('<prompt schema="s"><m p="arg"/> tail</prompt>'))
    assert parts == [Part("text", "x arg y tail", None)]


def test_turn_left_open_by_the_schema_must_be_closed_first():
    schema = parse_schema('<schema name="s"><user><module name="m">M</module></schema>')
    assert schema.open_role == "user"
    closed = parse_prompt('<prompt schema="s"><m/>Q</user><assistant>A:</prompt>')
    assert joined(resolve(schema, closed, role_wrappers=WRAPPERS)) == "<U>MQ</U><A>A:"
    continued = parse_prompt('<prompt schema="s"><m/>more</prompt>')
    assert joined(resolve(schema, continued, role_wrappers=WRAPPERS)) == "<U>Mmore"
    with pytest.raises(PMLError, match=r"leaves <user> open; the prompt must close it "
                                       r"\(</user>\) before <assistant>"):
        resolve(schema, parse_prompt('<prompt schema="s"><assistant>A</assistant></prompt>'))
    with pytest.raises(PMLError, match=r"closing </system>, but schema 's' leaves <user> open"):
        resolve(schema, parse_prompt('<prompt schema="s">x</system></prompt>'))
    with pytest.raises(PMLError, match="leaves no chat turn open"):
        resolve(parse_schema('<schema name="s"/>'), closed)


def test_whitespace_rule():
    schema = parse_schema("<schema name='w'>\n  <module name='a'>\n\tone\n  two  \n</module>\n"
                          "  <module name='b'>x<parameter name='p' length='2'/>  "
                          "<parameter name='q' length='2'/>\n</module></schema>")
    assert [p.text for p in schema.module_pieces()] == [" one\n  two ", " ", "x", " "]
    parts = resolve(schema, parse_prompt("<prompt schema='w'><a/><b p='1' q='2'/></prompt>"))
    assert joined(parts) == " one\n  two  x1 2"


def test_markup_entities_cdata_comments_and_literal_lt():
    schema = parse_schema('<?xml version="1.0"?>\n<!-- top -->\n<schema name="e">'
                          '<module name="m">a &lt;b&gt; &amp; &quot;c&quot; &#65;&#x42; &nbsp; '
                          'x < y, p<=q, AT&T <!-- gone --><![CDATA[<tag> & ]]></module></schema>')
    assert schema.module_pieces()[0].text == 'a <b> & "c" AB &nbsp; x < y, p<=q, AT&T <tag> & '
    prompt = parse_prompt("<prompt schema='e'><m/> if a &lt; b &amp;&amp; c: pass</prompt>")
    assert joined(resolve(schema, prompt)).endswith(" if a < b && c: pass")


def test_attribute_values_are_unescaped_and_may_use_either_quote():
    schema = parse_schema("<schema name='s'><module name='m'><parameter name='p' length='9' "
                          "scaffold=\"it's &quot;x&quot;\"/></module></schema>")
    assert schema.root.modules["m"].parameters["p"].scaffold == 'it\'s "x"'
    prompt = parse_prompt('<prompt schema="s"><m p=\'a &amp; "b"\'/></prompt>')
    assert joined(resolve(schema, prompt)) == 'a & "b"'


# ---------------------------------------------------------------- errors with positions

SYNTAX_ERRORS = [
    # (parser, text, line, column, message)
    ("schema", '<schema name="s">\n  <module name="a">text\n</schema>', 3, 1,
     "</schema> does not match <module> (opened at line 2, column 3)"),
    ("schema", '<schema name="s">\n  <module name="a">text', 2, 3, "<module> is never closed"),
    ("schema", '<schema name="s"><module name="a"></modul></schema>', 1, 35,
     "</modul> does not match <module>"),
    ("schema", '<schema name="s">\n<module name=a></module></schema>', 2, 14,
     "the value of 'name' must be quoted"),
    ("schema", '<schema name="s"><module name></module></schema>', 1, 30,
     "expected '=' after 'name'"),
    ("schema", '<schema name="s"><module name="a"cache="false"/></schema>', 1, 34,
     "expected a space before 'cache'"),
    ("schema", '<schema name="s"><module name="a" name="b"/></schema>', 1, 35,
     "attribute 'name' is given twice"),
    ("schema", '<schema name="s"><module name="a" $/></schema>', 1, 35,
     "expected an attribute name, '>' or '/>'"),
    ("schema", '<schema name="s"><module name="a></module></schema>', 1, 31,
     "the value of 'name' in <module> is never closed"),
    ("schema", '<schema name="s">\n  <modul name="a"/></schema>', 2, 3,
     "unknown tag <modul> in <schema>"),
    ("schema", '<schema name="s"><parameter name="p" length="1"/></schema>', 1, 18,
     "unknown tag <parameter> in <schema>"),
    ("schema", '<schema name="s"><module name="m"><parameter name="p" length="x"/></module>'
               '</schema>', 1, 55, "parameter length must be a positive number"),
    ("schema", '<schema name="s"><module name="m"><parameter name="p"/></module></schema>',
     1, 35, "<parameter> needs a 'length' attribute"),
    ("schema", '<schema name="s"><module name="m"><parameter name="p" length="1">'
               '</parameter></module></schema>', 1, 35, "<parameter> must be empty"),
    ("schema", '<schema name="s"><module name="m" cahce="false"/></schema>', 1, 35,
     "unknown attribute 'cahce' on <module> (allowed: name, cache)"),
    ("schema", '<schema name="s"><module name="m" cache="no"/></schema>', 1, 35,
     "cache must be \"true\" or \"false\""),
    ("schema", '<schema name="s"><module name="1a"/></schema>', 1, 26,
     "'1a' is not a valid name"),
    ("schema", '<schema name="s"><module name="user"/></schema>', 1, 26,
     "'user' is a chat tag and cannot name a module"),
    ("schema", '<schema name="s">\n<module name="a"/>\n<union><module name="a"/></union>'
               '</schema>', 3, 16, "'a' is already defined here (at line 2, column 9)"),
    ("schema", '<schema name="s"><union scaffold="c"><module name="a"/></union></schema>',
     1, 25, "union scaffold 'c' is none of its modules"),
    ("schema", '<schema name="s"><union>\n  stray <module name="a"/></union></schema>', 2, 3,
     "<union> holds only modules, not text"),
    ("schema", '<schema name="s"><union><user></user></union></schema>', 1, 25,
     "<union> holds only <module> tags, not <user>"),
    ("schema", '<schema name="s"><user><system>x</system></user></schema>', 1, 24,
     "chat turns do not nest: <system> inside <user> (opened at line 1, column 18)"),
    ("schema", '<schema name="s"><user><module name="m"><assistant/></module></user></schema>',
     1, 41, "chat turns do not nest: <assistant> inside <user>"),
    ("schema", '<schema name="s"><module name="m"><user>x</module></schema>', 1, 42,
     "</module> does not match <user> (opened at line 1, column 35)"),
    ("schema", '<schema name="s"><user>x</system></schema>', 1, 25,
     "</system> does not match <user>"),
    ("schema", '<schema name="s"><user attr="1">x</user></schema>', 1, 24,
     "unknown attribute 'attr' on <user> (allowed: none)"),
    ("schema", '<schema name="s">x</schema>\n<schema name="t"/>', 2, 1,
     "content after </schema>"),
    ("schema", 'hello <schema name="s"/>', 1, 1, "text before <schema>"),
    ("schema", '<prompt schema="s"/>', 1, 1, "expected <schema>, found <prompt>"),
    ("schema", '', 1, 1, "expected <schema>, found no tag"),
    ("schema", '<schema/>', 1, 1, "<schema> needs a 'name' attribute"),
    ("schema", '<schema name="s"><!-- never closed </schema>', 1, 18,
     "comment is never closed"),
    ("schema", '<schema name="s"><![CDATA[ x </schema>', 1, 18, "CDATA section is never closed"),
    ("schema", '<schema name="s"><?pi?></schema>', 1, 18, "'<?' is only allowed before the root"),
    ("schema", '<!DOCTYPE x><schema name="s"/>', 1, 1, "unsupported markup '<!'"),
    ("schema", '<schema name="s"></ schema>', 1, 20, "expected a tag name after '</'"),
    ("schema", '<schema name="s"></schema x>', 1, 27, "expected '>' to end </schema>"),
    ("schema", '<schema name="s"><module name="m"', 1, 18,
     "<module> is never closed (missing '>')"),
    ("prompt", '<prompt schema="s">\n  <a/>\n  text\n  <b/>\n</prompt>', 4, 3,
     "module selection <b> after the prompt's text; selections come first"),
    ("prompt", '<prompt schema="s"><a/><a/></prompt>', 1, 24,
     "module 'a' is selected twice (first at line 1, column 20)"),
    ("prompt", '<prompt schema="s"><a>text</a></prompt>', 1, 23,
     "a module selection holds only module selections, not text"),
    ("prompt", '<prompt schema="s"><a><user>x</user></a></prompt>', 1, 23,
     "chat tag <user> inside module selection <a>"),
    ("prompt", '<prompt schema="s"><a></b></prompt>', 1, 23, "</b> does not match <a>"),
    ("prompt", '<prompt schema="s"><user>x</user></user></prompt>', 1, 34,
     "</user> does not match <prompt>"),
    ("prompt", '<prompt schema="s"><user>x<assistant>', 1, 27,
     "chat turns do not nest: <assistant> inside <user>"),
    ("prompt", '<prompt schema="s"><a x="1" x="2"/></prompt>', 1, 29,
     "attribute 'x' is given twice in <a>"),
    ("prompt", '<prompt>x</prompt>', 1, 1, "<prompt> needs a 'schema' attribute"),
    ("prompt", '<prompt schema="s" name="x"/>', 1, 20, "unknown attribute 'name' on <prompt>"),
    ("prompt", '<prompt schema="s">\n<a/>', 1, 1, "<prompt> is never closed"),
]


@pytest.mark.parametrize("parser,text,line,column,message", SYNTAX_ERRORS)
def test_syntax_errors_point_at_the_problem(parser, text, line, column, message):
    parse = parse_schema if parser == "schema" else parse_prompt
    with pytest.raises(PMLSyntaxError) as caught:
        parse(text)
    assert (caught.value.line, caught.value.column) == (line, column), str(caught.value)
    assert message in str(caught.value)
    assert str(caught.value).endswith(f"(line {line}, column {column})")


def test_error_classes():
    assert issubclass(PMLError, ValueError)
    for cls in (PMLSyntaxError, UnknownModuleError, UnknownParameterError):
        assert issubclass(cls, PMLError)


# ---------------------------------------------------------------- chat templates

CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}")
# Llama 2's template: the system prompt goes into the first user message.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}")


class TemplateTokenizer:
    """apply_chat_template as transformers renders it: Jinja with raise_exception."""

    def __init__(self, template: str | None, bos_token: str = "<s>"):
        self.chat_template = template
        self.bos_token = bos_token
        self.eos_token = "</s>"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        template = jinja2.Environment().from_string(self.chat_template)
        return template.render(messages=messages, bos_token=self.bos_token,
                               eos_token=self.eos_token, raise_exception=raise_exception,
                               add_generation_prompt=add_generation_prompt)


def test_chat_role_wrappers_from_a_chatml_template_leave_out_the_default_system():
    assert chat_role_wrappers(TemplateTokenizer(CHATML_WITH_DEFAULT_SYSTEM)) == {
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n")}


def test_chat_role_wrappers_from_the_projects_tiny_model_template():
    from vllm_promptcache.tiny_model import CHAT_TEMPLATE

    wrappers = chat_role_wrappers(TemplateTokenizer(CHAT_TEMPLATE))
    assert wrappers == {role: (f"<|{role}|>\n", "<|end|>\n")
                        for role in ("system", "user", "assistant")}


def test_chat_role_wrappers_from_llama2_strip_bos_and_approximate_the_system():
    assert chat_role_wrappers(TemplateTokenizer(LLAMA2)) == {
        "system": ("[INST] <<SYS>>\n", "\n<</SYS>>\n\n"),
        "user": ("[INST] ", " [/INST]"),
        "assistant": (" ", " </s>")}


def test_chat_role_wrappers_fall_back_per_role_and_without_template():
    gemma = chat_role_wrappers(TemplateTokenizer(GEMMA, bos_token="<bos>"))
    assert gemma == {"system": PLAIN_ROLE_WRAPPERS["system"],
                     "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                     "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")}
    assert chat_role_wrappers(TemplateTokenizer(None)) == PLAIN_ROLE_WRAPPERS
    assert chat_role_wrappers(object()) == PLAIN_ROLE_WRAPPERS


def test_derived_wrappers_render_a_schema_and_prompt_like_the_template():
    tokenizer = TemplateTokenizer(CHATML_WITH_DEFAULT_SYSTEM)
    wrappers = chat_role_wrappers(tokenizer)
    schema = parse_schema('<schema name="s"><system>Sys.</system><user>'
                          '<module name="doc">Doc.</module></user>'
                          '<assistant>Ok.</assistant></schema>')
    prompt = parse_prompt('<prompt schema="s"><doc/><user>Q?</user></prompt>')
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Doc."},
         {"role": "assistant", "content": "Ok."}, {"role": "user", "content": "Q?"}],
        tokenize=False)
    assert joined(resolve(schema, prompt, role_wrappers=wrappers)) == expected
