"""Pack an audio dataset folder into WebDataset tar shards with DALI index files.

``python -m asc_dist.pack DATASET OUT_DIR`` (asc_dist.pack.cli) reads a TUT 2018 / TAU
2019-2020 / TAU 2022 layout or a plain CSV (layouts.py), from the unpacked folder or straight from
the dataset's zip parts (zips.py: nothing extracted, the same shards), optionally keeping only the
files a split list names (``train_list``/``test_list``: DCASE 2024's split25.csv ...), and writes,
per split, ``OUT_DIR/<split>/``::

    <split>-000000.tar   GNU tar; per sample <key>.wav, <key>.cls, <key>.i32, <key>.json (writer.py)
    <split>-000000.idx   DALI index (the format of DALI's wds2idx)
    samples.jsonl        one line per sample, in shard order, with a digest per member (manifest.py)
    manifest.json        classes, counts, shards (+sha256), audio format, settings, skipped files

Shard contract (readers depend on it):

* ``<key>`` is the audio file's stem with every character outside ``[A-Za-z0-9_-]`` (dots
  included) replaced by ``_``; keys are unique within a pack.
* ``.wav``: PCM WAV (PCM_24 by default) at the target rate, mono (channel mean) unless
  ``keep_channels``, converted by asc_dist.audio (soxr). ``.cls``: ASCII class index (-1 =
  unlabelled), which webdataset's default decoder turns into an int. ``.i32``: the same index
  as little-endian int32, which DALI's ``readers.webdataset(dtypes=INT32)`` batches directly.
  ``.json``: metadata.
* Samples are shuffled across the whole split with ``seed`` at pack time; tar members are
  deterministic, so the same inputs and seed give byte-identical tars whatever the worker count.

Every clip is decoded and checked (readable, not truncated, sample rate, duration, finite
samples) before it is written. All splits are staged beside their targets and swapped in only
when every split succeeded: a failed run leaves earlier output as it was. Existing output is
refused unless ``overwrite``, which replaces it atomically per split.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from asc_dist import atomic, audio
from asc_dist.digest import member_digests
from asc_dist.errors import PackError
from asc_dist.pack import manifest, zips
from asc_dist.pack.layouts import (
    ALL_FOLDS,
    Entry,
    Member,
    SplitPlan,
    check_lists,
    parse_classes,
    plan_splits,
    select_listed,
)
from asc_dist.pack.writer import ShardWriter

log = logging.getLogger(__name__)

__all__ = ["PackError", "PackOptions", "pack"]


@dataclass(frozen=True)
class PackOptions:
    """Everything ``pack`` can be told; the CLI's options map onto these one to one."""

    layout: str = "auto"  # auto | tut2018 | tau2019 | tau2022 | csv
    fold: int | str = 1  # or "all": every labelled clip of meta.csv as the train split
    csv_path: str | None = None  # the list for layout csv (default: the one *.csv)
    # Keep only the train / test files these lists name (on disk, or a path inside the dataset),
    # e.g. DCASE 2024 task 1's split25.csv; recorded in that split's manifest.
    train_list: str | None = None
    test_list: str | None = None
    split: str | None = None  # split name for csv / unlabelled folders
    only: tuple[str, ...] | None = None  # pack only these splits (one per SLURM array task)
    classes: str | list[str] | None = None  # comma list, text file or manifest.json
    workers: int | None = None  # decode processes (default: all CPUs)
    on_error: str = "fail"  # fail | skip
    sample_rate: int = 48000
    resampler: str = audio.RESAMPLER  # soxr-vhq | torchaudio (the DCASE 2024/2025 baselines')
    keep_channels: bool = False
    subtype: str = "PCM_24"
    shard_size_mb: float = 256
    shard_max_samples: int | None = None
    seed: int = 0
    overwrite: bool = False
    expect_sample_rate: int | None = None
    expect_duration: float | None = None
    duration_tolerance: float = 0.01
    progress: bool = True
    verbose: bool = True

    def check(self) -> None:
        if self.fold != ALL_FOLDS and (type(self.fold) is not int or self.fold < 1):
            raise PackError(f"fold={self.fold!r}: expected a fold number (1, 2, ...) or "
                            f"'{ALL_FOLDS}'")
        if self.on_error not in ("fail", "skip"):
            raise PackError(f"on_error={self.on_error!r}: must be 'fail' or 'skip'")
        if self.sample_rate <= 0 or self.shard_size_mb <= 0 or (
                self.shard_max_samples is not None and self.shard_max_samples <= 0):
            raise PackError("sample_rate, shard_size_mb and shard_max_samples must be > 0")
        if self.resampler not in audio.RESAMPLERS:
            raise PackError(f"resampler {self.resampler!r}: expected one of "
                            f"{', '.join(audio.RESAMPLERS)}")
        if self.subtype not in sf.available_subtypes("WAV"):
            raise PackError(f"subtype {self.subtype!r} is not a WAV subtype "
                            f"({sorted(sf.available_subtypes('WAV'))})")


def _read(src: Path | Member, o: PackOptions) -> tuple:
    """A clip's checked samples, rate, format and size, from its file or its zip member."""
    checks = {"expect_sample_rate": o.expect_sample_rate, "expect_duration": o.expect_duration,
              "duration_tolerance": o.duration_tolerance}
    if isinstance(src, Member):
        data = zips.read_member(src)
        return *audio.read_checked(data, name=src.name, **checks), len(data)
    return *audio.read_checked(Path(src), **checks), os.path.getsize(src)


def _convert(task: tuple[int, Path | Member, PackOptions],
             ) -> tuple[int, bytes | None, dict | None, str | None]:
    """Worker: (index, file or zip member, options) -> (index, stored WAV bytes, what was stored,
    problem)."""
    i, src, o = task
    try:
        x, sr, info, size = _read(src, o)
        y = audio.convert(x, sr, o.sample_rate, o.keep_channels, o.resampler)
        wav = audio.encode_wav(y, o.sample_rate, o.subtype)
    except ValueError as e:
        return i, None, None, str(e)
    except Exception as e:  # noqa: BLE001 - any decoder crash is a problem with this file
        return i, None, None, f"{type(e).__name__}: {e}"
    stored = {"frames": int(y.shape[0]), "channels": int(y.shape[1]), "source": info,
              "source_bytes": size}
    return i, wav, stored, None


def _shuffled(entries: list[Entry], seed: int, split: str) -> list[Entry]:
    order = sorted(entries, key=lambda e: e.filename)
    random.Random(f"{seed}:{split}").shuffle(order)  # str seeds are hashed deterministically
    return order


def _problem(o: PackOptions, e: Entry, problem: str, skipped: list[dict]) -> None:
    if o.on_error == "fail":
        raise PackError(f"{e.filename}: {problem} ({e.path}, listed at {e.where})")
    # A zip member's name alone does not say which of the zips to check or download again.
    where = f" ({e.path})" if isinstance(e.path, Member) else ""
    skipped.append({"file": e.filename, "reason": problem + where})


def _write_split(sp: SplitPlan, staged: Path, classes: list[str], meta: dict[str, dict],
                 o: PackOptions, settings: dict, pool) -> tuple[dict, dict]:
    entries = _shuffled(sp.entries, o.seed, sp.name)
    skipped: list[dict] = []
    todo = []
    for e in entries:
        if e.path.is_file():
            todo.append(e)
        else:
            _problem(o, e, "missing file", skipped)
    tasks = [(i, e.path, o) for i, e in enumerate(todo)]
    results = pool.imap(_convert, tasks, chunksize=2) if pool else map(_convert, tasks)
    writer = ShardWriter(staged, sp.name, int(o.shard_size_mb * 2**20), o.shard_max_samples)
    records: list[dict] = []
    channels: set[int] = set()
    totals = {"clips": 0, "source_bytes": 0}
    bar = tqdm(total=len(entries), desc=sp.name, unit="clip", disable=not o.progress, file=sys.stderr)
    bar.update(len(entries) - len(todo))
    try:
        for i, wav, stored, problem in results:
            bar.update(1)
            e = todo[i]
            if problem:
                _problem(o, e, problem, skipped)
                continue
            rec = manifest.sample_record(e, classes, meta.get(e.filename, {}), stored, o.sample_rate)
            parts = manifest.components(rec, wav)  # the .json member holds rec as it is now
            rec["shard"] = writer.add(rec["key"], parts)
            rec[manifest.DIGEST] = member_digests(parts)  # samples.jsonl only, not the tar
            records.append(rec)
            channels.add(stored["channels"])
            totals["clips"] += 1
            totals["source_bytes"] += stored["source_bytes"]
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if not records:
        raise PackError(f"split '{sp.name}': no usable clips ({len(skipped)} skipped)")
    m = manifest.build(sp.name, sp.labelled, classes, records, shards, channels,
                       {"sample_rate": o.sample_rate, "subtype": o.subtype}, settings, skipped)
    manifest.write(staged, records, m)
    totals["out_bytes"] = sum(s["bytes"] for s in shards)
    return m, totals


def pack(dataset_dir: str | Path | Sequence[str | Path], out_dir: str | Path,
         options: PackOptions | None = None, **kw) -> dict[str, dict]:
    """Pack ``dataset_dir`` into ``out_dir/<split>/`` shards; return {split: manifest}.

    ``dataset_dir``: the dataset folder, a folder holding one dataset's zip parts, or the zip
    files (a list); zips are read in place (asc_dist.pack.zips).

    Options come as a :class:`PackOptions` and/or its fields as keywords.
    """
    o = replace(options or PackOptions(), **kw)
    o.check()
    t0 = time.perf_counter()
    source, out = zips.open_source(dataset_dir), Path(out_dir).resolve()
    layout, splits, meta = plan_splits(source, o.layout, o.fold, o.csv_path, o.split)
    if o.fold == ALL_FOLDS:
        log.info(f"--fold all: the train split is every clip meta.csv labels "
                 f"({len(splits[0].entries)} of {len(meta)}); the fold files are not read")
    classes = parse_classes(o.classes)
    if classes is None:
        # meta.csv is the dataset's own label set: a fold-file label outside it is an error.
        # Without it, the classes are the union of the labels listed in all splits.
        labels = {m["scene_label"] for m in meta.values() if m.get("scene_label")}
        classes = sorted(labels or {e.label for sp in splits for e in sp.entries if e.label is not None})
    check_lists(splits, classes, meta)
    # After the checks and the classes, which stay the whole dataset's: a 5 % subset may lack a
    # class, and its model must still have the dataset's outputs.
    listed = {split: select_listed(source, splits, split, spec, meta, f"--{split}-list")
              for split, spec in (("train", o.train_list), ("test", o.test_list)) if spec}
    if o.only:  # after the checks above, so every subset gets the same class list
        unknown = sorted(set(o.only) - {sp.name for sp in splits})
        if unknown:
            raise PackError(f"--splits {','.join(unknown)}: not in this dataset (it has "
                            f"{', '.join(sp.name for sp in splits)})")
        splits = [sp for sp in splits if sp.name in o.only]
    for sp in splits:  # before any decoding: a refusal should not cost the hours of a pack
        if (out / sp.name).exists() and not o.overwrite:
            raise PackError(f"{out / sp.name} already exists; pass --overwrite to replace it")
        _note_list_change(out / sp.name, listed.get(sp.name))
    workers = o.workers or os.cpu_count() or 1
    settings = {
        "layout": layout, "fold": o.fold, "seed": o.seed, "shard_size_mb": o.shard_size_mb,
        "shard_max_samples": o.shard_max_samples, "source": source.root,
        "sample_rate": o.sample_rate, "keep_channels": o.keep_channels, "subtype": o.subtype,
        "on_error": o.on_error, "resampler": o.resampler,
        "csv": str(o.csv_path) if o.csv_path else None,
    }
    manifests, totals = {}, {"clips": 0, "source_bytes": 0, "out_bytes": 0}
    # spawn: no inherited threads/locks from a parent that already runs DALI or torch.
    pool = mp.get_context("spawn").Pool(workers, initializer=audio.tune_malloc) if workers > 1 else None
    try:
        # Every split is staged first and swapped in only when all are complete (at the end of
        # the ExitStack), so each target holds either its previous complete split or the new one.
        with ExitStack() as stack:
            for sp in splits:
                staged = stack.enter_context(atomic.staged_dir(out / sp.name, overwrite=True))
                split_settings = {**settings, "split_list": listed.get(sp.name)}
                manifests[sp.name], t = _write_split(sp, staged, classes, meta, o, split_settings, pool)
                for k in totals:
                    totals[k] += t[k]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        zips.close_cached()  # the zips workers=1 decoded from in this process
    if o.verbose:
        _summary(manifests, totals, out, time.perf_counter() - t0, workers)
    return manifests


def _list_name(record: dict | None) -> str:
    if not record:
        return "no split list"
    return f"{record['option']} {record['path']} (sha256 {record['sha256'][:12]})"


def _note_list_change(split_dir: Path, now: dict | None) -> None:
    """Warn when a split about to be replaced was packed from another split list (or none): a
    repack that forgot --train-list would silently turn a subset into the whole fold."""
    try:
        before = json.loads((split_dir / "manifest.json").read_text())["settings"].get("split_list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # nothing there, or not a manifest: nothing to compare with
    if (before or {}).get("sha256") != (now or {}).get("sha256"):
        log.warning(f"{split_dir} was packed from {_list_name(before)}; it is now packed from "
                    f"{_list_name(now)}")


def _summary(manifests: dict[str, dict], totals: dict, out: Path, dt: float, workers: int) -> None:
    for name, m in manifests.items():
        for s in m["skipped"]:
            log.warning(f"skipped {s['file']}: {s['reason']}")
        chosen = m["settings"].get("split_list")
        log.info(f"{name}: {m['num_samples']} samples in {len(m['shards'])} shards -> {out / name}"
                 + (f" ({len(m['skipped'])} skipped)" if m["skipped"] else "")
                 + (f", selected by {chosen['name']}" if chosen else ""))
    log.info(f"packed {totals['clips']} clips in {dt:.1f} s: {totals['clips'] / dt:.1f} clips/s, "
             f"{totals['source_bytes'] / dt / 1e6:.1f} MB/s read, "
             f"{totals['out_bytes'] / dt / 1e6:.1f} MB/s written (workers={workers})")
