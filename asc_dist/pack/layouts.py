"""Dataset layouts the packer reads: which files form which split, with which labels.

* ``tut2018``: TUT Urban Acoustic Scenes 2018 (``evaluation_setup/fold<k>_train.txt`` /
  ``fold<k>_evaluate.txt``, tab-separated without header, plus ``meta.csv``); a folder without
  fold files is the unlabelled ``eval`` split (leaderboard / evaluation sets).
* ``tau2019``: TAU 2019/2020 (the same with ``.csv`` fold files that have a header row).
* ``csv``: one list with a header naming ``filename`` and optionally ``scene_label``/``label``.

Every problem names the list file and line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from asc_dist.audio import AUDIO_EXTS
from asc_dist.errors import PackError

LAYOUTS = ("auto", "tut2018", "tau2019", "csv")
# <scene>-<city>-<location>-<segment>-<device>, e.g. airport-barcelona-0-0-a, tram-vienna-3-17-s2
TUT_NAME = re.compile(
    r"^(?P<scene>[a-z_]+)-(?P<city>[a-z]+)-(?P<loc>\d+)-(?P<seg>\d+)-(?P<device>[a-z0-9]+)$"
)
META_HEADER = ["filename", "scene_label", "identifier", "source_label"]

@dataclass
class Entry:
    filename: str  # as listed, relative to the dataset dir (e.g. audio/airport-barcelona-0-0-a.wav)
    path: Path
    label: str | None
    where: str  # "<list file>:<line>" for error messages


@dataclass
class SplitPlan:
    name: str
    entries: list[Entry]
    labelled: bool




def _read_rows(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PackError(f"{path}: cannot read: {e}") from None
    rows = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1):
        row = [c.strip() for c in row]
        if any(row):
            rows.append((lineno, row))
    return rows


def _read_meta(dataset: Path) -> dict[str, dict]:
    """meta.csv (TUT/TAU): filename -> {scene_label, identifier, source_label} (missing -> {})."""
    path = dataset / "meta.csv"
    if not path.is_file():
        return {}
    rows = _read_rows(path, "\t")
    if not rows:
        return {}
    header = rows[0][1]
    if "filename" not in header:
        raise PackError(f"{path}:1: header must name a 'filename' column, got {header}")
    meta = {}
    for lineno, row in rows[1:]:
        rec = dict(zip(header, row))
        fn = rec.get("filename", "")
        if not fn:
            raise PackError(f"{path}:{lineno}: empty filename")
        if fn in meta:
            raise PackError(f"{path}:{lineno}: duplicate filename {fn}")
        meta[fn] = rec
    return meta


def _read_fold_txt(path: Path, dataset: Path, labelled: bool) -> list[Entry]:
    """TUT 2018 fold list: ``file<TAB>label`` (or ``file``), no header."""
    entries = []
    for lineno, row in _read_rows(path, "\t"):
        where = f"{path}:{lineno}"
        if labelled and (len(row) < 2 or not row[1]):
            raise PackError(f"{where}: expected 'filename<TAB>label', got {row}")
        entries.append(Entry(row[0], dataset / row[0], row[1] if labelled else None, where))
    return entries


def _read_table(path: Path, dataset: Path, delimiter: str | None = None) -> tuple[list[Entry], bool]:
    """A list with a header row naming 'filename' and optionally 'scene_label' or 'label'."""
    if delimiter is None:
        first = path.read_text(encoding="utf-8-sig").split("\n", 1)[0]
        delimiter = "\t" if "\t" in first else ","
    rows = _read_rows(path, delimiter)
    if not rows:
        raise PackError(f"{path}: empty list file")
    header = [h.lower() for h in rows[0][1]]
    if "filename" not in header:
        raise PackError(f"{path}:1: header must name a 'filename' column, got {rows[0][1]}")
    fi = header.index("filename")
    li = next((header.index(c) for c in ("scene_label", "label") if c in header), None)
    entries = []
    for lineno, row in rows[1:]:
        where = f"{path}:{lineno}"
        if len(row) <= fi or not row[fi]:
            raise PackError(f"{where}: missing filename")
        label = None
        if li is not None:
            if len(row) <= li or not row[li]:
                raise PackError(f"{where}: missing label for {row[fi]}")
            label = row[li]
        entries.append(Entry(row[fi], dataset / row[fi], label, where))
    return entries, li is not None


def _audio_folder(dataset: Path) -> list[Entry]:
    """Every audio file under audio/ (or the dataset root): the unlabelled 'eval' split."""
    root = dataset / "audio" if (dataset / "audio").is_dir() else dataset
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())
    if not files:
        raise PackError(f"{dataset}: no fold files and no audio files ({', '.join(AUDIO_EXTS)}) found")
    return [Entry(p.relative_to(dataset).as_posix(), p, None, str(root)) for p in files]


def detect_layout(dataset: Path, fold: int = 1) -> str:
    es = dataset / "evaluation_setup"
    if (es / f"fold{fold}_train.csv").is_file() or (es / f"fold{fold}_evaluate.csv").is_file():
        return "tau2019"
    if (es / f"fold{fold}_train.txt").is_file() or (dataset / "audio").is_dir():
        return "tut2018"
    if [p for p in dataset.glob("*.csv") if p.name != "meta.csv"]:
        return "csv"
    raise PackError(
        f"{dataset}: cannot detect the layout (no evaluation_setup/fold{fold}_*.txt|csv, no audio/, "
        "no *.csv); pass --layout"
    )


def plan_splits(
    dataset: Path,
    layout: str = "auto",
    fold: int = 1,
    csv_path: str | Path | None = None,
    split: str | None = None,
) -> tuple[str, list[SplitPlan], dict[str, dict]]:
    """Resolve the layout and list the splits to pack. Returns (layout, splits, meta.csv rows)."""
    if not dataset.is_dir():
        raise PackError(f"dataset folder not found: {dataset}")
    if layout == "auto":
        layout = detect_layout(dataset, fold)
    meta = _read_meta(dataset) if layout in ("tut2018", "tau2019") else {}
    es = dataset / "evaluation_setup"
    if layout in ("tut2018", "tau2019"):
        ext = "txt" if layout == "tut2018" else "csv"
        train_f, eval_f = es / f"fold{fold}_train.{ext}", es / f"fold{fold}_evaluate.{ext}"
        if not train_f.is_file() and not eval_f.is_file():
            others = sorted(p.name for p in es.glob(f"fold*_*.{ext}")) if es.is_dir() else []
            if others:
                raise PackError(f"{es}: no fold{fold} files (found {', '.join(others)}); check --fold")
            if layout == "tau2019":
                raise PackError(f"{es}: fold{fold}_train.csv / fold{fold}_evaluate.csv not found")
            return layout, [SplitPlan(split or "eval", _audio_folder(dataset), False)], meta
        for f in (train_f, eval_f):
            if not f.is_file():
                raise PackError(f"{f}: fold file not found")
        if layout == "tut2018":
            tr, ev = _read_fold_txt(train_f, dataset, True), _read_fold_txt(eval_f, dataset, True)
        else:
            (tr, tl), (ev, el) = _read_table(train_f, dataset, "\t"), _read_table(eval_f, dataset, "\t")
            for f, lab in ((train_f, tl), (eval_f, el)):
                if not lab:
                    raise PackError(f"{f}:1: header has no 'scene_label' column")
        return layout, [SplitPlan("train", tr, True), SplitPlan("test", ev, True)], meta
    if layout == "csv":
        if csv_path is None:
            found = sorted(p for p in dataset.glob("*.csv") if p.name != "meta.csv")
            if len(found) != 1:
                raise PackError(
                    f"{dataset}: expected exactly one *.csv list, found {[p.name for p in found]}; "
                    "pass --csv PATH"
                )
            csv_path = found[0]
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise PackError(f"CSV list not found: {csv_path}")
        entries, labelled = _read_table(csv_path, dataset)
        return layout, [SplitPlan(split or "train", entries, labelled)], meta
    raise PackError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def parse_classes(spec: str | list[str] | None) -> list[str] | None:
    """--classes: a comma list, a text file (one per line) or a manifest.json to copy them from."""
    if spec is None or isinstance(spec, list):
        return spec
    p = Path(spec)
    if p.is_file():
        if p.suffix == ".json":
            return list(json.loads(p.read_text())["classes"])
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [c.strip() for c in spec.split(",") if c.strip()]


def sample_key(filename: str) -> str:
    stem = Path(filename).stem
    # Dots would split the key from the extension; spaces would break DALI's index format.
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def parse_name(filename: str) -> dict:
    m = TUT_NAME.match(Path(filename).stem)
    if not m:
        return {"city": None, "location": None, "device": None}
    return {"city": m["city"], "location": f"{m['city']}-{m['loc']}", "device": m["device"]}


def check_lists(splits: list[SplitPlan], classes: list[str], meta: dict[str, dict]) -> None:
    """Labels known, no duplicate files, no duplicate keys, fold labels agree with meta.csv."""
    seen: dict[str, tuple[str, str]] = {}  # filename -> (split, where)
    keys: dict[str, str] = {}  # key -> filename
    known = set(classes)
    for sp in splits:
        for e in sp.entries:
            if e.filename in seen:
                prev_split, prev_where = seen[e.filename]
                what = "duplicate filename" if prev_split == sp.name else (
                    f"file in both splits '{prev_split}' and '{sp.name}'"
                )
                raise PackError(f"{e.where}: {what} {e.filename} (first listed at {prev_where})")
            seen[e.filename] = (sp.name, e.where)
            k = sample_key(e.filename)
            if k in keys:
                raise PackError(
                    f"{e.where}: duplicate sample key '{k}': {keys[k]} and {e.filename} map to "
                    "the same key"
                )
            keys[k] = e.filename
            if e.label is not None:
                if e.label not in known:
                    raise PackError(
                        f"{e.where}: label '{e.label}' of {e.filename} is not among the classes "
                        f"{classes}"
                    )
                m = meta.get(e.filename, {}).get("scene_label")
                if m and m != e.label:
                    raise PackError(
                        f"{e.where}: label '{e.label}' of {e.filename} disagrees with meta.csv "
                        f"('{m}')"
                    )
