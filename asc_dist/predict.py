"""Classify audio files with a trained checkpoint or device set and write a DCASE submission file.

    python -m asc_dist.predict CHECKPOINT|DEVSET AUDIO_OR_DIR... [--out predictions.csv] [--scores]
        [--devices FILE] [--precision auto|bf16|fp32|fp16]
    python -m asc_dist.predict CHECKPOINT|DEVSET --split SPLIT_DIR [...]

Each file (WAV/FLAC/OGG, any sample rate, mono or multi-channel) goes through the training front
end: channel mean, resampling to ``features.sample_rate`` (with the resampler the training
shards were packed with: the checkpoint records it), zero-pad/crop to ``features.clip_seconds``,
log-mel, the checkpoint's standardisation. Directories are searched recursively for audio files;
their files are named relative to the directory given, so passing a DCASE dataset root (the
folder holding ``audio/``) gives DCASE names like ``audio/1.wav``. ``--split`` predicts a packed
split instead (e.g. a DCASE evaluation set, unlabelled), each clip named by its original file.

A device set (asc_dist.devices) scores each file with its recording device's model, every
other device with the general model. The device id of a file comes from ``--devices FILE``
(tab-separated with a header naming ``filename`` and ``device_id``: the DCASE evaluation sets'
``evaluation_setup/fold1_test.csv``), else from the last part of a TAU name
(``...-s2.wav``); for ``--split``, from the split's samples.jsonl.

Output (tab-separated, written atomically): ``filename<TAB>scene_label`` per line with no header
(the DCASE 2018 task 1 submission format); with ``--scores`` a header row and one softmax
probability column per class follow. Unreadable files are reported on stderr with the reason
and listed in a summary; all others are still predicted. Exit status: 0 all predicted, 1 some
files unreadable (the rest written), 2 nothing to do or a bad checkpoint/argument.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from asc_dist import atomic, audio
from asc_dist.cli import command
from asc_dist.devices import DeviceSet, load_model_or_set, router_of, unknown_devices
from asc_dist.dist import pick_device
from asc_dist.errors import ConfigError, DataError
from asc_dist.evaluate import precision_overrides
from asc_dist.frontend import LogMel, clip_samples, fix_length
from asc_dist.pack.layouts import parse_name

log = logging.getLogger(__name__)


@dataclass
class Item:
    path: Path | None  # None: a clip of a packed split (--split)
    name: str  # the filename column
    device: str | None = None  # its recording device: which model of a device set scores it


def collect_inputs(inputs: Sequence[str | Path], relative_to: str | Path | None = None) -> list[Item]:
    """Files as given, and audio files found (recursively, sorted) under directories."""
    items: list[Item] = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in audio.AUDIO_EXTS)
            if not found:
                raise DataError(f"no audio files ({', '.join(audio.AUDIO_EXTS)}) under {p}")
            items += [Item(f, f.relative_to(p).as_posix()) for f in found]
        else:  # a missing file is reported with the others, not fatal
            items.append(Item(p, str(arg)))
    if relative_to is not None:
        base = Path(relative_to).resolve()
        for it in items:
            it.name = Path(os.path.relpath(it.path.resolve(), base)).as_posix()
    return items


def read_device_list(path: str | Path) -> dict[str, str]:
    """filename -> device id from a tab-separated list whose header names ``filename`` and
    ``device_id`` (the DCASE evaluation sets' evaluation_setup/fold1_test.csv)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f, delimiter="\t") if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--devices {path}: cannot read: {e}") from None
    header = [c.strip() for c in rows[0]] if rows else []
    if "filename" not in header or "device_id" not in header:
        raise DataError(f"--devices {path}:1: the header must name 'filename' and 'device_id' "
                        f"(tab-separated, as evaluation_setup/fold1_test.csv); got {header}")
    fi, di = header.index("filename"), header.index("device_id")
    out = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) <= max(fi, di) or not row[fi].strip() or not row[di].strip():
            raise DataError(f"--devices {path}:{n}: expected a filename and a device_id, got {row}")
        out[row[fi].strip()] = row[di].strip()
    return out


def assign_devices(items: list[Item], table: dict[str, str] | None) -> int:
    """Each item's device: from ``table`` (by its name, else its file name), else its TAU name.
    Returns how many items ``table`` does not list (they get none)."""
    by_base = {Path(k).name: v for k, v in (table or {}).items()}
    missing = 0
    for it in items:
        if table is None:
            it.device = parse_name(it.name)["device"]
            continue
        it.device = table.get(it.name) or by_base.get(Path(it.name).name)
        missing += it.device is None
    return missing


class _Clips(Dataset):
    """``ds[i]`` -> (i, fixed-length mono wave or None, reason it could not be read)."""

    def __init__(self, items: list[Item], cfg_features: Any, resampler: str = audio.RESAMPLER):
        self.items = items
        self.sample_rate = int(cfg_features.sample_rate)
        self.num_samples = clip_samples(cfg_features)
        self.resampler = resampler

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path = self.items[i].path
        if not path.is_file():
            return i, None, "no such file"
        try:
            wave = torch.from_numpy(audio.decode(str(path), self.sample_rate, name=str(path),
                                                 resampler=self.resampler))
        except ValueError as e:
            return i, None, str(e).split(f"{path}: ", 1)[-1]
        except Exception as e:  # noqa: BLE001 - e.g. a resampler failure: report, don't abort the run
            return i, None, f"{type(e).__name__}: {e}"
        if wave.numel() == 0:
            return i, None, "no audio samples (empty file)"
        if not torch.isfinite(wave).all():
            return i, None, "non-finite sample values"
        return i, fix_length(wave, self.num_samples), ""


def _collate(items):
    return items


def _worker_init(_):
    torch.set_num_threads(1)


@torch.no_grad()
def predict_files(restored, items: list[Item], *, batch_size: int = 16, workers: int = 2,
                  device: torch.device | str = "cpu", progress: bool = True
                  ) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Class probabilities per readable item, and the reason per unreadable one (by item index).

    ``restored`` is an :class:`asc_dist.restore.Restored` or a
    :class:`asc_dist.devices.DeviceSet` on ``device`` (each item scored by its device's model).
    The log-mel and the standardisation run in float32, exactly as in training; only the network
    runs under autocast (or in float16: train.eval_precision=fp16).
    """
    device = torch.device(device)
    logmel = LogMel(restored.cfg.features).to(device)
    autocast = restored.autocast(device)
    model = router_of(restored)
    loader = DataLoader(_Clips(items, restored.cfg.features, restored.resampler),
                        batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if workers else None)
    probs: dict[int, torch.Tensor] = {}
    failed: dict[int, str] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="predict", unit="file", file=sys.stderr)
    try:
        for batch in loader:
            ok = [(i, w) for i, w, _ in batch if w is not None]
            for i, w, why in batch:
                if w is None:
                    failed[i] = why
                    msg = f"skipped {items[i].path}: {why}"
                    (bar.write(msg, file=sys.stderr) if bar else log.warning(msg))
            if ok:
                wave = torch.stack([w for _, w in ok]).to(device)
                x = logmel(wave)  # float32, outside autocast: only the network runs in bf16
                with autocast:
                    logits = model(x, [items[i].device for i, _ in ok])
                p = logits.float().softmax(dim=1).cpu()
                for row, (i, _) in enumerate(ok):
                    probs[i] = p[row]
            if bar:
                bar.update(len(batch))
    finally:
        if bar:
            bar.close()
    return probs, failed


@torch.no_grad()
def predict_split(restored, split_dir: str | Path, *, batch_size: int = 16,
                  device: torch.device | str = "cpu", progress: bool = True
                  ) -> tuple[list[Item], dict[int, torch.Tensor]]:
    """Items (each clip of a packed split, named by its original file, with its device from
    samples.jsonl) and their class probabilities, read through the torch data backend."""
    from omegaconf import OmegaConf

    from asc_dist.data import build_source
    from asc_dist.validate import sample_groups

    split_dir = Path(split_dir)
    if not (split_dir / "manifest.json").is_file():
        raise DataError(f"--split {split_dir}: no manifest.json there (expected a packed split "
                        f"directory such as shards/tau2025-eval/eval)")
    cfg = OmegaConf.merge(restored.cfg, {"data": {"shards": str(split_dir.parent), "backend": "torch",
                                                  "cache": "none"}})
    by_key, _ = sample_groups(cfg, split_dir.name)
    names = {}
    with open(split_dir / "samples.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            names[r["key"]] = r.get("filename") or r["key"]
    device = torch.device(device)
    model = router_of(restored)
    autocast = restored.autocast(device)
    items: list[Item] = []
    probs: dict[int, torch.Tensor] = {}
    with build_source(cfg, split_dir.name, train=False, rank=0, world_size=1, device=device,
                      batch_size=batch_size) as source:
        batches = source.epoch(0)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=source.steps_per_epoch, desc="predict", unit="batch",
                           file=sys.stderr)
        for b in batches:
            keys = [k for k in b.keys]
            devices = [by_key.get(k, {}).get("device") for k in keys]
            with autocast:
                p = model(b.features, devices).float().softmax(dim=1).cpu()
            for row, (k, d) in enumerate(zip(keys, devices)):
                if k:  # not a padding row
                    probs[len(items)] = p[row]
                    items.append(Item(None, names.get(k, k), None if d == "None" else d))
    order = sorted(range(len(items)), key=lambda i: items[i].name)
    return [items[i] for i in order], {new: probs[old] for new, old in enumerate(order)}


def write_predictions(path: str | Path, items: list[Item], probs: dict[int, torch.Tensor],
                      classes: list[str], scores: bool = False) -> int:
    """DCASE TSV in input order (unreadable files left out), written atomically; rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with atomic.writing(path, "w", what="predictions") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        if scores:
            w.writerow(["filename", "scene_label", *classes])
        for i, it in enumerate(items):
            if i not in probs:
                continue
            p = probs[i]
            row = [it.name, classes[int(p.argmax())]]
            if scores:
                row += [f"{float(v):.6f}" for v in p]
            w.writerow(row)
            rows += 1
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.predict",
        description="Classify audio files (any rate, mono/stereo, WAV/FLAC) with a checkpoint and "
                    "write 'filename<TAB>scene_label' lines (DCASE submission format).")
    p.add_argument("checkpoint", help="checkpoint .pt file, a run dir (its newest checkpoint) or a "
                                      "device set (asc_dist.devices)")
    p.add_argument("inputs", nargs="*", help="audio files and/or directories (searched recursively)")
    p.add_argument("--split", default=None,
                   help="predict a packed split instead (a directory holding manifest.json, e.g. "
                        "a DCASE evaluation set packed by asc_dist.pack)")
    p.add_argument("--devices", default=None, metavar="FILE",
                   help="device id per file: tab-separated with a header naming filename and "
                        "device_id (evaluation_setup/fold1_test.csv); default: a TAU name's last "
                        "part (...-s2.wav)")
    p.add_argument("--out", default="predictions.csv", help="output TSV (default: predictions.csv)")
    p.add_argument("--scores", action="store_true",
                   help="add a header row and one probability column per class")
    p.add_argument("--relative-to", default=None,
                   help="name every file by its path relative to this directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: in this process)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp16"], default=None,
                   help="the network's precision (default: the run's train.eval_precision; fp16: "
                        "model and inputs in float16, as the DCASE baselines; the log-mel is "
                        "float32 either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@command("asc_dist.predict")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
    if bool(args.inputs) == bool(args.split):
        raise ConfigError("give audio files or directories, or --split SPLIT_DIR (one of them)")
    if args.split and args.devices:
        raise ConfigError("--devices is for files: a packed split names its devices itself")
    items = [] if args.split else collect_inputs(args.inputs, args.relative_to)
    table = read_device_list(args.devices) if args.devices else None
    device = pick_device(args.device)
    restored = load_model_or_set(args.checkpoint, overrides=precision_overrides(args.precision),
                                 device=device)
    failed: dict[int, str] = {}
    if args.split:
        items, probs = predict_split(restored, args.split, batch_size=args.batch_size,
                                     device=device, progress=not args.quiet)
    else:
        unlisted = assign_devices(items, table)
        if unlisted:
            log.warning(f"{unlisted} file(s) are not in --devices {args.devices}: the general "
                        f"model scores them")
        probs, failed = predict_files(restored, items, batch_size=args.batch_size,
                                      workers=args.workers, device=device, progress=not args.quiet)
    if isinstance(restored, DeviceSet):
        counts: dict[str, int] = {}
        for i in probs:
            counts[str(items[i].device)] = counts.get(str(items[i].device), 0) + 1
        line = unknown_devices(counts, restored.devices)
        if line:
            log.info(line)
    rows = write_predictions(args.out, items, probs, restored.classes, scores=args.scores)
    where = restored.path
    log.info(f"predicted {rows} of {len(items)} {'clips' if args.split else 'files'} with {where} "
             f"(step {restored.step}); wrote {args.out}")
    if failed:
        log.warning(f"{len(failed)} unreadable file(s), not in {args.out}:\n"
                    + "\n".join(f"  {items[i].path}: {why}" for i, why in sorted(failed.items())))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
