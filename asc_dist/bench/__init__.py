"""Benchmarks, one subcommand each (results and their commands: BENCHMARKS.md)::

    python -m asc_dist.bench data --shards DIR [...]   input pipeline: DALI vs torch vs librosa
    python -m asc_dist.bench train --shards DIR [...]  the real trainer: clips/s, data wait,
                                                       DDP scaling, cached vs streamed features
    python -m asc_dist.bench gpu OUT_DIR [...]         a GPU node end to end (launch/gpu_check.sh)
    python -m asc_dist.bench integrity --shards DIR    the cost of the shard-integrity check
    python -m asc_dist.bench distill OUT_DIR [...]     teacher -> student without/with KD (synthetic)
    python -m asc_dist.bench devices OUT_DIR [...]     general model -> device set -> routed evaluation

To add a subcommand: a module here with ``add_parser(subparsers)`` registering its arguments and
``set_defaults(func=run)``, listed in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from asc_dist.cli import command


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}"


def synthetic_shards(data: Path, clips_per_class: int, devices: list[str] | None = None,
                     unseen: list[str] | None = None) -> Path:
    """1-s synthetic scenes at 32 kHz (the DCASE front end's rate; recorded by ``devices``, and
    ``unseen`` in the test split only, when given), packed once into DATA/shards."""
    import logging

    from asc_dist import pack, synth

    shards = data / "shards"
    if not (shards / "train" / "manifest.json").is_file():
        devices, unseen = list(devices or []), list(unseen or [])
        recorded = f" recorded by {', '.join(devices + unseen)}" if devices else ""
        logging.getLogger(__name__).info(
            f"synthesising {clips_per_class} 1-s clips per class at 32 kHz{recorded} -> {data}")
        synth.generate(data / "dataset", clips_per_class=clips_per_class, duration=1.0,
                       sample_rate=32000, channels=1, seed=0, progress=False, overwrite=True,
                       devices=devices, unseen_devices=unseen)
        pack.pack(data / "dataset", shards, sample_rate=32000, seed=0, progress=False,
                  verbose=False, overwrite=True)
    return shards


def write_results(out: Path, results: dict, summary: str) -> int:
    """A pipeline check's OUT/results.json and OUT/summary.md (atomic); the summary printed."""
    import json

    from asc_dist import atomic

    atomic.write_text(out / "results.json", json.dumps(results, indent=2))
    atomic.write_text(out / "summary.md", summary)
    print(summary)
    return 0


def with_values(cfg, values: dict):
    """A copy of a read-only config with dotted keys replaced."""
    from omegaconf import OmegaConf

    from asc_dist import config as config_lib

    return config_lib.from_dict(OmegaConf.merge(cfg, OmegaConf.from_dotlist(
        [f"{k}={v}" for k, v in values.items()])))


def add_stream_args(p: argparse.ArgumentParser, *, backends: str, repeat: int, batches_help: str) -> None:
    """The options every streaming benchmark (data, integrity) takes, alike."""
    p.add_argument("--shards", required=True, help="root holding <split>/manifest.json")
    p.add_argument("--split", default="train")
    p.add_argument("--batches", type=int, default=20, help=batches_help)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backends", default=backends, help="comma list to run")
    p.add_argument("--repeat", type=int, default=repeat, help="rounds; the best round is reported")


def build_parser() -> argparse.ArgumentParser:
    from asc_dist.bench import data, devices, distill, gpu, integrity, train

    parser = argparse.ArgumentParser(prog="python -m asc_dist.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, train, gpu, integrity, distill, devices):
        module.add_parser(sub)
    return parser


@command("asc_dist.bench")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args + re-adding the leftovers lets overrides sit anywhere between options
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.config = [*args.config, *extra]
    return args.func(args)
