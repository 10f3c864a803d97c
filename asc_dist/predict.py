"""Classify audio files with a trained checkpoint and write a DCASE submission file.

    python -m asc_dist.predict CHECKPOINT AUDIO_OR_DIR... [--out predictions.csv] [--scores]

Each file (WAV/FLAC/OGG, any sample rate, mono or multi-channel) goes through the training front
end: channel mean, resampling to ``features.sample_rate``, zero-pad/crop to
``features.clip_seconds``, log-mel, the checkpoint's standardisation. Directories are searched
recursively for audio files; their files are named relative to the directory given, so passing
a DCASE dataset root (the folder holding ``audio/``) gives DCASE names like ``audio/1.wav``.

Output (tab-separated, written atomically): ``filename<TAB>scene_label`` per line with no header
(the DCASE 2018 task 1 submission format); with ``--scores`` a header row and one softmax
probability column per class follow. Unreadable files are reported on stderr with the reason
and listed in a summary; all others are still predicted. Exit status: 0 all predicted, 1 some
files unreadable (the rest written), 2 nothing to do or a bad checkpoint/argument.
"""

from __future__ import annotations

import argparse
import csv
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
from asc_dist.dist import pick_device
from asc_dist.errors import ConfigError, DataError
from asc_dist.frontend import LogMel, clip_samples, fix_length
from asc_dist.restore import restore

log = logging.getLogger(__name__)


@dataclass
class Item:
    path: Path
    name: str  # the filename column


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


class _Clips(Dataset):
    """``ds[i]`` -> (i, fixed-length mono wave or None, reason it could not be read)."""

    def __init__(self, items: list[Item], cfg_features: Any):
        self.items = items
        self.sample_rate = int(cfg_features.sample_rate)
        self.num_samples = clip_samples(cfg_features)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path = self.items[i].path
        if not path.is_file():
            return i, None, "no such file"
        try:
            wave = torch.from_numpy(audio.decode(str(path), self.sample_rate, name=str(path)))
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

    ``restored`` is an :class:`asc_dist.restore.Restored` on ``device``. The log-mel and the
    standardisation run in float32, exactly as in training; only the network runs under autocast.
    """
    device = torch.device(device)
    logmel = LogMel(restored.cfg.features).to(device)
    autocast = restored.autocast(device)
    loader = DataLoader(_Clips(items, restored.cfg.features), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate,
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
                x = restored.standardize(logmel(wave))
                with autocast:
                    logits = restored.model(x)
                p = logits.float().softmax(dim=1).cpu()
                for row, (i, _) in enumerate(ok):
                    probs[i] = p[row]
            if bar:
                bar.update(len(batch))
    finally:
        if bar:
            bar.close()
    return probs, failed


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
    p.add_argument("checkpoint", help="checkpoint .pt file, or a run dir (its newest checkpoint)")
    p.add_argument("inputs", nargs="+", help="audio files and/or directories (searched recursively)")
    p.add_argument("--out", default="predictions.csv", help="output TSV (default: predictions.csv)")
    p.add_argument("--scores", action="store_true",
                   help="add a header row and one probability column per class")
    p.add_argument("--relative-to", default=None,
                   help="name every file by its path relative to this directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: in this process)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="the network's precision (default: the training run's train.precision; "
                        "the log-mel is float32 either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@command("asc_dist.predict")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
    items = collect_inputs(args.inputs, args.relative_to)
    device = pick_device(args.device)
    overrides = [f"train.precision={args.precision}"] if args.precision else []
    restored = restore(args.checkpoint, overrides=overrides, device=device)
    probs, failed = predict_files(restored, items, batch_size=args.batch_size, workers=args.workers,
                                  device=device, progress=not args.quiet)
    rows = write_predictions(args.out, items, probs, restored.classes, scores=args.scores)
    log.info(f"predicted {rows} of {len(items)} files with {restored.path} (step "
             f"{restored.step}); wrote {args.out}")
    if failed:
        log.warning(f"{len(failed)} unreadable file(s), not in {args.out}:\n"
                    + "\n".join(f"  {items[i].path}: {why}" for i, why in sorted(failed.items())))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
