"""Every relative link of the user guides and the study pages points at a file that exists, and every
``#anchor`` at a heading of its target; the guides stay guides (no page over a few hundred lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "studies" / "README.md",
                *(ROOT / "studies").glob("*/README.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), flags=re.M)}
            if anchor not in headings:
                broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_guides_stay_short_and_the_results_live_with_their_studies():
    for page in (ROOT / "docs").glob("*.md"):
        assert len(page.read_text(encoding="utf-8").splitlines()) <= 350, f"{page.name} reads as a lab notebook"
    assert not (ROOT / "docs" / "results").exists()
    for study in ("real_grid", "sweep", "question_agnostic", "memory", "benchmarks"):
        assert (ROOT / "studies" / study / "README.md").is_file()
        assert (ROOT / "studies" / study / "results").is_dir()
