"""README.md is the front door, docs/ holds the rest: the README's size and first lines, the links between the pages,
the README's map of docs/ and its command table against the CLI parser. Reads text files only (and the parser)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 160
MAX_LINE = 120  # the project's line length, prose and tables alike
# Pages the README's map names before they are written (by someone else): they may be missing; once present they are
# checked like every other page.
PENDING = {DOCS / "architecture.md"}

CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and [text](target "title")
# A repository path docs/....md written out (as in `docs/x.md`), not a link.
DOCS_MENTION = re.compile(r"(?<![\w./-])docs/[\w./-]+\.md\b")
COMMAND_CELL = re.compile(r"^\|\s*`pipeline ([a-z][a-z-]*)")


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", path.read_text(), re.MULTILINE)}


def links(path: Path) -> list[tuple[str, Path, str]]:
    """(as written, file it points to, anchor) for each local link and each docs/....md path in the text."""
    text = path.read_text()
    found = []
    for target in LINK.findall(CODE_SPAN.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor of this page
        file, _, anchor = target.partition("#")
        found.append((target, (path.parent / file).resolve(), anchor))
    for mention in DOCS_MENTION.findall(text):
        found.append((mention, (ROOT / mention).resolve(), ""))
    return found


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move text into docs/"


def test_readme_starts_with_make_all_and_make_test():
    first = [line for line in README.read_text().splitlines() if line.strip()][:2]
    ok = len(first) == 2 and re.match(r"^    make all(\s|$)", first[0]) and re.match(r"^    make test(\s|$)", first[1])
    assert ok, f"README.md must open with the indented `make all` and `make test` lines, got {first}"


@pytest.mark.parametrize("path", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path):
    broken = []
    for written, target, anchor in links(path):
        if target in PENDING and not target.exists():
            continue
        if not target.exists():
            broken.append(f"{written} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{written} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_every_docs_page_is_in_the_readme_map():
    linked = {target for _, target, _ in links(README)}
    missing = [str(p.relative_to(ROOT)) for p in pages() if p.resolve() not in linked]
    assert not missing, f"docs pages that README.md does not link: {missing}"


@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_starts_with_title_and_what_it_covers(path: Path):
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines and re.match(r"^# \S", lines[0]), f"{path.name}: the first line must be a one-line `# ` title"
    assert len(lines) > 1 and not lines[1].startswith(("#", "|", "-", "    ")), \
        f"{path.name}: the title must be followed by a sentence saying what the page covers"


@pytest.mark.parametrize("path", [README, *pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_line_length(path: Path):
    long = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"{path.relative_to(ROOT)}: lines over {MAX_LINE} characters: {long}"


def parser_commands() -> set[str]:
    from pipeline.cli import build_parser

    subparsers = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers, "pipeline.cli.build_parser() has no subcommands"
    return {name for a in subparsers for name in a.choices}


def readme_command_table() -> list[str]:
    """The commands of the table in README's `## Commands` section, one per row (a command may have several rows)."""
    text = README.read_text()
    match = re.search(r"^## Commands\s*$(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no `## Commands` section"
    return [m.group(1) for line in match.group(1).splitlines() if (m := COMMAND_CELL.match(line))]


def test_readme_command_table_matches_the_parser():
    commands = parser_commands()
    table = set(readme_command_table())
    assert not commands - table, f"commands missing from README's command table: {sorted(commands - table)}"
    assert not table - commands, f"README's command table names commands the CLI lacks: {sorted(table - commands)}"
