"""Pack an audio dataset folder into WebDataset tar shards with DALI index files.

``python -m asc_dist.pack DATASET_DIR OUT_DIR`` reads a TUT 2018 / TAU 2019-2020 layout (or a
plain CSV) and writes, per split, ``OUT_DIR/<split>/``::

    <split>-000000.tar   GNU tar; per sample <key>.wav, <key>.cls, <key>.i32, <key>.json
    <split>-000000.idx   DALI index (the format of DALI's wds2idx)
    samples.jsonl        one line per sample, in shard order
    manifest.json        classes, counts, shards (+sha256), audio format, settings, skipped files

Shard contract (readers depend on it):

* ``<key>`` is the audio file's stem with every character outside ``[A-Za-z0-9_-]`` (dots
  included) replaced by ``_``; keys are unique within a pack.
* ``.wav``: PCM WAV (PCM_24 by default) at the target rate, mono (channel mean) unless
  ``--keep-channels``. ``.cls``: ASCII class index (-1 = unlabelled), which webdataset's
  default decoder turns into an int. ``.i32``: the same index as little-endian int32, which
  DALI's ``readers.webdataset(dtypes=INT32)`` batches directly. ``.json``: metadata.
* Samples are shuffled across the whole split with ``--seed`` at pack time; tar members are
  deterministic (mtime 0, uid/gid 0, mode 0644), so the same inputs and seed give
  byte-identical tars whatever the number of workers.

Every clip is decoded and checked (readable, not truncated, sample rate, duration, finite
samples) before it is written. All splits are written to temp dirs beside the target and
renamed into place only when every split succeeded: a failed run leaves earlier output as it
was. Existing output is refused unless ``--overwrite``, which replaces it atomically per split.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import struct
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from asc_dist import __version__

FORMAT = "asc-dist-shards/1"
COMPONENTS = {"audio": "wav", "label": "cls", "label_int": "i32", "meta": "json"}
DALI_INDEX_VERSION = "v1.2"
LAYOUTS = ("auto", "tut2018", "tau2019", "csv")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
# <scene>-<city>-<location>-<segment>-<device>, e.g. airport-barcelona-0-0-a, tram-vienna-3-17-s2
TUT_NAME = re.compile(
    r"^(?P<scene>[a-z_]+)-(?P<city>[a-z]+)-(?P<loc>\d+)-(?P<seg>\d+)-(?P<device>[a-z0-9]+)$"
)
META_HEADER = ["filename", "scene_label", "identifier", "source_label"]


class PackError(Exception):
    """A dataset or packing problem; the message names the file (and line) at fault."""


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


# --------------------------------------------------------------------------- dataset layouts


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


def _check_lists(splits: list[SplitPlan], classes: list[str], meta: dict[str, dict]) -> None:
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


# --------------------------------------------------------------------------- audio


def resampler_name() -> str:
    try:
        import soxr  # noqa: F401

        return "soxr-vhq"
    except ImportError:
        pass
    try:
        import scipy.signal  # noqa: F401

        return "scipy-resample_poly"
    except ImportError:
        return "torchaudio-sinc"


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """[frames, channels] float64 -> [frames', channels] at sr_out (band-limited, polyphase)."""
    if sr_in == sr_out:
        return x
    name = resampler_name()
    if name == "soxr-vhq":
        import soxr

        return soxr.resample(np.ascontiguousarray(x), sr_in, sr_out, quality="VHQ")
    if name == "scipy-resample_poly":
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr_in, sr_out)
        return resample_poly(x, sr_out // g, sr_in // g, axis=0)
    import torch
    import torchaudio.functional as AF

    y = AF.resample(torch.from_numpy(x.T.copy()), sr_in, sr_out)
    return y.numpy().T


def convert(data: np.ndarray, sr_in: int, sr_out: int, keep_channels: bool = False) -> np.ndarray:
    """Source samples [frames, channels] -> stored samples: downmix (mean) unless kept, resample."""
    x = np.asarray(data, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if not keep_channels and x.shape[1] > 1:
        # Channel-by-channel sum: numpy's axis=1 mean over 2 columns is ~20x slower.
        acc = x[:, 0].copy()
        for c in range(1, x.shape[1]):
            acc += x[:, c]
        x = (acc / x.shape[1])[:, None]
    return resample(x, sr_in, sr_out)


def _wav_truncation(path: Path) -> str | None:
    """Walk a RIFF/WAVE file's chunks; report a data chunk that claims more bytes than exist."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None  # not plain RIFF/WAVE: leave it to libsndfile
        fmt = "<4sI" if head[:4] == b"RIFF" else ">4sI"  # RIFX is the big-endian variant
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, clen = struct.unpack(fmt, f.read(8))
            if cid == b"data":
                # 0 / 0xFFFFFFFF are "unknown length" markers of streaming writers.
                if clen not in (0, 0xFFFFFFFF) and pos + 8 + clen > size:
                    return (
                        f"truncated WAV: data chunk declares {clen} bytes but the file holds "
                        f"{size - pos - 8}"
                    )
                return None
            pos += 8 + clen + (clen & 1)
    return None


_INT_SUBTYPES = {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32"}


def load_check(path: Path, opts: dict) -> tuple[np.ndarray, int, dict]:
    """Decode one file and check it; raise ValueError(problem) when it is unusable."""
    if not path.is_file():
        raise ValueError("missing file")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    if path.suffix.lower() == ".wav":
        problem = _wav_truncation(path)
        if problem:
            raise ValueError(problem)
    try:
        with sf.SoundFile(str(path)) as f:
            sr, channels, subtype, frames = f.samplerate, f.channels, f.subtype, f.frames
            if subtype in _INT_SUBTYPES:
                # libsndfile left-aligns integer PCM in int32: exact, and faster than its float path.
                data = f.read(dtype="int32", always_2d=True) * 2.0**-31
            else:
                data = f.read(dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"not readable as audio: {e}") from None
    if data.shape[0] != frames:
        raise ValueError(f"truncated: header says {frames} frames, decoded {data.shape[0]}")
    if data.shape[0] == 0:
        raise ValueError("no audio frames")
    if sr <= 0:
        raise ValueError(f"invalid sample rate {sr}")
    exp_sr = opts.get("expect_sample_rate")
    if exp_sr and sr != exp_sr:
        raise ValueError(f"sample rate {sr} Hz, expected {exp_sr} Hz")
    duration = data.shape[0] / sr
    exp_d = opts.get("expect_duration")
    if exp_d and abs(duration - exp_d) > opts.get("duration_tolerance", 0.01):
        raise ValueError(f"duration {duration:.3f} s, expected {exp_d} s")
    if subtype not in _INT_SUBTYPES and not np.isfinite(data).all():  # integer PCM is always finite
        raise ValueError(f"{int((~np.isfinite(data)).sum())} non-finite samples (NaN/Inf)")
    return data, sr, {"source_sample_rate": sr, "source_channels": channels, "source_subtype": subtype}


_PCM_BITS = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32}


def encode_wav(x: np.ndarray, sr: int, subtype: str) -> bytes:
    """Float samples -> WAV bytes. Integer PCM is rounded to nearest and clipped here, because
    libsndfile's float->24-bit path truncates (up to 1 LSB error) and wraps out-of-range values."""
    buf = io.BytesIO()
    bits = _PCM_BITS.get(subtype)
    if bits:
        q = np.clip(np.round(np.asarray(x, dtype=np.float64) * 2.0 ** (bits - 1)),
                    -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int32)
        # libsndfile keeps the top bits of int32 input: left-align so nothing is rounded again.
        sf.write(buf, q << (32 - bits), sr, format="WAV", subtype=subtype)
    else:
        sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every clip.

    Each clip allocates several 10-100 MB arrays; with glibc's default mmap threshold every one
    is a fresh mmap whose pages fault in again: measured here, page faults took ~40 % of the
    pack time (1.5x faster with this). Applied to our own worker processes and the CLI only.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 512 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def _process(task: tuple[int, str, dict]) -> tuple[int, bytes | None, dict | None, str | None]:
    """Worker: (index, path, opts) -> (index, wav bytes, audio info, problem)."""
    i, path, opts = task
    try:
        data, sr, info = load_check(Path(path), opts)
        y = convert(data, sr, opts["sample_rate"], opts["keep_channels"])
        wav = encode_wav(y, opts["sample_rate"], opts["subtype"])
    except ValueError as e:
        return i, None, None, str(e)
    except Exception as e:  # noqa: BLE001 - any decoder crash is a problem with this file
        return i, None, None, f"{type(e).__name__}: {e}"
    info.update(frames=int(y.shape[0]), channels=int(y.shape[1]), source_bytes=os.path.getsize(path))
    return i, wav, info, None


# --------------------------------------------------------------------------- shard writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _member_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512


class ShardWriter:
    """Writes <split>-NNNNNN.tar + .idx files, rolling over at a size or sample-count limit.

    The tar stream is written here rather than through TarFile.addfile (whose 16 KiB copy loop
    and a second pass for the checksum cost ~10 % of a pack): headers come from
    TarInfo.tobuf(GNU_FORMAT) and the end-of-archive padding matches tarfile's byte for byte.
    """

    def __init__(self, directory: Path, split: str, max_bytes: int, max_samples: int | None):
        self.dir, self.split = directory, split
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.shards: list[dict] = []
        self._f = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._f = open(self.dir / name, "wb")  # noqa: SIM115 - spans add() calls; see _close/abort
        self._hash = hashlib.sha256()
        self._offset = 0
        self._cur = {"name": name, "index": len(self.shards), "samples": 0}
        self._idx_lines: list[str] = []

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._hash.update(b)
        self._offset += len(b)

    def add(self, key: str, parts: list[tuple[str, bytes]]) -> str:
        need = sum(_member_bytes(len(b)) for _, b in parts)
        if self._f is not None and (
            (self.max_samples and self._cur["samples"] >= self.max_samples)
            or self._offset + need + 2 * tarfile.BLOCKSIZE > self.max_bytes
        ):
            self._close()
        if self._f is None:
            self._open()
        fields = []
        for ext, data in parts:
            name = f"{key}.{ext}"
            # Long names get an extra GNU LongLink header, so take the data offset after it.
            self._write(_tarinfo(name, len(data)).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            fields.append(f"{ext} {self._offset} {len(data)} {name}")
            self._write(data)
            if len(data) % tarfile.BLOCKSIZE:
                self._write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        self._idx_lines.append(" ".join(fields))
        self._cur["samples"] += 1
        return self._cur["name"]

    def _close(self) -> None:
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        if self._offset % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - self._offset % tarfile.RECORDSIZE))
        self._f.close()
        self._f = None
        path = self.dir / self._cur["name"]
        path.with_suffix(".idx").write_text(
            f"{DALI_INDEX_VERSION} {len(self._idx_lines)}\n" + "".join(l + "\n" for l in self._idx_lines)
        )
        self._cur.update(bytes=self._offset, sha256=self._hash.hexdigest())
        self.shards.append(self._cur)

    def close(self) -> list[dict]:
        if self._f is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------- packing


def _shuffled(entries: list[Entry], seed: int, split: str) -> list[Entry]:
    order = sorted(entries, key=lambda e: e.filename)
    random.Random(f"{seed}:{split}").shuffle(order)  # str seeds are hashed deterministically
    return order


def _write_split(
    sp: SplitPlan, tmp: Path, classes: list[str], meta: dict[str, dict], opts: dict, settings: dict,
    pool, progress: bool,
) -> tuple[dict, dict]:
    entries = _shuffled(sp.entries, settings["seed"], sp.name)
    skipped: list[dict] = []
    todo = []
    for e in entries:
        if not e.path.is_file():
            if opts["on_error"] == "fail":
                raise PackError(f"{e.filename}: missing file ({e.path}, listed at {e.where})")
            skipped.append({"file": e.filename, "reason": "missing file"})
        else:
            todo.append(e)
    tasks = [(i, str(e.path), opts) for i, e in enumerate(todo)]
    results = pool.imap(_process, tasks, chunksize=2) if pool else map(_process, tasks)
    writer = ShardWriter(
        tmp, sp.name, int(settings["shard_size_mb"] * 2**20), settings["shard_max_samples"]
    )
    lines, counts = [], {c: 0 for c in classes}
    stats = {"clips": 0, "source_bytes": 0}
    channels: set[int] = set()
    bar = tqdm(total=len(entries), desc=sp.name, unit="clip", disable=not progress, file=sys.stderr)
    bar.update(len(entries) - len(todo))
    try:
        for i, wav, info, problem in results:
            bar.update(1)
            e = todo[i]
            if problem:
                if opts["on_error"] == "fail":
                    raise PackError(f"{e.filename}: {problem} ({e.path})")
                skipped.append({"file": e.filename, "reason": problem})
                continue
            key = sample_key(e.filename)
            label = classes.index(e.label) if e.label is not None else -1
            m = meta.get(e.filename, {})
            names = parse_name(e.filename)
            rec = {
                "key": key,
                "filename": e.filename,
                "scene": e.label,
                "label": label,
                # meta.csv's identifier (e.g. barcelona-0) wins over the name pattern.
                "city": m["identifier"].rsplit("-", 1)[0] if m.get("identifier") else names["city"],
                "location": m.get("identifier") or names["location"],
                "device": m.get("source_label") or names["device"],
                "duration": info["frames"] / opts["sample_rate"],
                "source_sample_rate": info["source_sample_rate"],
                "source_channels": info["source_channels"],
                "source_subtype": info["source_subtype"],
            }
            shard = writer.add(key, [
                ("wav", wav),
                ("cls", str(label).encode("ascii")),
                ("i32", struct.pack("<i", label)),
                ("json", json.dumps(rec, sort_keys=True).encode("utf-8")),
            ])
            lines.append({k: rec[k] for k in ("key", "label", "scene", "city", "location", "device",
                                               "filename")} | {"shard": shard})
            if e.label is not None:
                counts[e.label] += 1
            channels.add(info["channels"])
            stats["clips"] += 1
            stats["source_bytes"] += info["source_bytes"]
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if not lines:
        raise PackError(f"split '{sp.name}': no usable clips ({len(skipped)} skipped)")
    with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
        for rec in lines:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    manifest = {
        "format": FORMAT,
        "split": sp.name,
        "labelled": sp.labelled,
        "classes": classes,
        "num_samples": len(lines),
        "class_counts": counts if sp.labelled else {},
        "shards": shards,
        "audio": {
            "format": "wav",
            "sample_rate": opts["sample_rate"],
            "channels": channels.pop() if len(channels) == 1 else None,
            "subtype": opts["subtype"],
        },
        "components": dict(COMPONENTS),
        "settings": dict(settings),
        "skipped": skipped,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packer": f"asc_dist {__version__}",
    }
    _write_json(tmp / "manifest.json", manifest)
    stats["out_bytes"] = sum(s["bytes"] for s in shards)
    return manifest, stats


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def pack(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "auto",
    fold: int = 1,
    workers: int | None = None,
    on_error: str = "fail",
    sample_rate: int = 48000,
    keep_channels: bool = False,
    subtype: str = "PCM_24",
    shard_size_mb: float = 256,
    shard_max_samples: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    csv_path: str | Path | None = None,
    split: str | None = None,
    only: list[str] | None = None,
    classes: str | list[str] | None = None,
    expect_sample_rate: int | None = None,
    expect_duration: float | None = None,
    duration_tolerance: float = 0.01,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, dict]:
    """Pack ``dataset_dir`` into ``out_dir/<split>/`` shards; return {split: manifest}."""
    if on_error not in ("fail", "skip"):
        raise PackError(f"on_error={on_error!r}: must be 'fail' or 'skip'")
    if sample_rate <= 0 or shard_size_mb <= 0 or (shard_max_samples is not None and shard_max_samples <= 0):
        raise PackError("sample_rate, shard_size_mb and shard_max_samples must be > 0")
    if subtype not in sf.available_subtypes("WAV"):
        raise PackError(f"subtype {subtype!r} is not a WAV subtype ({sorted(sf.available_subtypes('WAV'))})")
    t0 = time.perf_counter()
    dataset, out = Path(dataset_dir).resolve(), Path(out_dir).resolve()
    layout, splits, meta = plan_splits(dataset, layout, fold, csv_path, split)
    class_list = parse_classes(classes)
    if class_list is None:
        # meta.csv is the dataset's own label set: a fold-file label outside it is an error.
        # Without it, the classes are the union of the labels listed in all splits.
        labels = {m["scene_label"] for m in meta.values() if m.get("scene_label")}
        if not labels:
            labels = {e.label for sp in splits for e in sp.entries if e.label is not None}
        class_list = sorted(labels)
    _check_lists(splits, class_list, meta)
    if only:  # after the checks above, so every subset gets the same class list
        unknown = sorted(set(only) - {sp.name for sp in splits})
        if unknown:
            raise PackError(f"--splits {','.join(unknown)}: not in this dataset (it has "
                            f"{', '.join(sp.name for sp in splits)})")
        splits = [sp for sp in splits if sp.name in only]
    targets = [out / sp.name for sp in splits]
    for t in targets:
        if t.exists() and not overwrite:
            raise PackError(f"{t} already exists; pass --overwrite to replace it")
    workers = workers or os.cpu_count() or 1
    opts = {
        "sample_rate": sample_rate, "keep_channels": keep_channels, "subtype": subtype,
        "on_error": on_error, "expect_sample_rate": expect_sample_rate,
        "expect_duration": expect_duration, "duration_tolerance": duration_tolerance,
    }
    settings = {
        "layout": layout, "fold": fold, "seed": seed, "shard_size_mb": shard_size_mb,
        "shard_max_samples": shard_max_samples, "source": str(dataset), "sample_rate": sample_rate,
        "keep_channels": keep_channels, "subtype": subtype, "on_error": on_error,
        "resampler": resampler_name(), "csv": str(csv_path) if csv_path else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmps = {sp.name: out / f".{sp.name}.tmp-{os.getpid()}" for sp in splits}
    manifests, totals = {}, {"clips": 0, "source_bytes": 0, "out_bytes": 0}
    # spawn: no inherited threads/locks from a parent that already runs DALI or torch.
    pool = mp.get_context("spawn").Pool(workers, initializer=tune_malloc) if workers > 1 else None
    try:
        for sp in splits:
            tmp = tmps[sp.name]
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            manifests[sp.name], stats = _write_split(sp, tmp, class_list, meta, opts, settings, pool,
                                                     progress)
            for k in totals:
                totals[k] += stats[k]
        # Every split is complete: swap them in. Old output moves aside first, so each target
        # path always holds either the previous complete split or the new one.
        for sp in splits:
            target, old = out / sp.name, out / f".{sp.name}.old-{os.getpid()}"
            if target.exists():
                os.replace(target, old)
            os.replace(tmps[sp.name], target)
            if old.exists():
                shutil.rmtree(old)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for tmp in tmps.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    dt = time.perf_counter() - t0
    if verbose:
        for name, m in manifests.items():
            for s in m["skipped"]:
                print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
            print(f"{name}: {m['num_samples']} samples in {len(m['shards'])} shards -> {out / name}"
                  + (f" ({len(m['skipped'])} skipped)" if m["skipped"] else ""))
        print(
            f"packed {totals['clips']} clips in {dt:.1f} s: {totals['clips'] / dt:.1f} clips/s, "
            f"{totals['source_bytes'] / dt / 1e6:.1f} MB/s read, "
            f"{totals['out_bytes'] / dt / 1e6:.1f} MB/s written (workers={workers})"
        )
    return manifests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m asc_dist.pack",
        description=(
            "Pack an audio dataset (TUT 2018 / TAU 2019-2020 layout, or a CSV list) into "
            "WebDataset tar shards with DALI index files and a manifest per split. Existing "
            "output splits are refused unless --overwrite is given; with --overwrite each split is "
            "replaced atomically only after all splits were written (a failed run changes nothing)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("dataset_dir", help="dataset folder (e.g. TUT-urban-acoustic-scenes-2018-development)")
    ap.add_argument("out_dir", help="output root; splits go to OUT_DIR/<split>/")
    ap.add_argument("--layout", choices=LAYOUTS, default="auto",
                    help="tut2018: fold<k>_train/evaluate.txt (no fold files -> unlabelled 'eval' split); "
                    "tau2019: fold<k>_*.csv with header; csv: filename,label list")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--csv", dest="csv_path", help="CSV list for --layout csv (default: the one *.csv in DATASET_DIR)")
    ap.add_argument("--split", help="split name for csv / unlabelled folders (default train / eval)")
    ap.add_argument("--splits", help="comma list: pack only these splits (e.g. one per array task); "
                    "default all")
    ap.add_argument("--classes", help="class list: comma-separated, a text file, or a manifest.json "
                    "(default: the labels found in meta.csv and the lists)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="decode/convert processes")
    ap.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                    help="fail: stop at the first bad clip; skip: leave it out and list it in the manifest")
    ap.add_argument("--sample-rate", type=int, default=48000, help="stored sample rate")
    ap.add_argument("--keep-channels", action="store_true", help="keep the source channels (default: mono mean)")
    ap.add_argument("--subtype", default="PCM_24", help="stored WAV subtype")
    ap.add_argument("--shard-size-mb", type=float, default=256, help="max shard size (MiB)")
    ap.add_argument("--shard-max-samples", type=int, default=None, help="max samples per shard")
    ap.add_argument("--seed", type=int, default=0, help="pack-time shuffle seed")
    ap.add_argument("--expect-sample-rate", type=int, default=None, help="reject clips at another rate")
    ap.add_argument("--expect-duration", type=float, default=None, help="reject clips of another length (s)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output splits (atomically)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    tune_malloc()
    try:
        pack(
            a.dataset_dir, a.out_dir, layout=a.layout, fold=a.fold, workers=a.workers,
            on_error=a.on_error, sample_rate=a.sample_rate, keep_channels=a.keep_channels,
            subtype=a.subtype, shard_size_mb=a.shard_size_mb, shard_max_samples=a.shard_max_samples,
            seed=a.seed, overwrite=a.overwrite, csv_path=a.csv_path, split=a.split,
            only=a.splits.split(",") if a.splits else None,
            classes=a.classes, expect_sample_rate=a.expect_sample_rate,
            expect_duration=a.expect_duration, progress=not a.no_progress,
        )
    except PackError as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
