"""Dataset layouts the packer reads: which files form which split, with which labels.

* ``tut2018``: TUT Urban Acoustic Scenes 2018 (``evaluation_setup/fold<k>_train.txt`` /
  ``fold<k>_evaluate.txt``, tab-separated without header, plus ``meta.csv``); a folder without
  them is the unlabelled ``eval`` split (leaderboard / evaluation sets): the files its
  ``fold<k>_test`` list names, or without one every audio file.
* ``tau2019``: TAU 2019/2020 (the same with ``.csv`` fold files that have a header row). The DCASE
  evaluation sets ship only ``fold<k>_test.csv``, whose ``device_id`` column (DCASE 2025) gives
  each clip's device.
* ``tau2022``: TAU 2022 Mobile (1-s clips with six-part names), read exactly as ``tau2019``; the
  name only records which dataset was packed (auto-detected from the names in the fold files).
* ``csv``: one list with a header naming ``filename`` and optionally ``scene_label``/``label``.

The dataset's files are read through a :class:`DatasetSource`, by their path relative to the
dataset's top folder: an unpacked folder (:class:`FolderSource`) or the zip parts a dataset ships
as (asc_dist.pack.zips.ZipSource), so both are planned and checked by the same code.

Fold ``all`` (:data:`ALL_FOLDS`) packs every labelled clip of ``meta.csv`` as the ``train``
split and ignores the fold files: the protocol of Ye et al., who train on the whole TUT 2018
development set and test on its leaderboard set.

A split list (``--train-list``/``--test-list``, e.g. DCASE 2024 task 1's ``split25.csv``) keeps
only the files it names of one split: :func:`select_listed`.

Every problem names the list file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from asc_dist.audio import AUDIO_EXTS
from asc_dist.errors import PackError

LAYOUTS = ("auto", "tut2018", "tau2019", "tau2022", "csv")
ALL_FOLDS = "all"  # --fold all: every labelled clip is training data (module docstring)
CSV_FOLDS = ("tau2019", "tau2022")  # the layouts whose fold files are .csv with a header row
# <scene>-<city>-<location>-<segment>[-<index>]-<device>: TUT 2018 / TAU 2019-2020 have five parts
# (airport-barcelona-0-0-a, tram-vienna-3-17-s2); TAU 2022 Mobile cut each 10-s segment into 1-s
# clips numbered by <index> (airport-lisbon-1000-40000-0-a). A device is never all digits, so a
# five-part name never reads as six.
TUT_NAME = re.compile(
    r"^(?P<scene>[a-z_]+)-(?P<city>[a-z]+)-(?P<loc>\d+)-(?P<seg>\d+)(?:-(?P<index>\d+))?"
    r"-(?P<device>[a-z0-9]+)$"
)
META_HEADER = ["filename", "scene_label", "identifier", "source_label"]
SETUP = "evaluation_setup"

@dataclass(frozen=True)
class Member:
    """A file's bytes inside a zip (asc_dist.pack.zips): what a decode worker is handed instead of
    a path. Here, beside the sources that hand it out, so that zips imports layouts, not back."""

    zip: str | None  # None: listed, but in none of the zips
    name: str

    def is_file(self) -> bool:
        return self.zip is not None

    def __str__(self) -> str:
        return f"{self.zip}/{self.name}" if self.zip else f"{self.name} (in none of the zips)"


@dataclass
class Entry:
    filename: str  # as listed, relative to the dataset dir (e.g. audio/airport-barcelona-0-0-a.wav)
    path: Path | Member  # where its bytes are: a file, or a member of one of the zips
    label: str | None
    where: str  # "<list file>:<line>" for error messages
    device: str | None = None  # as the list names it (a device_id column), else from elsewhere


@dataclass
class SplitPlan:
    name: str
    entries: list[Entry]
    labelled: bool


class DatasetSource:
    """A dataset's files, by POSIX path relative to its top folder ("" is the top folder).

    Subclasses answer ``is_file``, ``is_dir``, ``read_bytes``, ``list``, ``glob``, ``locate`` and
    ``ref``; the layouts touch nothing else, so a folder and a set of zips are read alike.
    """

    root: str  # what was given (the folder, or the zips): messages and the manifest's settings

    def is_file(self, rel: str) -> bool:
        raise NotImplementedError

    def is_dir(self, rel: str) -> bool:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        return self.is_file(rel) or self.is_dir(rel)

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def open_text(self, rel: str) -> io.TextIOBase:
        # Universal newlines, as Path.read_text: a list with \r\n line ends reads like one with \n.
        return io.TextIOWrapper(io.BytesIO(self.read_bytes(rel)), encoding="utf-8-sig")

    def read_text(self, rel: str) -> str:
        with self.open_text(rel) as f:
            return f.read()

    def list(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` (all levels), sorted."""
        raise NotImplementedError

    def glob(self, folder: str, pattern: str) -> list[str]:
        """The entries of ``folder`` (one level) whose name matches ``pattern``, sorted."""
        raise NotImplementedError

    def locate(self, rel: str) -> str:
        """Where ``rel`` is, for messages."""
        raise NotImplementedError

    def ref(self, rel: str) -> Path | Member:
        """What a decode worker is handed to read ``rel`` (picklable; ``.is_file()``)."""
        raise NotImplementedError


class FolderSource(DatasetSource):
    """An unpacked dataset folder; paths and messages are the files' own."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.root = str(self.folder)

    def is_file(self, rel: str) -> bool:
        return (self.folder / rel).is_file()

    def is_dir(self, rel: str) -> bool:
        return (self.folder / rel).is_dir()

    def read_bytes(self, rel: str) -> bytes:
        return (self.folder / rel).read_bytes()

    def open_text(self, rel: str) -> io.TextIOBase:
        return open(self.folder / rel, encoding="utf-8-sig")

    def list(self, prefix: str = "") -> list[str]:
        files = sorted(p for p in (self.folder / prefix).rglob("*") if p.is_file())
        return [p.relative_to(self.folder).as_posix() for p in files]

    def glob(self, folder: str, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in (self.folder / folder).glob(pattern))

    def locate(self, rel: str) -> str:
        return str(self.folder / rel)

    def ref(self, rel: str) -> Path:
        return self.folder / rel


def as_source(dataset: str | Path | DatasetSource) -> DatasetSource:
    return dataset if isinstance(dataset, DatasetSource) else FolderSource(Path(dataset))


def _read_rows(src: DatasetSource, rel: str, delimiter: str | None) -> tuple[str, list[tuple[int, list[str]]]]:
    """(where the list is, its non-empty rows with line numbers); ``None``: tab if the first
    line has one, else comma."""
    where = src.locate(rel)
    try:
        text = src.read_text(rel)
    except (OSError, UnicodeDecodeError) as e:
        raise PackError(f"{where}: cannot read: {e}") from None
    if delimiter is None:
        delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    rows = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1):
        row = [c.strip() for c in row]
        if any(row):
            rows.append((lineno, row))
    return where, rows


def _meta_rows(src: DatasetSource) -> tuple[str, list[tuple[int, dict]]]:
    """meta.csv (TUT/TAU): where it is, and its records {filename, scene_label, identifier,
    source_label} with their line numbers (none when there is no meta.csv)."""
    if not src.is_file("meta.csv"):
        return src.locate("meta.csv"), []
    path, rows = _read_rows(src, "meta.csv", "\t")
    if not rows:
        return path, []
    header = rows[0][1]
    if "filename" not in header:
        raise PackError(f"{path}:1: header must name a 'filename' column, got {header}")
    records, seen = [], set()
    for lineno, row in rows[1:]:
        rec = dict(zip(header, row))
        fn = rec.get("filename", "")
        if not fn:
            raise PackError(f"{path}:{lineno}: empty filename")
        if fn in seen:
            raise PackError(f"{path}:{lineno}: duplicate filename {fn}")
        seen.add(fn)
        records.append((lineno, rec))
    return path, records


def _every_labelled_clip(src: DatasetSource, path: str, rows: list[tuple[int, dict]]) -> SplitPlan:
    """Fold ``all``: every clip meta.csv labels, as the train split; the fold files are not read."""
    if not rows:
        raise PackError(f"{path}: --fold all packs the clips meta.csv labels, and there is no "
                        "meta.csv (or it lists no clips)")
    entries = [Entry(rec["filename"], src.ref(rec["filename"]), rec["scene_label"],
                     f"{path}:{lineno}") for lineno, rec in rows if rec.get("scene_label")]
    if not entries:
        raise PackError(f"{path}: --fold all packs the clips meta.csv labels, and it labels none "
                        "(no 'scene_label' values)")
    return SplitPlan("train", entries, True)


def _read_fold_txt(src: DatasetSource, rel: str, labelled: bool) -> list[Entry]:
    """TUT 2018 fold list: ``file<TAB>label`` (or ``file``), no header."""
    path, rows = _read_rows(src, rel, "\t")
    entries = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if labelled and (len(row) < 2 or not row[1]):
            raise PackError(f"{where}: expected 'filename<TAB>label', got {row}")
        entries.append(Entry(row[0], src.ref(row[0]), row[1] if labelled else None, where))
    return entries


def _read_table(lists: DatasetSource, rel: str, data: DatasetSource,
                delimiter: str | None = None) -> tuple[list[Entry], bool]:
    """A list (in ``lists``) with a header row naming 'filename' and optionally 'scene_label' or
    'label' and 'device_id'; the files it names are in ``data``."""
    path, rows = _read_rows(lists, rel, delimiter)
    if not rows:
        raise PackError(f"{path}: empty list file")
    header = [h.lower() for h in rows[0][1]]
    if "filename" not in header:
        raise PackError(f"{path}:1: header must name a 'filename' column, got {rows[0][1]}")
    fi = header.index("filename")
    li = next((header.index(c) for c in ("scene_label", "label") if c in header), None)
    di = header.index("device_id") if "device_id" in header else None
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
        device = None
        if di is not None:
            if len(row) <= di or not row[di]:
                raise PackError(f"{where}: missing device_id for {row[fi]}")
            device = row[di]
        entries.append(Entry(row[fi], data.ref(row[fi]), label, where, device))
    return entries, li is not None


def _test_list(src: DatasetSource, rel: str, ext: str) -> list[Entry]:
    """An evaluation set's fold<k>_test list (.txt: file names; .csv: a header naming 'filename'
    and, for DCASE 2025, 'device_id'), unlabelled whatever else it holds."""
    if ext == "txt":
        return _read_fold_txt(src, rel, False)
    entries, _ = _read_table(src, rel, src, "\t")
    if not entries:
        raise PackError(f"{src.locate(rel)}: names no files")
    return [replace(e, label=None) for e in entries]


def _audio_folder(src: DatasetSource) -> list[Entry]:
    """Every audio file under audio/ (or the dataset root): the unlabelled 'eval' split."""
    root = "audio" if src.is_dir("audio") else ""
    files = [f for f in src.list(root) if PurePosixPath(f).suffix.lower() in AUDIO_EXTS]
    if not files:
        raise PackError(f"{src.locate('')}: no fold files and no audio files ({', '.join(AUDIO_EXTS)}) found")
    return [Entry(f, src.ref(f), None, src.locate(root)) for f in files]


def _csv_lists(src: DatasetSource) -> list[str]:
    return [f for f in src.glob("", "*.csv") if f != "meta.csv"]


def _first_listed(src: DatasetSource, rel: str) -> str:
    """The first file a fold list (with header) names, "" when there is none."""
    try:
        with src.open_text(rel) as f:
            f.readline()
            return f.readline().split("\t", 1)[0].strip()
    except (OSError, UnicodeDecodeError):
        return ""  # plan_splits reads it again and names the problem


def detect_layout(dataset: Path | DatasetSource, fold: int | str = 1) -> str:
    src = as_source(dataset)
    k = "*" if fold == ALL_FOLDS else fold  # fold all: any fold's files tell the layout
    folds = [f for s in ("train", "evaluate", "test") for f in src.glob(SETUP, f"fold{k}_{s}.csv")]
    if folds:
        m = TUT_NAME.match(PurePosixPath(_first_listed(src, folds[0])).stem)
        return "tau2022" if m and m["index"] is not None else "tau2019"
    if src.glob(SETUP, f"fold{k}_train.txt") or src.is_dir("audio"):
        return "tut2018"
    if _csv_lists(src):
        return "csv"
    raise PackError(
        f"{src.locate('')}: cannot detect the layout (no evaluation_setup/fold{k}_*.txt|csv, no "
        "audio/, no *.csv); pass --layout"
    )


def plan_splits(
    dataset: Path | DatasetSource,
    layout: str = "auto",
    fold: int | str = 1,
    csv_path: str | Path | None = None,
    split: str | None = None,
) -> tuple[str, list[SplitPlan], dict[str, dict]]:
    """Resolve the layout and list the splits to pack. Returns (layout, splits, meta.csv rows).

    ``dataset``: a folder, or a :class:`DatasetSource` (asc_dist.pack.zips.open_source).
    """
    if not isinstance(dataset, DatasetSource) and not Path(dataset).is_dir():
        raise PackError(f"dataset folder not found: {dataset}")
    src = as_source(dataset)
    if layout == "auto":
        layout = detect_layout(src, fold)
    meta_path, meta_rows = _meta_rows(src) if layout in ("tut2018", *CSV_FOLDS) else ("", [])
    meta = {rec["filename"]: rec for _, rec in meta_rows}
    if fold == ALL_FOLDS and layout not in ("tut2018", *CSV_FOLDS):
        raise PackError(f"--fold all packs a TUT/TAU dataset's meta.csv; the {layout} layout has "
                        "no folds (it packs its one list)")
    if layout in ("tut2018", *CSV_FOLDS):
        if fold == ALL_FOLDS:
            return layout, [_every_labelled_clip(src, meta_path, meta_rows)], meta
        ext = "txt" if layout == "tut2018" else "csv"
        train_f, eval_f = f"{SETUP}/fold{fold}_train.{ext}", f"{SETUP}/fold{fold}_evaluate.{ext}"
        if not src.is_file(train_f) and not src.is_file(eval_f):
            test_f = f"{SETUP}/fold{fold}_test.{ext}"
            if src.is_file(test_f):  # an evaluation set: exactly the clips its list names
                entries = _test_list(src, test_f, ext)
                return layout, [SplitPlan(split or "eval", entries, False)], meta
            others = ([PurePosixPath(f).name for f in src.glob(SETUP, f"fold*_*.{ext}")]
                      if src.is_dir(SETUP) else [])
            if others:
                raise PackError(f"{src.locate(SETUP)}: no fold{fold} files (found {', '.join(others)}); "
                                "check --fold")
            if layout in CSV_FOLDS:
                raise PackError(f"{src.locate(SETUP)}: fold{fold}_train.csv / fold{fold}_evaluate.csv "
                                "not found")
            return layout, [SplitPlan(split or "eval", _audio_folder(src), False)], meta
        for f in (train_f, eval_f):
            if not src.is_file(f):
                raise PackError(f"{src.locate(f)}: fold file not found")
        if layout == "tut2018":
            tr, ev = _read_fold_txt(src, train_f, True), _read_fold_txt(src, eval_f, True)
        else:
            (tr, tl), (ev, el) = _read_table(src, train_f, src, "\t"), _read_table(src, eval_f, src, "\t")
            for f, lab in ((train_f, tl), (eval_f, el)):
                if not lab:
                    raise PackError(f"{src.locate(f)}:1: header has no 'scene_label' column")
        return layout, [SplitPlan("train", tr, True), SplitPlan("test", ev, True)], meta
    if layout == "csv":
        if csv_path is None:
            found = _csv_lists(src)
            if len(found) != 1:
                raise PackError(
                    f"{src.locate('')}: expected exactly one *.csv list, found {found}; "
                    "pass --csv PATH"
                )
            lists, rel = src, found[0]
        elif isinstance(src, FolderSource) or Path(csv_path).is_file():
            p = Path(csv_path)
            lists, rel = FolderSource(p.parent), p.name
        else:  # not on disk: a list inside the zips, by its path in the dataset
            lists, rel = src, PurePosixPath(csv_path).as_posix()
        if not lists.is_file(rel):
            raise PackError(f"CSV list not found: {lists.locate(rel)}")
        entries, labelled = _read_table(lists, rel, src)
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


def _locate_list(src: DatasetSource, spec: str | Path, option: str) -> tuple[DatasetSource, str, str]:
    """(where the list is read from, its path there, the path to record): a file on disk first
    (DCASE 2024's split files are downloaded beside the dataset, not into it), else a path inside
    the dataset (its folder or its zips)."""
    p = Path(spec)
    if p.is_file():
        return FolderSource(p.parent), p.name, str(p.resolve())
    rel = PurePosixPath(spec).as_posix()
    if src.is_file(rel):
        return src, rel, rel
    raise PackError(f"{option} {spec}: list not found, neither on disk nor in the dataset "
                    f"({src.locate(rel)})")


def select_listed(src: DatasetSource, splits: list[SplitPlan], split: str, spec: str | Path,
                  meta: dict[str, dict], option: str) -> dict:
    """Keep only the files of split ``split`` that the list ``spec`` names (a header row naming
    'filename', optionally 'scene_label': DCASE 2024 task 1's split5.csv ... split100.csv,
    test.csv), in place. The split itself becomes the subset, so whatever is later derived from
    it (feature statistics, caches, teacher logits) belongs to the subset alone.

    Every named file must be in that split: a file the dataset lacks, one of another split, a
    repeated file, a label disagreeing with meta.csv (else with the fold list) or a list naming
    nothing is an error naming the list and line. Returns what the split's manifest records.
    """
    plan = next((sp for sp in splits if sp.name == split), None)
    if plan is None:
        raise PackError(f"{option} {spec}: this dataset has no '{split}' split (it has "
                        f"{', '.join(sp.name for sp in splits)})")
    lists, rel, recorded = _locate_list(src, spec, option)
    where = lists.locate(rel)
    listed, _ = _read_table(lists, rel, src)
    if not listed:
        raise PackError(f"{where}:1: names no files: the '{split}' split would be empty")
    mine = {e.filename: e for e in plan.entries}
    elsewhere = {e.filename: sp.name for sp in splits if sp is not plan for e in sp.entries}
    first: dict[str, str] = {}
    kept = []
    for e in listed:
        if e.filename in first:
            raise PackError(f"{e.where}: duplicate filename {e.filename} (first listed at "
                            f"{first[e.filename]})")
        first[e.filename] = e.where
        have = mine.get(e.filename)
        if have is None:
            if e.filename in elsewhere:
                why = f"is in the '{elsewhere[e.filename]}' split, not in '{split}'"
            elif e.filename in meta or (not meta and src.is_file(e.filename)):
                why = f"is in the dataset but not in its '{split}' split"
            else:
                why = "is not in the dataset" + (" (not in meta.csv)" if meta else "")
            raise PackError(f"{e.where}: {e.filename} {why}")
        truth = meta.get(e.filename, {}).get("scene_label")
        truth, source = (truth, "meta.csv") if truth else (have.label, have.where)
        if e.label is not None and truth is not None and e.label != truth:
            raise PackError(f"{e.where}: label '{e.label}' of {e.filename} disagrees with "
                            f"{source} ('{truth}')")
        kept.append(have)  # as the fold list gave it: later messages name the fold line
    plan.entries = kept
    return {"option": option, "path": recorded, "name": PurePosixPath(rel).name,
            "sha256": hashlib.sha256(lists.read_bytes(rel)).hexdigest(), "files": len(kept)}
