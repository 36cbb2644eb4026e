"""The README and docs: links and pictures that exist, no internal issue numbers, the LICENSE."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT_FILES = [p for pattern in ("*.md", "mnapps/**/*.py", "tools/*.py", "tests/*.py", "configs/*.yaml")
              for p in ROOT.glob(pattern)]  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_picture_exists(page):
    text = page.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [t for t in targets if not re.match(r"[a-z]+://|#", t)
               and not (page.parent / t.split("#")[0]).exists()]  # fmt: skip
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_no_internal_issue_numbers():
    # Another project's tracker may be named ("PyTorch issue N"); our own numbers never.
    pattern = re.compile(r"(?<!PyTorch )\b[Ii]ssues? #?\d+|(?<![\w/])#\d{1,3}\b(?! has)")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in TEXT_FILES if p.name != "test_docs.py"
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert not hits, "\n".join(hits)


def test_the_license_is_the_apache_text_pyproject_names():
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()  # an SPDX expression
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
