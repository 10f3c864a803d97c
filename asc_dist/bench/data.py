"""``bench data``: the input pipeline (shards -> log-mel batches on the device) in clips/s.

The DALI backend, the torch backend and a plain webdataset + librosa loader over the same shards
with the same thread count, in one run, and their ratios. With CUDA the GPU paths (log-mel on the
GPU) too. Rounds interleave the candidates; the best round counts.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from functools import partial

import numpy as np
import torch

from asc_dist import atomic
from asc_dist.bench import add_stream_args, machine, with_values

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_source(cfg, backend: str, split: str, batches: int, batch_size: int, device: torch.device,
                warmup: int = 2) -> dict:
    """clips/s of ``build_source`` in training mode (shuffled, epochs rolled over) on ``device``."""
    from asc_dist.data import build_source

    c = with_values(cfg, {"data.backend": backend})
    t0 = time.perf_counter()
    src = build_source(c, split, train=True, rank=0, world_size=1, device=device,
                       batch_size=batch_size, seed=0, cache="none")
    built = time.perf_counter() - t0
    done, epoch, first, start = 0, 0, None, None
    try:
        while done < warmup + batches:
            for batch in src.epoch(epoch):
                _ = batch.features.sum().item() if done == 0 else None  # materialise the first
                done += 1
                if first is None:
                    first = time.perf_counter() - t0
                if done == warmup:
                    _sync(device)
                    start = time.perf_counter()
                if done >= warmup + batches:
                    break
            epoch += 1
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        src.close()
    return {"name": backend, "device": device.type, "clips_per_s": batches * batch_size / elapsed,
            "seconds": elapsed, "open_s": built, "first_batch_s": first,
            "steps_per_epoch": src.steps_per_epoch}


def _librosa_sample(sample: dict, f, num_samples: int) -> tuple[torch.Tensor, int]:
    import librosa

    wave, _ = librosa.load(io.BytesIO(sample["wav"]), sr=int(f.sample_rate), mono=True)
    wave = librosa.util.fix_length(wave, size=num_samples)
    power = librosa.feature.melspectrogram(
        y=wave, sr=int(f.sample_rate), n_fft=int(f.n_fft), win_length=int(f.win_length),
        hop_length=int(f.hop_length), window="hann", center=True, pad_mode="reflect", power=2.0,
        n_mels=int(f.n_mels), fmin=float(f.f_min), fmax=float(f.f_max), htk=f.mel_scale == "htk",
        norm="slaney" if f.mel_norm == "slaney" else None)
    if f.log == "ln":
        db = np.log(power + float(f.log_eps))[:, : int(f.frames)]
    else:
        db = 10.0 * np.log10(np.maximum(power, 10.0 ** (float(f.floor_db) / 10.0)))[:, : int(f.frames)]
    return torch.from_numpy(db[None].astype(np.float32)), int(sample["cls"])


def _librosa_worker_init(_):
    torch.set_num_threads(1)


def time_librosa(cfg, split: str, batches: int, batch_size: int, threads: int, warmup: int = 2) -> dict:
    """The plain baseline: webdataset streaming + librosa decode/log-mel in DataLoader workers."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    from asc_dist.data.manifest import load_split
    from asc_dist.frontend import clip_samples

    index = load_split(cfg.data.shards, split)
    urls = [str(s.path) for s in index.shards]
    fn = partial(_librosa_sample, f=cfg.features, num_samples=clip_samples(cfg.features))
    t0 = time.perf_counter()
    done, first, start = 0, None, None
    while done < warmup + batches:
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(fn)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=threads,
                            worker_init_fn=_librosa_worker_init, drop_last=True)
        for _x, _y in loader:
            done += 1
            if first is None:
                first = time.perf_counter() - t0
            if done == warmup:
                start = time.perf_counter()
            if done >= warmup + batches:
                break
    elapsed = time.perf_counter() - start
    return {"name": "librosa", "device": "cpu", "clips_per_s": batches * batch_size / elapsed,
            "seconds": elapsed, "open_s": 0.0, "first_batch_s": first, "steps_per_epoch": None}


def warm_page_cache(cfg, split: str) -> float:
    """Read every tar once so no candidate pays (or skips) the cold-disk cost alone."""
    from asc_dist.data.manifest import load_split

    t0 = time.perf_counter()
    for s in load_split(cfg.data.shards, split).shards:
        with open(s.path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def run(args) -> int:
    from asc_dist import config as config_lib
    from asc_dist.data import dali_available

    overrides = [f"data.shards={args.shards}", f"data.num_threads={args.threads}", *args.config]
    cfg = config_lib.load(overrides, world_size=1)
    torch.set_num_threads(args.threads)  # the torch backend's main process gets the same threads
    f = cfg.features
    wanted = args.backends.split(",")
    candidates: list[tuple[str, torch.device]] = []
    for name in ("dali", "torch"):
        if name in wanted:
            if name == "dali" and not dali_available():
                log.warning("dali: not importable here, skipped")
                continue
            candidates.append((name, torch.device("cpu")))
            if torch.cuda.is_available() and not args.cpu_only:
                candidates.append((name, torch.device("cuda", 0)))
    warm = warm_page_cache(cfg, args.split)
    print(f"machine: {machine()}")
    print(f"shards: {args.shards}/{args.split}  batch {args.batch_size}  threads {args.threads}  "
          f"{args.batches} timed batches (+2 warm-up)  features {f.sample_rate} Hz, "
          f"{f.clip_seconds:g} s, n_fft {f.n_fft}, hop {f.hop_length}, {f.n_mels} mels, "
          f"{f.frames} frames  (page cache warmed in {warm:.1f} s)", flush=True)
    # Rounds interleave the candidates and the best round counts: on a shared machine other
    # load only ever slows a run down, so the best is the least disturbed measurement.
    runs: dict[tuple[str, str], list[dict]] = {}
    jobs = [(n, d) for n, d in candidates] + ([("librosa", torch.device("cpu"))] if "librosa" in wanted else [])
    for rnd in range(args.repeat):
        for name, device in jobs:
            if name == "librosa":
                r = time_librosa(cfg, args.split, args.batches, args.batch_size, args.threads)
            else:
                r = time_source(cfg, name, args.split, args.batches, args.batch_size, device)
            runs.setdefault((name, device.type), []).append(r)
            print(f"  [{rnd + 1}/{args.repeat}] {name:8s} {device.type:5s} {r['clips_per_s']:9.1f} clips/s"
                  f"   open {r['open_s']:.3f} s, first batch {r['first_batch_s']:.2f} s", flush=True)
    results = []
    print("best of rounds:" if args.repeat > 1 else "result:")
    for (name, dev), rs in runs.items():
        best = max(rs, key=lambda r: r["clips_per_s"])
        best = {**best, "all_clips_per_s": [round(r["clips_per_s"], 1) for r in rs]}
        results.append(best)
        print(f"  {name:8s} {dev:5s} {best['clips_per_s']:9.1f} clips/s")
    speed = {(r["name"], r["device"]): r["clips_per_s"] for r in results}
    print("ratios:")
    for dev in ("cpu", "cuda"):
        for a, b in (("dali", "torch"), ("dali", "librosa"), ("torch", "librosa")):
            if (a, dev) in speed and (b, "cpu" if b == "librosa" else dev) in speed:
                base = speed[(b, "cpu" if b == "librosa" else dev)]
                print(f"  {a} {dev} / {b} {'cpu' if b == 'librosa' else dev}: {speed[(a, dev)] / base:.2f}x")
    if args.json:
        record = {"machine": machine(), "argv": sys.argv[1:], "results": results,
                  "threads": args.threads, "batch_size": args.batch_size}
        atomic.write_text(args.json, json.dumps(record, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="input pipeline throughput: dali vs torch vs librosa",
                       description="clips/s from shards to log-mel batches on the device.")
    add_stream_args(p, backends="dali,torch,librosa", repeat=1,
                    batches_help="timed batches per candidate")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU paths even with CUDA")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("config", nargs="*", help="config overrides (key=value) or YAML files")
    p.set_defaults(func=run)
