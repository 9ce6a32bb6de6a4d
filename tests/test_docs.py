"""The documentation holds together: every relative link and image of the README,
CONTRIBUTING.md, CHANGELOG.md and docs/*.md points at a file that exists (and, for
a Markdown page, at a heading it has), and the README stays a front door: short,
with its two commands near the top.

No model, no network: it reads Markdown files only.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def pages() -> list[Path]:
    """The Markdown pages whose links are checked."""
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
    found += sorted((ROOT / "docs").glob("*.md"))
    return [page for page in found if page.exists()]


FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target), the target optionally in <...> and followed by a title
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    """Every link and image target in Markdown ``text``, outside code."""
    return [match.group(1).strip("<>") for match in LINK.finditer(prose(text))]


def is_external(target: str) -> bool:
    return re.match(r"(?i)(https?:|mailto:|//)", target) is not None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, inline markup and punctuation
    dropped (letters, digits, '_' and '-' kept), spaces as hyphens."""
    text = re.sub(r"`|\*\*|\*|__", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links() -> list[tuple[Path, str]]:
    """(page, target) for every relative link of every page."""
    return [
        (page, target)
        for page in pages()
        for target in link_targets(page.read_text(encoding="utf-8"))
        if not is_external(target)
    ]


def test_the_link_finder_reads_markdown_as_github_does():
    text = (
        "See [the docs](docs/a.md#part) and ![plot](b.png \"a title\"), [site](https://x.org),\n"
        "`[not](a-link.md)`, a table cell [1, 7] and [x](<c d.md>).\n"
        "```\n[inside](code.md)\n```\n"
    )
    assert link_targets(text) == ["docs/a.md#part", "b.png", "https://x.org", "c d.md"]
    assert slug("Decoding: the serving copy's own loop") == "decoding-the-serving-copys-own-loop"
    assert slug("Eight activation rows a tile (2026-12-06, night)") == "eight-activation-rows-a-tile-2026-12-06-night"
    assert slug("`make test` and **more**") == "make-test-and-more"


def test_every_page_is_found():
    names = {page.relative_to(ROOT).as_posix() for page in pages()}
    assert {"README.md", "CONTRIBUTING.md", "CHANGELOG.md"} <= names
    assert any(name.startswith("docs/") for name in names)


@pytest.mark.parametrize("page", pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_that_exists(page: Path):
    missing = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if is_external(target):
            continue
        path = unquote(target.split("#", 1)[0])
        if not path:  # an anchor on the same page: checked below
            continue
        if not (page.parent / path).exists():
            missing.append(target)
    assert missing == [], f"{page.relative_to(ROOT)}: links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_anchor_names_a_heading_of_its_page(page: Path):
    missing = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if is_external(target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        linked = (page.parent / unquote(path)) if path else page
        if linked.suffix != ".md" or not linked.is_file():
            continue  # a missing file is the test above's failure
        if anchor.lower() not in anchors(linked):
            missing.append(target)
    assert missing == [], f"{page.relative_to(ROOT)}: anchors that name no heading: {missing}"


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    top = "\n".join(lines[:40])
    assert "make demo" in top and "make test" in top, "`make demo` and `make test` belong in the README's first 40 lines"


def test_the_readme_keeps_the_spaces_header_first():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the Hugging Face Spaces front matter must open the README"
    header = text.split("\n---\n", 1)[0]
    for key in ("sdk: gradio", "app_file: app.py"):
        assert key in header, key
