"""Collect real English prose from what is installed on this machine into a training corpus.

Nothing can be downloaded, so the text comes from documentation that ships with the
system and the Python environment:

* ``pydoc_data/topics.py``: the Python reference documentation pydoc shows.
* Docstrings of the standard library, read with ``ast`` (nothing is imported).
* ``/usr/share/doc/**``: READMEs, NEWS, manuals (plain, gzipped or HTML).
* Documentation in site-packages: ``*.md``/``*.rst``/``*.txt`` files and the long
  descriptions in ``*.dist-info/METADATA``.

Output (to ``--out``, default /tmp/docs-corpus; keep it out of the repository):

* ``train.txt``: training documents, separated by ``DOC_SEPARATOR``.
* ``documents.jsonl``: held-out whole documents (300-3000 words) as
  ``{"id", "title", "text"}`` records, for perplexity and doc-QA style prompts.  They are
  held out by source file, and no paragraph of theirs appears in ``train.txt``.

Everything is deterministic: sources are walked in sorted order and the held-out split is
a hash of the document id.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import gzip
import hashlib
import html.parser
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# Documents in train.txt are separated by a form feed on its own line; cleanup removes
# form feeds from the texts, so the separator never occurs inside a document.
DOC_SEPARATOR = "\n\f\n"

# Held-out documents are whole documents of this many words.
HELDOUT_MIN_WORDS = 300
HELDOUT_MAX_WORDS = 3000
# Share of eligible documents held out (by a hash of their id, so stable across runs).
HELDOUT_PERCENT = 10

# A training document shorter than this (after deduplication) is dropped.
MIN_DOC_WORDS = 40
# Paragraphs shorter than this are too generic ("Example:", "Returns") to deduplicate.
MIN_DEDUP_PARAGRAPH_CHARS = 60
# Files larger than this are data, not documentation.
MAX_FILE_BYTES = 2_000_000

# Boilerplate and non-prose file names (lower case, compared without .gz).
SKIP_NAME_PREFIXES = (
    "changelog", "copyright", "copying", "license", "licence", "notice", "authors",
    "thanks", "contributors", "credits", "requirements", "record", "top_level",
    "entry_points", "sources", "dependency_links", "cmakelists", "installed-files",
)
DOC_SUFFIXES = (".md", ".rst", ".txt")
USR_SHARE_DOC_SUFFIXES = DOC_SUFFIXES + (".html", ".htm")
USR_SHARE_DOC_PLAIN_NAMES = ("readme", "news", "faq", "todo", "install", "usage", "bugs")
# Path components that mark test data or vendored third-party trees.
SKIP_DIR_NAMES = {"tests", "test", "testing", "testdata", "test_data", "idle_test", "data"}

_WORD = re.compile(r"[A-Za-z][a-z]+(?:'[a-z]+)?[.,;:!?)]?")
# English prose is about a third function words; word lists and API indexes are not.
FUNCTION_WORDS = frozenset(
    "the of and to a an in is are was be it that this for as with on by or not from at "
    "can which if you when will have has its into".split())


@dataclass(frozen=True)
class Document:
    id: str       # source kind and path, unique ("stdlib:json/decoder.py")
    title: str
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


# ---------------------------------------------------------------- cleanup and filtering

def clean_text(text: str) -> str:
    """Normalise whitespace and drop markup noise; keep paragraphs and indentation."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = text.replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    # Markdown images and badge lines are URLs, not prose.
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)
    text = re.sub(r"^\s*\[!\[.*$", "", text, flags=re.M)
    lines = [line.rstrip() for line in text.split("\n")]
    # RST/Markdown underlines and rulers ("=====", "-----", "***") carry no words.
    lines = ["" if re.fullmatch(r"\s*([=\-~^*#+_`.:])\1{3,}\s*", line) else line
             for line in lines]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def prose_scores(text: str) -> tuple[float, float]:
    """Fractions of whitespace-separated tokens that look like words / function words."""
    tokens = text.split()
    if not tokens:
        return 0.0, 0.0
    words = sum(1 for t in tokens if _WORD.fullmatch(t))
    function_words = sum(1 for t in tokens if t.lower().strip(".,;:()") in FUNCTION_WORDS)
    return words / len(tokens), function_words / len(tokens)


def looks_like_prose(text: str, min_words: float = 0.55, min_function: float = 0.12) -> bool:
    word_share, function_share = prose_scores(text)
    return (len(text.split()) >= MIN_DOC_WORDS and word_share >= min_words
            and function_share >= min_function)


def _skip_name(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.startswith(SKIP_NAME_PREFIXES)


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page, with block elements as paragraph breaks."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr",
              "dt", "dd", "table", "ul", "ol", "blockquote", "section"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"):
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    text = "".join(parser.parts)
    # Inside HTML, line breaks within a paragraph are layout only.
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


# ---------------------------------------------------------------- sources

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def iter_pydoc_topics() -> Iterator[Document]:
    """One document per pydoc topic (the language reference sections)."""
    source = (stdlib_dir() / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield Document(f"pydoc:{name}", f"Python reference: {name}", topics[name])


def _docstring_sections(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for every documented class and function."""
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for child in reversed(children):  # keep source order despite the stack
            stack.append((prefix + child.name + ".", child))
        if node is not tree:
            doc = ast.get_docstring(node)
            if doc:
                yield prefix.rstrip("."), doc


def iter_stdlib_docstrings() -> Iterator[Document]:
    """One document per stdlib module: its docstring, then each class/function docstring."""
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or SKIP_DIR_NAMES & set(rel.parts):
            continue
        if path.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        module_doc = ast.get_docstring(tree)
        if module_doc:
            parts.append(module_doc)
        for name, doc in _docstring_sections(tree):
            if len(doc) >= 40:
                parts.append(f"{name}\n\n{doc}")
        if parts:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            yield Document(f"stdlib:{rel}", f"Python module {module}", "\n\n".join(parts))


def iter_usr_share_doc(root: Path = Path("/usr/share/doc")) -> Iterator[Document]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if _skip_name(path) or SKIP_DIR_NAMES & set(path.relative_to(root).parts[:-1]):
            continue
        name = path.name.lower().removesuffix(".gz")
        if not (name.endswith(USR_SHARE_DOC_SUFFIXES)
                or name.split(".")[0] in USR_SHARE_DOC_PLAIN_NAMES):
            continue
        text = _read_text(path)
        if text is None:
            continue
        if name.endswith((".html", ".htm")):
            text = html_to_text(text)
        rel = path.relative_to(root)
        yield Document(f"usr-share-doc:{rel}", f"{rel.parts[0]}: {name}", text)


def _metadata_description(path: Path) -> tuple[str, str] | None:
    """(package name, long description) of a dist-info METADATA file."""
    raw = _read_text(path)
    if raw is None:
        return None
    msg = email.parser.Parser().parsestr(raw)
    body = msg.get_payload()
    if not isinstance(body, str) or not body.strip():
        body = msg.get("Description", "")
    return msg.get("Name", path.parent.name), body


def iter_site_packages_docs(root: Path | None = None) -> Iterator[Document]:
    root = root or site_packages_dir()
    for path in sorted(root.glob("*.dist-info/METADATA")):
        found = _metadata_description(path)
        if found and found[1].strip():
            name, body = found
            yield Document(f"metadata:{name}", f"{name} (package description)", body)
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in DOC_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root)
        if rel.parts[0].endswith((".dist-info", ".egg-info")) or _skip_name(path):
            continue
        if SKIP_DIR_NAMES & {part.lower() for part in rel.parts[:-1]}:
            continue
        text = _read_text(path)
        if text is not None:
            yield Document(f"site-packages:{rel}", f"{rel.parts[0]}: {path.name}", text)


def iter_all_sources() -> Iterator[Document]:
    yield from iter_pydoc_topics()
    yield from iter_stdlib_docstrings()
    yield from iter_usr_share_doc()
    yield from iter_site_packages_docs()


# ---------------------------------------------------------------- assembly

def _paragraph_key(paragraph: str) -> str | None:
    normal = " ".join(paragraph.split()).lower()
    if len(normal) < MIN_DEDUP_PARAGRAPH_CHARS:
        return None
    return hashlib.sha1(normal.encode()).hexdigest()


def _is_heldout(doc: Document) -> bool:
    # Held-out documents become doc-QA prompts, so they must read as prose.
    if not HELDOUT_MIN_WORDS <= doc.words <= HELDOUT_MAX_WORDS:
        return False
    if not looks_like_prose(doc.text, min_words=0.65, min_function=0.2):
        return False
    bucket = int(hashlib.sha1(doc.id.encode()).hexdigest(), 16) % 100
    return bucket < HELDOUT_PERCENT


def _drop_seen_paragraphs(doc: Document, seen: set[str]) -> Document | None:
    """The document without paragraphs already in `seen` (which it then extends).

    Returns None when little of it is new: then it is mostly a copy of a document kept
    earlier (a README that is also a package description, say).
    """
    paragraphs = doc.text.split("\n\n")
    kept, keys = [], []
    for paragraph in paragraphs:
        key = _paragraph_key(paragraph)
        if key is None or key not in seen:
            kept.append(paragraph)
            if key is not None:
                keys.append(key)
    text = "\n\n".join(kept).strip()
    if len(text.split()) < MIN_DOC_WORDS or len(kept) < 0.5 * len(paragraphs):
        return None
    seen.update(keys)
    return Document(doc.id, doc.title, text)


def build_corpus(sources: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    """Clean, filter and deduplicate the sources; split them into (train, held-out)."""
    candidates: list[Document] = []
    seen_texts: set[str] = set()
    for doc in sources:
        text = clean_text(doc.text)
        digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if digest in seen_texts or not looks_like_prose(text):
            continue
        seen_texts.add(digest)
        candidates.append(Document(doc.id, doc.title, text))

    # Held-out documents claim their paragraphs first, so no training document (which
    # may come earlier in source order) repeats any of them.
    seen_paragraphs: set[str] = set()
    heldout: list[Document] = []
    for doc in candidates:
        if _is_heldout(doc):
            kept = _drop_seen_paragraphs(doc, seen_paragraphs)
            if kept is not None and kept.words >= HELDOUT_MIN_WORDS:
                heldout.append(kept)
    heldout_ids = {doc.id for doc in heldout}
    train: list[Document] = []
    for doc in candidates:
        if doc.id not in heldout_ids:
            kept = _drop_seen_paragraphs(doc, seen_paragraphs)
            if kept is not None:
                train.append(kept)
    return train, heldout


def write_corpus(train: list[Document], heldout: list[Document], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(DOC_SEPARATOR.join(d.text for d in train) + "\n",
                                   encoding="utf-8")
    with open(out / "documents.jsonl", "w", encoding="utf-8") as f:
        for doc in heldout:
            f.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}) + "\n")


def load_documents(path: str | Path) -> list[dict]:
    """The held-out documents: ``{"id", "title", "text"}`` dicts from documents.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout_documents(path: str | Path) -> list[dict]:
    """`load_documents(path)`, building the corpus into path's directory first if it
    is not there (it is deterministic, so any machine rebuilds the same split)."""
    path = Path(path)
    if not path.exists():
        print(f"building the corpus into {path.parent}", file=sys.stderr)
        main(["--out", str(path.parent)])
    return load_documents(path)


def load_train_documents(path: str | Path) -> list[str]:
    """The training documents of a train.txt, in corpus order."""
    text = Path(path).read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def _summary(name: str, docs: list[Document]) -> str:
    words = sum(d.words for d in docs)
    chars = sum(len(d.text) for d in docs)
    return f"{name}: {len(docs)} documents, {words:,} words, {chars / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/docs-corpus", type=Path)
    args = parser.parse_args(argv)

    train, heldout = build_corpus(iter_all_sources())
    write_corpus(train, heldout, args.out)
    by_source: dict[str, list[Document]] = {}
    for doc in train:
        by_source.setdefault(doc.id.split(":")[0], []).append(doc)
    for source, docs in sorted(by_source.items()):
        print("  train " + _summary(source, docs))
    print(_summary("train.txt", train))
    print(_summary("documents.jsonl", heldout))
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
