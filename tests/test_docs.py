"""The documentation: README.md stays short, every relative link resolves, no missing file is cited.

Pure file reads, no imports from asc_dist: milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 150
# Files that are cited somewhere but are not part of the repository.
MISSING_FILES = ("DESIGN.md", "PITFALLS.md")

FENCE = re.compile(r"^(```|~~~)")
# [text](target), [text](target "title") and images ![alt](target); inline code is dropped first.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def doc_files() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md")) if (ROOT / "docs").is_dir() else []
    return [README, *docs]


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path):
        m = REF_DEF.match(line)
        if m:
            found.append(m.group(1))
            continue
        found += LINK.findall(CODE_SPAN.sub("", line))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation gone, ' ' -> '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "").replace("~", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters (any script), digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # http:, https:, mailto:, ...


def test_slug_matches_github():
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("Runs, checkpoints, resuming") == "runs-checkpoints-resuming"
    assert (slug("Predict audio files (DCASE submission format)")
            == "predict-audio-files-dcase-submission-format")
    assert slug("The `--fast` loop") == "the---fast-loop"
    assert slug("1. Pack the data") == "1-pack-the-data"


def test_readme_fits_on_a_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines (at most {MAX_README_LINES}): "
                                   "move detail to docs/")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    bad = []
    for target in links(path):
        if is_external(target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
            bad.append(f"{target}: no such file {shown}")
            continue
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target}: no heading '#{fragment}' in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(bad)


def test_every_docs_page_is_linked():
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert pages, "docs/*.md is missing"
    linked = set()
    for page in doc_files():
        for target in links(page):
            if not is_external(target) and target.partition("#")[0]:
                dest = (page.parent / target.partition("#")[0]).resolve()
                if dest.is_relative_to(ROOT):
                    linked.add(dest.relative_to(ROOT).as_posix())
    unlinked = [p for p in pages if p not in linked and p != "docs/README.md"]
    assert not unlinked, f"docs pages no page links to: {unlinked}"


# Generated or git-ignored top-level folders (not conf/data or asc_dist/data).
TOP_SKIP = {"runs", "data", "shards", "build", "dist", "wandb", "node_modules"}


def _walk(top: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not n.startswith(".") and n != "__pycache__"
                       and not n.endswith(".egg-info") and not (d == ROOT and n in TOP_SKIP)]
        out += [d / f for f in filenames if suffixes is None or f.endswith(suffixes)]
    return out


def cited_files() -> list[Path]:
    """Every markdown file of the repository, every file in conf/, every text file in asc_dist/."""
    files = _walk(ROOT, (".md",)) + [ROOT / "shards" / "README.md"]
    files += _walk(ROOT / "conf", None)
    files += _walk(ROOT / "asc_dist", (".py", ".yaml", ".md", ".txt", ".json", ".sh"))
    return sorted({p for p in files if p.is_file()})


def test_no_citation_of_files_not_in_the_repository():
    bad = []
    for p in cited_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for name in MISSING_FILES:
            if name in text and not (ROOT / name).exists():
                line = text[: text.index(name)].count("\n") + 1
                bad.append(f"{p.relative_to(ROOT)}:{line}: cites {name}, not in the repository")
    assert not bad, "\n".join(bad)
