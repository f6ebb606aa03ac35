"""The README and docs/ cannot drift from the tree they describe.

- docs/layout.md has a row for every .py and .c file under vllm_promptcache/, kernels/
  and bench/, and every path it names exists;
- every relative link in README.md and docs/*.md points at a file that exists, and an
  anchor (`page.md#section`) at a heading that page has;
- docs/benchmarks.md gives every bench its command, and the tables it copies from
  bench/results/*.md are those files' tables;
- docs/metrics.md lists exactly the metrics vllm_promptcache/metrics.py declares;
- the README stays a landing page.

Reads files only (no vLLM import): runs in well under a second.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LAYOUT = DOCS / "layout.md"
MAPPED_DIRS = ("vllm_promptcache", "kernels", "bench")
MAPPED_SUFFIXES = (".py", ".c")
README_MAX_LINES = 200

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _layout_paths() -> list[str]:
    """The first cell of every table row in docs/layout.md: one backticked path."""
    paths = []
    for line in LAYOUT.read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if m:
            paths.append(m.group(1))
    return paths


def _source_files() -> set[str]:
    found = set()
    for top in MAPPED_DIRS:
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")
                           and not d.endswith(".egg-info")]
            for name in filenames:
                if name.endswith(MAPPED_SUFFIXES):
                    found.add((Path(dirpath) / name).relative_to(ROOT).as_posix())
    return found


def test_layout_names_every_source_file():
    named = set(_layout_paths())
    missing = sorted(_source_files() - named)
    assert not missing, (f"{len(missing)} source file(s) have no row in docs/layout.md; "
                         f"add a row `| `path` | what it holds |` for each: {missing}")


def test_layout_names_only_files_that_exist():
    paths = _layout_paths()
    assert len(paths) > 50, "docs/layout.md lost its table rows (| `path` | ... |)"
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    assert not dupes, f"docs/layout.md names these paths twice: {dupes}"
    gone = [p for p in paths if not (ROOT / p).exists() or (p.endswith("/") and not (ROOT / p).is_dir())]
    assert not gone, f"docs/layout.md names paths that do not exist: {gone}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for m in _HEADING.finditer(_FENCE.sub("", page.read_text())):
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text()))
    return [m.group(1) for m in _LINK.finditer(text)]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def _table_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.startswith("|")]


def test_benchmark_tables_match_their_result_files():
    text = (DOCS / "benchmarks.md").read_text()
    blocks = re.findall(r"<!-- results-table: (\S+) -->\n(.*?)<!-- results-table:end -->", text, re.S)
    assert blocks, "docs/benchmarks.md copies no result table"
    for source, block in blocks:
        expected = _table_lines((ROOT / source).read_text())
        assert _table_lines(block) == expected, (
            f"docs/benchmarks.md's copy of {source} differs from the file: copy the file's "
            "tables between its markers again (and check the figures the text quotes)")


def test_benchmarks_page_gives_every_bench_its_command():
    text = (DOCS / "benchmarks.md").read_text()
    benches = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")
    missing = [b for b in benches if f"python bench/{b}" not in text]
    assert not missing, f"benches without their command (`python bench/NAME.py`) in docs/benchmarks.md: {missing}"


def _declared_metrics() -> set[str]:
    tree = ast.parse((ROOT / "vllm_promptcache" / "metrics.py").read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "METRICS":
            return {k.value for k in node.value.keys}
    raise AssertionError("vllm_promptcache/metrics.py has no METRICS mapping")


def test_metrics_page_lists_every_declared_metric():
    rows = set()
    for line in (DOCS / "metrics.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|", line)
        if m:
            rows.add(m.group(1))
    declared = _declared_metrics()
    assert not declared - rows, f"metrics without a row in docs/metrics.md: {sorted(declared - rows)}"
    assert not rows - declared, f"docs/metrics.md lists metrics that metrics.py does not declare: {sorted(rows - declared)}"


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text()
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       "move the detail into docs/ and link to it")
    assert text.count("<!-- options-table:begin -->") == 1 and text.count("<!-- options-table:end -->") == 1
    assert re.search(r"!\[[^\]]*\]\(bench/results/[\w.-]+\.png\)", text), "README shows no result chart"
