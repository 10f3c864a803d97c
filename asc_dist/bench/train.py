"""``bench train``: the real trainer under torchrun, per variant and process count.

clips/s, step time and data-wait fraction from the trainer's own metrics.jsonl (the mean over
the logged windows after the warm-up), DDP scaling with the per-rank batch held fixed (weak
scaling). The default variants put the feature cache (``data.cache=device``) beside streaming
(``data.cache=none``), measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asc_dist import atomic, torchrun
from asc_dist.bench import machine


def run_trainer(nproc: int, overrides: list[str], run_dir: Path, timeout: float | None) -> tuple[list[dict], float]:
    """Run ``asc_dist.train`` with ``nproc`` processes; its metrics.jsonl and wall seconds."""
    from asc_dist.tracking import read_metrics

    cmd = torchrun.command([*overrides, f"run_dir={run_dir}", "resume=never"], nproc=nproc)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        if p.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"trainer failed (exit {p.returncode}): {' '.join(cmd)}\n{log.read()[-3000:]}")
    return read_metrics(run_dir / "metrics.jsonl"), time.perf_counter() - t0


def summarize_train(records: list[dict], warmup: int) -> dict:
    """Mean over the logged intervals after the warm-up steps."""
    rows = [r for r in records if "train/clips_per_s" in r and r["step"] > warmup]
    if not rows:
        raise RuntimeError(f"no training intervals logged after step {warmup}: raise --steps")
    mean = lambda k: sum(r[f"train/{k}"] for r in rows) / len(rows)  # noqa: E731
    out = {"clips_per_s": mean("clips_per_s"), "step_time": mean("step_time"),
           "data_wait_frac": mean("data_wait_frac"), "intervals": len(rows)}
    if "train/peak_mem_gb" in rows[-1]:
        out["peak_mem_gb"] = max(r["train/peak_mem_gb"] for r in rows)
    return out


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    return [(v.split(":", 1)[0], [o for o in v.split(":", 1)[1].split(",") if o])
            for v in spec.split(";") if v]


def run(args) -> int:
    from asc_dist import config as config_lib

    base = [*args.config, f"data.shards={args.shards}", "wandb.mode=disabled",
            f"train.log_every={args.log_every}", f"train.max_iters={args.warmup + args.steps}",
            f"train.ckpt_every={10**9}", f"train.eval_every={10**9}"]
    variants = parse_variants(args.variants)
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="asc-bench-") as tmp:
        for name, extra in variants:
            for nproc in [int(n) for n in args.nproc.split(",")]:
                overrides = [*base, f"train.global_batch={args.batch_per_rank * nproc}", *extra]
                config_lib.load(overrides, world_size=nproc)  # a bad key fails here, named
                run_dir = Path(tmp) / f"{name}-{nproc}"
                records, wall = run_trainer(nproc, overrides, run_dir, args.timeout)
                r = summarize_train(records, args.warmup)
                r.update(variant=name, nproc=nproc, per_proc=r["clips_per_s"] / nproc, wall_s=wall)
                results.append(r)
                print(f"  {name:12s} nproc {nproc}: {r['clips_per_s']:8.1f} clips/s "
                      f"({r['per_proc']:.1f}/process), step {r['step_time'] * 1000:.0f} ms, "
                      f"data wait {100 * r['data_wait_frac']:.1f}%, whole run {wall:.1f} s", flush=True)
    for name, _ in variants:
        rows = {r["nproc"]: r for r in results if r["variant"] == name}
        if 1 in rows:
            for n, r in sorted(rows.items()):
                if n > 1:
                    eff = r["clips_per_s"] / (n * rows[1]["clips_per_s"])
                    print(f"scaling {name}: {n} processes = {eff * 100:.0f}% of {n}x one process")
    if args.json:
        atomic.write_text(args.json, json.dumps({"machine": machine(), "argv": sys.argv[1:], "results": results},
                                                indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="training throughput: clips/s, step time, data wait, DDP scaling",
                       description="Runs the real trainer (torchrun) for --warmup + --steps iterations per "
                                   "variant and process count; the per-rank batch is held fixed (weak scaling).")
    p.add_argument("--shards", required=True, help="root holding <split>/manifest.json")
    p.add_argument("--steps", type=int, default=20, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--log-every", type=int, default=5, help="logging interval = averaging window")
    p.add_argument("--nproc", default="1,2", help="comma list of process counts")
    p.add_argument("--batch-per-rank", type=int, default=8)
    p.add_argument("--variants", default="cached:data.cache=device;streamed:data.cache=none",
                   help="'name:key=v,key=v;name2:...' (default: the feature cache beside streaming)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per trainer run")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("config", nargs="*", help="config YAML files / key=value overrides for every run")
    p.set_defaults(func=run)
