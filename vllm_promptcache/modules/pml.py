"""Prompt Cache's markup language (PML): schemas of reusable prompt modules, and prompts.

PML comes from Prompt Cache (Gim et al., MLSys 2024; github.com/yale-sys/prompt-cache).
A *schema* lays its text out in modules, which are encoded once and reused; a *prompt*
names its schema, selects modules (giving arguments to their parameters) and adds its
own text::

    <schema name="travel">
      <system>You plan trips.</system>
      <user>
        <module name="plan">A trip of <parameter name="days" length="4"/> days
          <union scaffold="paris">
            <module name="paris">to Paris.</module>
            <module name="rome" cache="false">to Rome.</module>
          </union>
        </module>
      </user>
    </schema>

    <prompt schema="travel"><plan days="3"><rome/></plan><user>What to pack?</user></prompt>

The supported subset:

- `<schema name>` holds text, modules, unions and chat tags. `<module name [cache]>` holds
  text, nested modules, unions, parameters and chat tags. Module names are unique in their
  scope (a union's members belong to the scope around the union). `cache="false"` makes a
  module and everything inside it uncached.
- `<parameter name length [scaffold]/>` (in a module only): a placeholder for an argument
  of at most `length` tokens. `<union [scaffold]>` holds modules only, of which a prompt
  selects at most one; `scaffold` names a member.
- `<prompt schema>` holds module selections first, then free text and chat tags. A
  selection is a tag named after its module, with the arguments as attributes; a nested
  module is selected inside its parent's tag (`<plan days="3"><rome/></plan>`). The order
  of the selections does not matter: the schema's order does.
- `<system>`, `<user>`, `<assistant>` mark chat turns, which do not nest. A schema may end
  with a turn open and its prompt close it (a `</user>` before any other chat tag); a
  prompt may end with a turn open, for the model to continue. Prompt Cache's LongBench
  files do both. An empty `<system/>` means "no system prompt" and produces no text.
- Comments, an XML declaration, CDATA and the entities `&lt; &gt; &amp; &quot; &apos;
  &#N; &#xN;` are understood. A `<` that starts no tag (`a < b`, `x <= y`) and any other `&`
  are literal text, since Prompt Cache's examples hold code samples. Anything else
  malformed raises `PMLSyntaxError` with its line and column.

Whitespace: each run of text between two tags is compacted as in Prompt Cache: its
leading and its trailing whitespace each become one space; inner whitespace (code
indentation) is kept. Two changes give chat templates clean turns: whitespace that
touches a chat tag is dropped, and a run that is only whitespace becomes one space only
between two elements of one body (modules, unions, parameters), being dropped elsewhere.
The prompt's own text is stripped at its start and end, as in Prompt Cache.

Parameters: an argument replaces its parameter; an omitted argument produces no text (in
Prompt Cache a scaffold stands in for the argument only while the module is encoded).
Unions: with no member selected a union produces no text. Both scaffolds are recorded
(`Parameter.scaffold`, `Union.scaffold`) but not used here.

`resolve` returns the prompt as Parts whose texts, concatenated, are the whole prompt:
the schema's own text, the selected modules in schema order, the arguments and the
prompt's text. A module's own text is cut at every element and chat tag inside it; each
piece is a Part of kind "module" named "<schema>/<module>[/<child>...]", with "#0",
"#1"... appended when the module has more than one piece (the schema's own text is
named "<schema>[#i]"). `Schema.module_pieces` lists every cacheable piece with the same
names and texts, to register ahead of time.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from . import registry
from .registry import ModuleError

__all__ = ["PLAIN_ROLE_WRAPPERS", "ROLES", "Module", "Parameter", "Part", "PMLError",
           "PMLSyntaxError", "Prompt", "RoleWrappers", "Schema", "Selection", "Union",
           "UnknownModuleError", "UnknownParameterError", "chat_role_wrappers", "parse_prompt",
           "parse_schema", "resolve"]

ROLES = ("system", "user", "assistant")
# role -> (prefix, suffix) around a message of that role.
RoleWrappers = Mapping[str, tuple[str, str]]
# Used when a tokenizer has no chat template, or its template rejects a role.
PLAIN_ROLE_WRAPPERS: dict[str, tuple[str, str]] = {
    "system": ("System: ", "\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_SPACE = re.compile(r"\s*")
_VISIBLE = re.compile(r"\S")
_ENTITY = re.compile(r"&(lt|gt|amp|quot|apos|#[0-9]+|#x[0-9a-fA-F]+);")
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


class PMLError(ModuleError):
    """Invalid PML, or a prompt that does not fit its schema."""


class PMLSyntaxError(PMLError):
    """The markup is malformed or breaks a PML rule at `line`, `column` (1-based)."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"{message} (line {line}, column {column})")
        self.line = line
        self.column = column


class UnknownModuleError(PMLError, registry.UnknownModuleError):
    """A prompt selects a module that its schema does not have there."""


class UnknownParameterError(PMLError):
    """A prompt gives an argument to a parameter that its module does not declare."""


@dataclass(frozen=True)
class Part:
    kind: str  # "module": cacheable text of a module; "text": computed for each prompt
    text: str
    name: str | None  # the piece's key for kind "module", else None
    role: str | None = None  # the chat turn the text lies in, if any


# ---------------------------------------------------------------- parsed documents


@dataclass(frozen=True)
class Parameter:
    name: str
    length: int  # the longest argument, in tokens
    scaffold: str | None


@dataclass(frozen=True)
class Module:
    name: str
    key: str  # "<schema>/<module>/...", the schema's own key for its root
    cached: bool
    body: tuple[Node, ...]
    modules: dict[str, Module]  # selectable here: children and union members
    parameters: dict[str, Parameter]


@dataclass(frozen=True)
class Union:
    members: tuple[Module, ...]
    scaffold: str | None


@dataclass(frozen=True)
class _TextRun:
    text: str


@dataclass(frozen=True)
class _Turn:
    """A chat tag: the start (opening) or the end of a turn of `role`."""
    role: str
    opening: bool


_Element = Module | Union | Parameter
Node = _TextRun | _Turn | _Element


@dataclass(frozen=True)
class Schema:
    name: str
    root: Module  # the schema's own body
    open_role: str | None  # the chat turn left open at the end, for the prompt to close

    def module_pieces(self, role_wrappers: RoleWrappers | None = None) -> list[Part]:
        """Every cacheable piece, in document order, as `resolve` emits it."""
        return [p for p in _all_parts(self.root, None, role_wrappers) if p.kind == "module"]


@dataclass(frozen=True)
class Selection:
    name: str
    arguments: dict[str, str]
    children: tuple[Selection, ...]
    line: int
    column: int


@dataclass(frozen=True)
class Prompt:
    schema_name: str
    selections: tuple[Selection, ...]
    body: tuple[_TextRun | _Turn, ...]  # the prompt's own text and chat tags
    closes_role: str | None  # the turn its schema left open, closed by a leading </role>


# ---------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Tag:
    name: str
    offset: int
    closing: bool = False  # </name>
    empty: bool = False  # <name/>
    attributes: dict[str, str] = field(default_factory=dict)
    attribute_offsets: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Chars:
    """Text between two tags; `offset` is that of its first visible character."""
    text: str
    offset: int


class _Source:
    def __init__(self, text: str):
        self.text = text
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def position(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def where(self, offset: int) -> str:
        return "line {}, column {}".format(*self.position(offset))

    def error(self, message: str, offset: int) -> PMLSyntaxError:
        return PMLSyntaxError(message, *self.position(offset))


def _unescape(text: str) -> str:
    def replace(match: re.Match) -> str:
        ref = match.group(1)
        if not ref.startswith("#"):
            return _NAMED_ENTITIES[ref]
        code = int(ref[2:], 16) if ref.startswith("#x") else int(ref[1:])
        return chr(code) if code <= 0x10FFFF else match.group(0)

    return _ENTITY.sub(replace, text)


# Deeper markup is refused (a syntax error, HTTP 400), before any recursive parse.
MAX_NESTING = 64


def _tokens(src: _Source) -> list[_Tag | _Chars]:
    text = src.text
    tokens: list[_Tag | _Chars] = []
    depth = 0
    run: list[str] = []  # the current text run, across comments
    visible: int | None = None  # offset of the run's first visible character

    def flush() -> None:
        nonlocal run, visible
        if run:
            tokens.append(_Chars("".join(run), visible if visible is not None else 0))
        run, visible = [], None

    def add(start: int, end: int, chars: str) -> None:
        """Text `chars`, read from the source between `start` and `end`."""
        nonlocal visible
        first = _VISIBLE.search(text, start, end)
        if visible is None and first:
            visible = first.start()
        run.append(chars)

    pos = 0
    while pos < len(text):
        lt = text.find("<", pos)
        if lt < 0:
            lt = len(text)
        if lt > pos:
            add(pos, lt, _unescape(text[pos:lt]))
        if lt == len(text):
            break
        if text.startswith("<!--", lt):
            pos = _find_end(src, "-->", lt, "comment")
        elif text.startswith("<![CDATA[", lt):
            pos = _find_end(src, "]]>", lt, "CDATA section")
            add(lt + 9, pos - 3, text[lt + 9:pos - 3])
        elif text.startswith("<?", lt):
            if tokens or visible is not None:
                raise src.error("'<?' is only allowed before the root tag", lt)
            pos = _find_end(src, "?>", lt, "declaration")
        elif text.startswith("</", lt):
            flush()
            tag, pos = _close_tag(src, lt)
            tokens.append(tag)
            depth = max(0, depth - 1)
        elif _NAME.match(text, lt + 1):
            flush()
            tag, pos = _open_tag(src, lt)
            tokens.append(tag)
            if not tag.empty:
                depth += 1
                if depth > MAX_NESTING:
                    raise src.error(f"tags nested deeper than {MAX_NESTING} levels", lt)
        elif text.startswith("<!", lt):
            raise src.error("unsupported markup '<!' (only comments and CDATA are allowed)", lt)
        else:  # a literal '<', as in "a < b"
            add(lt, lt + 1, "<")
            pos = lt + 1
    flush()
    return tokens


def _find_end(src: _Source, terminator: str, start: int, what: str) -> int:
    end = src.text.find(terminator, start)
    if end < 0:
        raise src.error(f"{what} is never closed (missing {terminator!r})", start)
    return end + len(terminator)


def _close_tag(src: _Source, lt: int) -> tuple[_Tag, int]:
    name = _NAME.match(src.text, lt + 2)
    if not name:
        raise src.error("expected a tag name after '</'", lt + 2)
    end = _SPACE.match(src.text, name.end()).end()
    if not src.text.startswith(">", end):
        raise src.error(f"expected '>' to end </{name.group()}>", end)
    return _Tag(name.group(), lt, closing=True), end + 1


def _open_tag(src: _Source, lt: int) -> tuple[_Tag, int]:
    text = src.text
    name = _NAME.match(text, lt + 1).group()
    attributes: dict[str, str] = {}
    offsets: dict[str, int] = {}
    pos = lt + 1 + len(name)
    while True:
        start = _SPACE.match(text, pos).end()
        if start == len(text):
            raise src.error(f"<{name}> is never closed (missing '>')", lt)
        for ending, empty in ((">", False), ("/>", True)):
            if text.startswith(ending, start):
                tag = _Tag(name, lt, empty=empty, attributes=attributes, attribute_offsets=offsets)
                return tag, start + len(ending)
        key = _NAME.match(text, start)
        if not key:
            raise src.error(f"bad attribute syntax in <{name}>: expected an attribute name, "
                            f"'>' or '/>'", start)
        if start == pos:
            raise src.error(f"bad attribute syntax in <{name}>: expected a space before "
                            f"{key.group()!r}", start)
        if key.group() in attributes:
            raise src.error(f"attribute {key.group()!r} is given twice in <{name}>", start)
        equals = _SPACE.match(text, key.end()).end()
        if not text.startswith("=", equals):
            raise src.error(f"bad attribute syntax in <{name}>: expected '=' after "
                            f"{key.group()!r}", equals)
        quote_at = _SPACE.match(text, equals + 1).end()
        quote = text[quote_at:quote_at + 1]
        if quote not in ("'", '"'):
            raise src.error(f"bad attribute syntax in <{name}>: the value of {key.group()!r} "
                            f"must be quoted", quote_at)
        end = text.find(quote, quote_at + 1)
        if end < 0:
            raise src.error(f"the value of {key.group()!r} in <{name}> is never closed "
                            f"(missing {quote})", quote_at)
        attributes[key.group()] = _unescape(text[quote_at + 1:end])
        offsets[key.group()] = start
        pos = end + 1


# ---------------------------------------------------------------- parser


class _Cursor:
    def __init__(self, text: str):
        self.src = _Source(text)
        self._tokens = _tokens(self.src)
        self._next = 0

    def root(self, expected: str) -> _Tag:
        """The document's root tag, which must be <expected>."""
        for token in self._tokens:
            self._next += 1
            if isinstance(token, _Chars):
                if token.text.strip():
                    raise self.src.error(f"text before <{expected}>", token.offset)
                continue
            if token.closing or token.name != expected:
                shown = f"</{token.name}>" if token.closing else f"<{token.name}>"
                raise self.src.error(f"expected <{expected}>, found {shown}", token.offset)
            return token
        raise self.src.error(f"expected <{expected}>, found no tag", len(self.src.text))

    def take(self, owner: _Tag) -> _Tag | _Chars:
        """The next token inside `owner`; running out means `owner` is never closed."""
        if self._next == len(self._tokens):
            raise self.src.error(f"<{owner.name}> is never closed", owner.offset)
        self._next += 1
        return self._tokens[self._next - 1]

    def finish(self, root: _Tag) -> None:
        for token in self._tokens[self._next:]:
            if not isinstance(token, _Chars) or token.text.strip():
                raise self.src.error(f"content after </{root.name}>", token.offset)

    def attributes(self, tag: _Tag, required: tuple[str, ...],
                   optional: tuple[str, ...] = ()) -> dict[str, str]:
        for key, offset in tag.attribute_offsets.items():
            if key not in required + optional:
                allowed = ", ".join(required + optional) or "none"
                raise self.src.error(f"unknown attribute {key!r} on <{tag.name}> (allowed: "
                                     f"{allowed})", offset)
        for key in required:
            if key not in tag.attributes:
                raise self.src.error(f"<{tag.name}> needs a {key!r} attribute", tag.offset)
        return tag.attributes

    def name(self, tag: _Tag, key: str, scope: dict[str, int]) -> str:
        """The name in attribute `key`, checked and claimed in `scope` (name -> offset)."""
        name, offset = tag.attributes[key], tag.attribute_offsets[key]
        if not _NAME.fullmatch(name):
            raise self.src.error(f"{name!r} is not a valid name (letters, digits, '_', '-', "
                                 f"'.'; not starting with a digit, '-' or '.')", offset)
        if name in scope:
            raise self.src.error(f"{name!r} is already defined here (at "
                                 f"{self.src.where(scope[name])})", offset)
        scope[name] = offset
        return name

    def mismatch(self, tag: _Tag, expected: _Tag) -> PMLSyntaxError:
        return self.src.error(f"</{tag.name}> does not match <{expected.name}> (opened at "
                              f"{self.src.where(expected.offset)})", tag.offset)


class _Turns:
    """The chat turn open in one body; turns do not nest, also across bodies."""

    def __init__(self, cursor: _Cursor, outer: _Tag | None):
        self.cursor = cursor
        self.outer = outer  # a turn open around this body
        self.open: _Tag | None = None

    def start(self, tag: _Tag) -> _Turn | None:
        self.cursor.attributes(tag, ())
        around = self.open or self.outer
        if around is not None:
            raise self.cursor.src.error(
                f"chat turns do not nest: <{tag.name}> inside <{around.name}> (opened at "
                f"{self.cursor.src.where(around.offset)})", tag.offset)
        if tag.empty:
            return None
        self.open = tag
        return _Turn(tag.name, True)

    def end(self, tag: _Tag, owner: _Tag) -> _Turn:
        if self.open is None or self.open.name != tag.name:
            raise self.cursor.mismatch(tag, self.open or owner)
        self.open = None
        return _Turn(tag.name, False)

    def around(self) -> _Tag | None:
        return self.open or self.outer


def parse_schema(text: str) -> Schema:
    cursor = _Cursor(text)
    tag = cursor.root("schema")
    cursor.attributes(tag, ("name",))
    name = cursor.name(tag, "name", {})
    root, open_turn = _module_body(cursor, tag, name, name, True, None, top_level=True)
    cursor.finish(tag)
    return Schema(name, root, open_turn.name if open_turn else None)


def _module_body(cursor: _Cursor, owner: _Tag, name: str, key: str, cached: bool,
                 outer_turn: _Tag | None, top_level: bool) -> tuple[Module, _Tag | None]:
    """The module `owner` opens (or the schema's root); returns it and the turn left open,
    which only the schema's root may do."""
    nodes: list[Node | _Chars] = []
    scope: dict[str, int] = {}  # module names -> offset
    parameter_scope: dict[str, int] = {}
    modules: dict[str, Module] = {}
    parameters: dict[str, Parameter] = {}
    turns = _Turns(cursor, outer_turn)
    while not owner.empty:
        token = cursor.take(owner)
        if isinstance(token, _Chars):
            nodes.append(token)
        elif token.closing and token.name in ROLES:
            nodes.append(turns.end(token, owner))
        elif token.closing:
            if token.name != owner.name:
                raise cursor.mismatch(token, owner)
            if turns.open is not None and not top_level:
                raise cursor.mismatch(token, turns.open)
            break
        elif token.name in ROLES:
            turn = turns.start(token)
            if turn is not None:
                nodes.append(turn)
        elif token.name == "module":
            child = _module(cursor, token, key, cached, turns.around(), scope)
            modules[child.name] = child
            nodes.append(child)
        elif token.name == "union":
            union = _union(cursor, token, key, cached, turns.around(), scope)
            modules.update((m.name, m) for m in union.members)
            nodes.append(union)
        elif token.name == "parameter" and not top_level:
            parameter = _parameter(cursor, token, parameter_scope)
            parameters[parameter.name] = parameter
            nodes.append(parameter)
        else:
            allowed = "module, union, " + ("" if top_level else "parameter, ") + ", ".join(ROLES)
            raise cursor.src.error(f"unknown tag <{token.name}> in <{owner.name}> (allowed: "
                                   f"{allowed})", token.offset)
    return Module(name, key, cached, _compact(nodes), modules, parameters), turns.open


def _module(cursor: _Cursor, tag: _Tag, parent_key: str, parent_cached: bool,
            turn: _Tag | None, scope: dict[str, int]) -> Module:
    attributes = cursor.attributes(tag, ("name",), ("cache",))
    if attributes["name"] in ROLES:
        raise cursor.src.error(f"{attributes['name']!r} is a chat tag and cannot name a module",
                               tag.attribute_offsets["name"])
    name = cursor.name(tag, "name", scope)
    cache = attributes.get("cache", "true")
    if cache not in ("true", "false"):
        raise cursor.src.error(f"cache must be \"true\" or \"false\", not {cache!r}",
                               tag.attribute_offsets["cache"])
    cached = parent_cached and cache == "true"
    module, _ = _module_body(cursor, tag, name, f"{parent_key}/{name}", cached, turn,
                             top_level=False)
    return module


def _union(cursor: _Cursor, tag: _Tag, parent_key: str, cached: bool, turn: _Tag | None,
           scope: dict[str, int]) -> Union:
    scaffold = cursor.attributes(tag, (), ("scaffold",)).get("scaffold")
    members = []
    while not tag.empty:
        token = cursor.take(tag)
        if isinstance(token, _Chars):
            if token.text.strip():
                raise cursor.src.error("<union> holds only modules, not text", token.offset)
        elif token.closing:
            if token.name != "union":
                raise cursor.mismatch(token, tag)
            break
        elif token.name == "module":
            members.append(_module(cursor, token, parent_key, cached, turn, scope))
        else:
            raise cursor.src.error(f"<union> holds only <module> tags, not <{token.name}>",
                                   token.offset)
    if scaffold is not None and scaffold not in {m.name for m in members}:
        raise cursor.src.error(f"union scaffold {scaffold!r} is none of its modules",
                               tag.attribute_offsets["scaffold"])
    return Union(tuple(members), scaffold)


def _parameter(cursor: _Cursor, tag: _Tag, scope: dict[str, int]) -> Parameter:
    attributes = cursor.attributes(tag, ("name", "length"), ("scaffold",))
    if not tag.empty:
        raise cursor.src.error("<parameter> must be empty: <parameter .../>", tag.offset)
    name = cursor.name(tag, "name", scope)
    length = attributes["length"]
    if not length.isdecimal() or int(length) == 0:
        raise cursor.src.error(f"parameter length must be a positive number of tokens, not "
                               f"{length!r}", tag.attribute_offsets["length"])
    return Parameter(name, int(length), attributes.get("scaffold"))


def _compact(nodes: list[Node | _Chars], strip_edges: bool = False) -> tuple[Node, ...]:
    """The body with its text runs merged and compacted (the whitespace rule, see top);
    `strip_edges` drops the whitespace at the body's start and end."""
    merged: list[Node | _Chars] = []
    for node in nodes:
        if isinstance(node, _Chars) and merged and isinstance(merged[-1], _Chars):
            merged[-1] = _Chars(merged[-1].text + node.text, merged[-1].offset)
        else:
            merged.append(node)
    body: list[Node] = []
    for i, node in enumerate(merged):
        if not isinstance(node, _Chars):
            body.append(node)
            continue
        before = merged[i - 1] if i > 0 else None
        after = merged[i + 1] if i + 1 < len(merged) else None
        core = node.text.strip()
        if core:
            lead = " " if node.text[0].isspace() and _keeps_space(before, strip_edges) else ""
            trail = " " if node.text[-1].isspace() and _keeps_space(after, strip_edges) else ""
            body.append(_TextRun(lead + core + trail))
        elif node.text and _is_element(before) and _is_element(after):
            body.append(_TextRun(" "))
    return tuple(body)


def _is_element(node: Node | _Chars | None) -> bool:
    return isinstance(node, _Element)


def _keeps_space(neighbour: Node | _Chars | None, strip_edges: bool) -> bool:
    """Whether text keeps a space on the side of `neighbour` (None: the body's edge)."""
    return not isinstance(neighbour, _Turn) and not (neighbour is None and strip_edges)


def parse_prompt(text: str) -> Prompt:
    cursor = _Cursor(text)
    tag = cursor.root("prompt")
    schema_name = cursor.attributes(tag, ("schema",))["schema"]
    selections: list[Selection] = []
    names: dict[str, int] = {}
    nodes: list[_Turn | _Chars] = []  # from the first text or chat tag on
    turns = _Turns(cursor, None)
    closes_role = None
    seen_turn = False
    while not tag.empty:
        token = cursor.take(tag)
        if isinstance(token, _Chars):
            if nodes or token.text.strip():
                nodes.append(token)
        elif token.closing and token.name in ROLES:
            if turns.open is None and not seen_turn:
                closes_role = token.name  # the turn the schema left open
                nodes.append(_Turn(token.name, False))
            else:
                nodes.append(turns.end(token, tag))
            seen_turn = True
        elif token.closing:
            if token.name != tag.name:
                raise cursor.mismatch(token, tag)
            break
        elif token.name in ROLES:
            turn = turns.start(token)
            if turn is not None:
                nodes.append(turn)
            seen_turn = True
        elif nodes:
            raise cursor.src.error(f"module selection <{token.name}> after the prompt's text; "
                                   f"selections come first", token.offset)
        else:
            selections.append(_selection(cursor, token, names))
    cursor.finish(tag)
    return Prompt(schema_name, tuple(selections), _compact(nodes, strip_edges=True),
                  closes_role)


def _selection(cursor: _Cursor, tag: _Tag, siblings: dict[str, int]) -> Selection:
    if tag.name in siblings:
        raise cursor.src.error(f"module {tag.name!r} is selected twice (first at "
                               f"{cursor.src.where(siblings[tag.name])})", tag.offset)
    siblings[tag.name] = tag.offset
    children: list[Selection] = []
    names: dict[str, int] = {}
    while not tag.empty:
        token = cursor.take(tag)
        if isinstance(token, _Chars):
            if token.text.strip():
                raise cursor.src.error(f"a module selection holds only module selections, not "
                                       f"text (in <{tag.name}>)", token.offset)
        elif token.closing:
            if token.name != tag.name:
                raise cursor.mismatch(token, tag)
            break
        elif token.name in ROLES:
            raise cursor.src.error(f"chat tag <{token.name}> inside module selection "
                                   f"<{tag.name}>; chat turns follow the selections",
                                   token.offset)
        else:
            children.append(_selection(cursor, token, names))
    return Selection(tag.name, dict(tag.attributes), tuple(children),
                     *cursor.src.position(tag.offset))


# ---------------------------------------------------------------- resolving


def _layout(body: tuple[Node, ...], role: str | None, wrappers: RoleWrappers | None
            ) -> list[tuple[str | _Element, str | None]]:
    """The body as (own text or element, chat role) pairs: text is cut at each element
    and chat tag, and a tag's wrapper text joins the text inside its turn."""
    laid: list[tuple[str | _Element, str | None]] = []
    pending = ""
    for node in body:
        if isinstance(node, _TextRun):
            pending += node.text
            continue
        if not isinstance(node, _Turn):
            laid.append((pending, role))
            laid.append((node, role))
            pending = ""
            continue
        prefix, suffix = wrappers.get(node.role, ("", "")) if wrappers else ("", "")
        if node.opening:
            laid.append((pending, role))
            pending, role = prefix, node.role
        else:
            laid.append((pending + suffix, role))
            pending, role = "", None
    laid.append((pending, role))
    return [(item, r) for item, r in laid if item != ""]


def _own_parts(module: Module, role: str | None, wrappers: RoleWrappers | None
               ) -> list[Part | tuple[_Element, str | None]]:
    """The module's own text as named Parts, its elements (with their role) in place."""
    laid = _layout(module.body, role, wrappers)
    numbered = sum(isinstance(item, str) for item, _ in laid) > 1
    out: list[Part | tuple[_Element, str | None]] = []
    pieces = 0
    for item, item_role in laid:
        if not isinstance(item, str):
            out.append((item, item_role))
        elif not module.cached:
            out.append(Part("text", item, None, item_role))
        else:
            name = f"{module.key}#{pieces}" if numbered else module.key
            out.append(Part("module", item, name, item_role))
            pieces += 1
    return out


def _all_parts(module: Module, role: str | None, wrappers: RoleWrappers | None
               ) -> Iterator[Part]:
    for item in _own_parts(module, role, wrappers):
        if isinstance(item, Part):
            yield item
            continue
        node, node_role = item
        if isinstance(node, Module):
            yield from _all_parts(node, node_role, wrappers)
        elif isinstance(node, Union):
            for member in node.members:
                yield from _all_parts(member, node_role, wrappers)


@dataclass(frozen=True)
class _Resolver:
    schema: Schema
    wrappers: RoleWrappers | None
    tokenizer: Any

    def module(self, module: Module, selections: tuple[Selection, ...],
               arguments: Mapping[str, str], role: str | None) -> Iterator[Part]:
        where = (f"schema {self.schema.name!r}" if module is self.schema.root
                 else f"module {module.key!r}")
        for name in arguments:
            if name not in module.parameters:
                raise UnknownParameterError(
                    f"{where} has no parameter {name!r} (it has: "
                    f"{', '.join(module.parameters) or 'none'})")
        chosen = {}
        for selection in selections:
            if selection.name not in module.modules:
                raise UnknownModuleError(
                    f"the prompt selects module {selection.name!r} (line {selection.line}, "
                    f"column {selection.column}), which {where} does not have (it has: "
                    f"{', '.join(module.modules) or 'none'})")
            chosen[selection.name] = selection
        for item in _own_parts(module, role, self.wrappers):
            if isinstance(item, Part):
                yield item
                continue
            node, node_role = item
            if isinstance(node, Parameter):
                yield from self.argument(module, node, arguments.get(node.name, ""), node_role)
                continue
            members = node.members if isinstance(node, Union) else (node,)
            picked = [m for m in members if m.name in chosen]
            if len(picked) > 1:
                raise PMLError(f"the prompt selects {' and '.join(m.name for m in picked)} "
                               f"from one union of {where}; a union takes one module")
            for member in picked:
                selection = chosen[member.name]
                yield from self.module(member, selection.children, selection.arguments,
                                       node_role)

    def argument(self, module: Module, parameter: Parameter, value: str,
                 role: str | None) -> Iterator[Part]:
        if not value:
            return
        if self.tokenizer is not None:
            tokens = len(self.tokenizer.encode(value, add_special_tokens=False))
            if tokens > parameter.length:
                raise PMLError(f"the argument of parameter {parameter.name!r} of module "
                               f"{module.key!r} is {tokens} tokens; it takes at most "
                               f"{parameter.length}")
        yield Part("text", value, None, role)


def resolve(schema: Schema, prompt: Prompt, role_wrappers: RoleWrappers | None = None,
            tokenizer: Any = None) -> list[Part]:
    """The prompt as ordered Parts (see the module doc); with `tokenizer`, arguments
    longer than their parameter's length raise PMLError."""
    if prompt.schema_name != schema.name:
        raise PMLError(f"the prompt is for schema {prompt.schema_name!r}, not "
                       f"{schema.name!r}")
    _check_turn_handover(schema, prompt)
    resolver = _Resolver(schema, role_wrappers, tokenizer)
    parts = list(resolver.module(schema.root, prompt.selections, {}, None))
    parts += [Part("text", text, None, role)
              for text, role in _layout(prompt.body, schema.open_role, role_wrappers)]
    return _merge_text(parts)


def _check_turn_handover(schema: Schema, prompt: Prompt) -> None:
    left_open = schema.open_role
    if prompt.closes_role is not None and prompt.closes_role != left_open:
        state = f"leaves <{left_open}> open" if left_open else "leaves no chat turn open"
        raise PMLError(f"the prompt starts by closing </{prompt.closes_role}>, but schema "
                       f"{schema.name!r} {state}")
    first_turn = next((n for n in prompt.body if isinstance(n, _Turn)), None)
    if left_open and first_turn is not None and first_turn.opening:
        raise PMLError(f"schema {schema.name!r} leaves <{left_open}> open; the prompt must "
                       f"close it (</{left_open}>) before <{first_turn.role}>")


def _merge_text(parts: list[Part]) -> list[Part]:
    merged: list[Part] = []
    for part in parts:
        last = merged[-1] if merged else None
        if last and part.kind == last.kind == "text" and part.role == last.role:
            merged[-1] = Part("text", last.text + part.text, None, part.role)
        else:
            merged.append(part)
    return merged


# ---------------------------------------------------------------- chat templates

_SENTINEL = {"system": "PMLSYSTEMSENTINEL", "user": "PMLUSERSENTINEL",
             "assistant": "PMLASSISTANTSENTINEL"}


def chat_role_wrappers(tokenizer: Any) -> dict[str, tuple[str, str]]:
    """role -> (prefix, suffix) that the tokenizer's chat template puts around a message.

    Each role is rendered with a sentinel as content and split there; user and assistant
    are rendered after a message of the role before them, so that what a template adds
    at the start of a conversation (a default system prompt) stays out of their prefix.
    The BOS text is dropped (BOS tokens are added separately). A template that merges the
    system prompt into the first user message (Llama 2, Mistral) gets an approximation:
    the system text with its own opening. A role the template rejects, or a tokenizer
    without a template, gets `PLAIN_ROLE_WRAPPERS`."""
    system_alone = _split(_render(tokenizer, ["system"]), _SENTINEL["system"])
    user = None
    if system_alone is not None:
        user = _wrapper_after(tokenizer, "system", system_alone[1], "user")
    if user is None:
        user = _split(_render(tokenizer, ["user"]), _SENTINEL["user"])
    assistant = _wrapper_after(tokenizer, "user", user[1] if user else "", "assistant")
    system = system_alone or _system_before_user(tokenizer, user)
    found = {"system": system, "user": user, "assistant": assistant}
    return {role: found[role] or PLAIN_ROLE_WRAPPERS[role] for role in ROLES}


def _render(tokenizer: Any, roles: list[str]) -> str | None:
    messages = [{"role": role, "content": _SENTINEL[role]} for role in roles]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # no template, or one that rejects these roles: many error types
        return None
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def _split(text: str | None, sentinel: str) -> tuple[str, str] | None:
    if text is None or sentinel not in text:
        return None
    prefix, suffix = text.split(sentinel, 1)
    return prefix, suffix


def _wrapper_after(tokenizer: Any, before: str, before_suffix: str, role: str
                   ) -> tuple[str, str] | None:
    """The wrapper of a `role` message rendered after a `before` message, whose suffix
    is `before_suffix`."""
    rest = _split(_render(tokenizer, [before, role]), _SENTINEL[before])
    if rest is None:
        return None
    return _split(rest[1].removeprefix(before_suffix), _SENTINEL[role])


def _system_before_user(tokenizer: Any, user: tuple[str, str] | None) -> tuple[str, str] | None:
    """The system wrapper of a template that renders a system message only before a user
    message: from the start to the system text, and from there to the user's prefix."""
    rendered = _split(_render(tokenizer, ["system", "user"]), _SENTINEL["system"])
    if rendered is None or _SENTINEL["user"] not in rendered[1]:
        return None
    between = rendered[1].split(_SENTINEL["user"], 1)[0]
    user_prefix = user[0] if user else ""
    if user_prefix and between.endswith(user_prefix):
        between = between[:-len(user_prefix)]
    return rendered[0], between
