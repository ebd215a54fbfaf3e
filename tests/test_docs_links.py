"""Relative Markdown links in the README, benchmarks/*.md and docs/*.md point at files that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "benchmarks").glob("*.md"), *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def relative_links(text: str) -> list[str]:
    text = FENCE.sub("", text)  # code blocks hold examples, not links
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", t)]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = [t for t in relative_links(doc.read_text()) if not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing files: {missing}"


def test_the_link_pattern():
    text = "see [a](x/y.md), ![p](img.png \"t\") and [web](https://e.org), [top](#h)\n```\n[no](z)\n```\n"
    assert relative_links(text) == ["x/y.md", "img.png"]
