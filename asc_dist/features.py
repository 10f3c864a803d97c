"""``python -m asc_dist.features``: look at the front end's output, or build feature caches ahead.

    python -m asc_dist.features AUDIO [--out x.npy] [--png x.png] [--backend dali|torch] [cfg...]
        writes exactly what the model sees for one file (before standardisation) and a picture
    python -m asc_dist.features cache SHARDS [--split train,test] [--device auto|cpu|cuda] [cfg...]
        computes each split's feature cache (asc_dist.data.cache) beside the shards, so every
        later run (each Table I row and seed) loads it in seconds instead of decoding again

The front end itself is asc_dist.frontend (torch) and asc_dist.data.dali (DALI).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asc_dist import atomic, audio
from asc_dist import config as config_lib
from asc_dist.cli import command
from asc_dist.data import build_source, resolve_backend
from asc_dist.data.cache import cache_path
from asc_dist.dist import pick_device
from asc_dist.errors import DataError
from asc_dist.frontend import LogMel
from asc_dist.plots import plot_logmel

log = logging.getLogger(__name__)


def features_for_file(path: str | Path, cfg: Any, backend: str = "torch") -> np.ndarray:
    """[1, n_mels, frames] float32 dB for one audio file, exactly as the chosen backend builds it."""
    if backend == "dali":
        from asc_dist.data.dali import logmel_for_file

        return logmel_for_file(path, cfg.features)
    wave = torch.from_numpy(audio.decode(str(path), int(cfg.features.sample_rate), name=str(path)))
    with torch.no_grad():
        return LogMel(cfg.features)(wave)[0].numpy()


def dump_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.features",
        description="Write the log-mel the model sees for one audio file (before standardisation).",
    )
    p.add_argument("audio", help="audio file (wav/flac; any rate or channel count)")
    p.add_argument("--out", help="write the [1, n_mels, frames] float32 array here (.npy)")
    p.add_argument("--png", help="write an image of it here")
    p.add_argument("--backend", choices=["dali", "torch"], default=None,
                   help="front end to use (default: data.backend; auto = dali when usable)")
    p.add_argument("config", nargs="*", help="extra YAML files and key=value overrides")
    args = p.parse_intermixed_args(argv)
    cfg = config_lib.load(args.config)
    if not Path(args.audio).is_file():
        raise DataError(f"no such audio file: {args.audio}")
    backend = resolve_backend(args.backend or cfg.data.backend)
    try:
        feats = features_for_file(args.audio, cfg, backend)
    except ValueError as e:  # an unreadable file
        raise DataError(str(e)) from None
    f = cfg.features
    print(f"{args.audio}: {backend} log-mel {tuple(feats.shape)} "
          f"(sr {f.sample_rate}, n_fft {f.n_fft}, hop {f.hop_length}, {f.n_mels} mels "
          f"{f.f_min:g}-{f.f_max:g} Hz), min {feats.min():.1f} dB, max {feats.max():.1f} dB, "
          f"mean {feats.mean():.1f} dB")
    if args.out:
        with atomic.writing(args.out, what="features") as fh:
            np.save(fh, feats)
        log.info(f"wrote {args.out}")
    if args.png:
        plot_logmel(feats, args.png, f, f"{Path(args.audio).name} ({backend})")
        log.info(f"wrote {args.png}")
    return 0


def cache_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.features cache",
        description="Build the feature cache of packed splits ahead of training (one process).")
    p.add_argument("shards", help="root holding <split>/manifest.json (data.shards)")
    p.add_argument("--split", default=None,
                   help="comma list of splits (default: data.train_split,data.test_split)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="the training device the cache is for (its features are computed there)")
    p.add_argument("config", nargs="*", help="extra YAML files and key=value overrides (the "
                   "feature settings and data.backend of the runs that will use it)")
    args = p.parse_intermixed_args(argv)
    cfg = config_lib.load([*args.config, f"data.shards={args.shards}"], world_size=1)
    device = pick_device(args.device)
    splits = args.split.split(",") if args.split else [
        s for s in (cfg.data.train_split, cfg.data.test_split) if s is not None]
    for split in splits:
        t0 = time.perf_counter()
        with build_source(cfg, split, train=False, rank=0, world_size=1, device=device,
                          batch_size=32, cache="device") as src:
            path = cache_path(cfg, split, src.backend.split("+")[0], device)
            print(f"{split}: {len(src.table.keys)} clips, {src.table.nbytes / 2**20:.1f} MiB of "
                  f"features -> {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


@command("asc_dist.features")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cache"]:
        return cache_main(argv[1:])
    return dump_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
