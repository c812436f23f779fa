"""Every repository path that README.md and docs/*.md name exists, and every link in them resolves.

A name counts when it is in backticks or is a markdown link target. A backticked name is taken as a repository
path when it starts with one of the project's directories, or with a directory beside the doc, or ends in one of
the file types the maintainers' pre-stop hook checks; placeholders such as `ROOT/latest` or `runs/small/ckpt`
(run outputs) are neither. Backticked paths may be relative to the repository root or to the doc; link targets
are relative to the doc, as a Markdown viewer resolves them. A `#anchor` must name a heading of its target, and a
`file.py:name` must name something in that file. Paths under shared/ are outside the project: no clone has them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT_DIRS = (".ci", "bench", "configs", "docs", "launch", "megaclone", "tests", "tools")
FILE_TYPES = (".md", ".py", ".sh", ".yaml", ".sbatch", ".png", ".json")
OUTSIDE = ("shared/", "../shared/")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`([^`\s]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def heading_anchors(text: str) -> set[str]:
    """The anchors a Markdown viewer gives the headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, k = slug, 0
        while candidate in anchors:  # repeated headings get -1, -2, ...
            k += 1
            candidate = f"{slug}-{k}"
        anchors.add(candidate)
    return anchors


def _is_repo_path(name: str, doc_dir: Path, root: Path) -> bool:
    first = name.split("/", 1)[0]
    return (first in PROJECT_DIRS or (doc_dir != root and (doc_dir / first).is_dir())
            or name.rstrip("/").endswith(FILE_TYPES) or name.startswith(OUTSIDE))


def _check_target(ref: str, path: str, anchor: str | None, symbol: str | None, bases: list[Path]) -> str | None:
    """Why `ref` does not resolve against any of `bases` (None when it does)."""
    if path.startswith(OUTSIDE):
        return f"{ref}: outside the project (no clone has shared/)"
    target = next((base / path for base in bases if (base / path).exists()), None)
    if target is None:
        return f"{ref}: no such file or directory"
    if anchor is not None and anchor not in heading_anchors(target.read_text()):
        return f"{ref}: {target.name} has no heading with the anchor #{anchor}"
    if symbol is not None and not re.search(rf"\b{re.escape(symbol)}\b", target.read_text()):
        return f"{ref}: {target.name} does not mention {symbol}"
    return None


def doc_problems(doc: Path, root: Path = ROOT) -> list[str]:
    """Every path or link in `doc` that does not resolve, as 'doc: ref: why'."""
    text = doc.read_text()
    prose = _FENCE.sub("", text)
    doc_dir = doc.parent
    problems = []
    for ref in sorted(set(_CODE.findall(prose))):
        if "/" not in ref or ref.startswith(("/", "~", "<", "$")) or "://" in ref:
            continue
        path, _, anchor = ref.partition("#")
        path, _, symbol = path.partition(":")
        if not _is_repo_path(path, doc_dir, root):
            continue
        why = _check_target(ref, path, anchor or None, symbol or None, [root, doc_dir])
        if why:
            problems.append(why)
    for ref in sorted(set(_LINK.findall(prose))):
        if "://" in ref or ref.startswith("mailto:"):
            continue
        path, _, anchor = ref.partition("#")
        if not path:  # a link within the doc
            why = None if anchor in heading_anchors(text) else f"{ref}: no heading with that anchor here"
        else:
            why = _check_target(ref, path, anchor or None, None, [doc_dir])
        if why:
            problems.append(why)
    return [f"{doc.relative_to(root)}: {p}" for p in problems]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(doc: Path) -> None:
    assert doc_problems(doc) == []


def test_design_reference_is_linked_and_checked() -> None:
    """The docs point at docs/design.md, and the checker sees its names (it would pass vacuously otherwise)."""
    design = ROOT / "docs" / "design.md"
    assert "docs/design.md" in (ROOT / "README.md").read_text()
    assert doc_problems(design) == []
    names = set(_CODE.findall(_FENCE.sub("", design.read_text())))
    assert {"megaclone/spec.py", "megaclone/rng.py", "megaclone/clone/"} <= names


def test_checker_reports_each_kind_of_broken_name(tmp_path: Path) -> None:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "megaclone").mkdir()
    (tmp_path / "megaclone" / "spec.py").write_text("def build_param_specs():\n    pass\n")
    (tmp_path / "docs" / "other.md").write_text("# Title\n\n## A section\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("\n".join([
        "# Page", "",
        "Fine: `megaclone/spec.py`, `megaclone/spec.py:build_param_specs`, `results/`, `runs/small/ckpt`,",
        "`ROOT/latest`, [other](other.md#a-section), [here](#page), [web](https://example.org/x.md).",
        "Broken: `megaclone/spce.py`, `megaclone/gone/`, `tools/missing.py`, `megaclone/spec.py:no_such_name`,",
        "`shared/DESIGN.md`, [gone](gone.md), [bad anchor](other.md#no-section), [here](#nowhere),",
        "`docs/other.md#missing`, [root-relative only](megaclone/spec.py).",
        "", "```", "`tools/in_a_code_block.py`", "```",
    ]))
    problems = doc_problems(doc, tmp_path)
    broken = ["megaclone/spce.py", "megaclone/gone/", "tools/missing.py", "megaclone/spec.py:no_such_name",
              "shared/DESIGN.md", "gone.md", "other.md#no-section", "#nowhere", "docs/other.md#missing",
              "megaclone/spec.py: no such"]
    for ref in broken:
        assert sum(f"page.md: {ref}" in p for p in problems) >= 1, (ref, problems)
    assert len(problems) == len(broken), problems
