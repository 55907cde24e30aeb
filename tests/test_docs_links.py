"""Every relative link (and image) in README.md and docs/*.md points at a file (or folder) that
exists, and a link with an anchor (``file.md#section``, ``#section``) at a heading of that file,
with the anchor GitHub gives the heading."""

import glob
import os
import re
from typing import Dict, List, Set

import pytest

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> List[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(text: str) -> Set[str]:
    """Every heading anchor of a markdown text (a repeated heading gets -1, -2, ...)."""
    seen: Dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        if anchor in seen:
            seen[anchor] += 1
            anchor = f"{anchor}-{seen[anchor]}"
        else:
            seen[anchor] = 0
        anchors.add(anchor)
    return anchors


def broken_links(path: str) -> List[str]:
    """The relative links of the markdown file ``path`` whose file or anchor does not exist."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for line in _prose_lines(text):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if file_part and not os.path.exists(linked):
                broken.append(f"{target} (no file {file_part})")
                continue
            if anchor and (not file_part or linked.endswith(".md")):
                with open(linked if file_part else path, encoding="utf-8") as f:
                    if anchor not in anchors_of(f.read()):
                        broken.append(f"{target} (no heading with anchor #{anchor})")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_point_at_existing_files_and_headings(path):
    assert broken_links(path) == []


def test_docs_are_found():
    names = {os.path.relpath(p, REPO) for p in DOCS}
    assert {"README.md", "docs/BENCHMARKS.md", "docs/USAGE.md", "docs/GUARANTEES.md"} <= names


def test_github_anchor():
    assert github_anchor("The paper's settings (VOC 2007+2012, COCO)") == (
        "the-papers-settings-voc-20072012-coco"
    )
    assert github_anchor("Truncated SVD of fc6/fc7 (Fast R-CNN section 3.1)") == (
        "truncated-svd-of-fc6fc7-fast-r-cnn-section-31"
    )
    assert github_anchor("`make bench` and ION_D2") == "make-bench-and-ion_d2"


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\n## Title\n\n"
        "[ok](other.md) [ok](other.md#a-section) [ok](#title) [ok](#title-1) "
        "[web](https://example.com/x.md) ![image](other.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad](#other) ![img](gone.png)\n"
        "```\n[in code](also_missing.md)\n```\n"
    )
    assert broken_links(str(doc)) == [
        "missing.md (no file missing.md)",
        "other.md#nowhere (no heading with anchor #nowhere)",
        "#other (no heading with anchor #other)",
        "gone.png (no file gone.png)",
    ]
