"""``table1 run`` and ``table1 plan``: every (row, seed) training of the sweep.

Each training is ``python -m asc_dist.train`` (torchrun for ``--nproc`` > 1, asc_dist.torchrun)
with the user's YAML files, the row's ``conf/experiment/<row>.yaml``, the reduced settings, then
``name``/``run_dir``/``train.seed``/``data.shards`` and the user's overrides; run dirs are
``<runs-root>/table1-<row>-seed<k>``. Rerunning skips finished runs and resumes interrupted ones
(the trainer's ``resume=auto``). ``--parallel K`` runs K trainings at once (small runs do not
fill a big GPU; on CPUs they share the cores). ``plan`` prints the same trainings for a job
scheduler (slurm/table1.sh) instead of running them.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from asc_dist import config as config_lib
from asc_dist import torchrun
from asc_dist.table1 import BY_KEY, ROWS, Row, run_name

log = logging.getLogger(__name__)

# CPU-sized sweep for synthetic data: the paper's front end on 2 s clips (as conf/demo.yaml), no
# ImageNet weights, 100 iterations with the paper's 25 lr decays scaled down.
REDUCED = (
    "model.pretrained=none", "features.clip_seconds=2.0", "features.frames=64",
    "train.max_iters=100", "train.global_batch=32", "train.eval_every=100", "train.ckpt_every=100",
    "train.log_every=10", "optim.decay_every=4", "data.num_threads=1",
)


@dataclass(frozen=True)
class Job:
    row: Row
    seed: int
    name: str
    run_dir: Path
    args: tuple[str, ...]  # the trainer's arguments


def experiment_file(row: Row) -> str:
    path = config_lib.conf_dir() / "experiment" / f"{row.experiment}.yaml"
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def jobs(args: argparse.Namespace) -> list[Job]:
    yamls = [a for a in args.config if "=" not in a]
    overrides = [a for a in args.config if "=" in a]
    reduced = args.reduced or getattr(args, "synthetic", False)
    out = []
    for row in ROWS:
        if args.only and row.key not in args.only:
            continue
        for seed in args.seeds:
            name = run_name(row, seed)
            run_dir = Path(args.runs_root) / name
            # W&B draws a row's seeds as one group (its spread), each run a "row" job
            fixed = [f"name={name}", f"run_dir={run_dir}", f"train.seed={seed}",
                     f"wandb.group=table1-{row.key}", "wandb.job_type=row"]
            fixed += [f"data.shards={args.shards}"] if args.shards else []
            fixed += ["resume=never"] if getattr(args, "fresh", False) else []
            extra = [*REDUCED, *row.reduced] if reduced else []
            out.append(Job(row, seed, name, run_dir,
                           (*yamls, experiment_file(row), *extra, *fixed, *overrides)))
    return out


def finished(job: Job) -> bool:
    """The run's final report exists (the trainer writes it at train.max_iters)."""
    import json

    report = job.run_dir / "eval" / "report.json"
    try:
        step = json.loads(report.read_text())["step"]
        return step >= config_lib.load(list(job.args), world_size=1).train.max_iters
    except (OSError, ValueError, KeyError):
        return False


def make_synthetic(shards: Path, data: Path, *, clips_per_class: int = 48, seed: int = 0) -> None:
    """Synthetic TUT-layout scenes (2 s, 48 kHz) packed into ``shards``, unless already there."""
    from asc_dist import pack, synth

    if (shards / "train" / "manifest.json").is_file():
        return
    if not (data / "meta.csv").is_file():
        synth.generate(data, clips_per_class=clips_per_class, duration=2.0, sample_rate=48000,
                       seed=seed, workers=2, overwrite=True)
    pack.pack(data, shards, workers=2, seed=seed, overwrite=True)


def _launch(job: Job, nproc: int, parallel: int) -> subprocess.Popen:
    cmd = torchrun.command(list(job.args), nproc=nproc)
    env = dict(os.environ)
    if parallel > 1:  # K trainings share the CPUs: each gets its part, and its own log file
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (parallel * nproc))))
        log_file = job.run_dir.parent / "logs" / f"{job.name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "a")  # noqa: SIM115 - the child owns it; closed when it is reaped
        log.info(f"[table1] {job.name}: started, log {log_file}")
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    log.info(f"[table1] {job.name}: {' '.join(cmd)}")
    return subprocess.Popen(cmd, env=env)


def train_all(todo: list[Job], nproc: int, parallel: int) -> int:
    """Run the jobs, at most ``parallel`` at a time; after a failure start no new one."""
    running: dict[subprocess.Popen, Job] = {}
    status, queue = 0, list(todo)
    while queue or running:
        while queue and len(running) < parallel and status == 0:
            job = queue.pop(0)
            running[_launch(job, nproc, parallel)] = job
        if not running:
            break
        done = [p for p in running if p.poll() is not None]
        if not done:
            time.sleep(0.5)
            continue
        for p in done:
            job = running.pop(p)
            if p.stdout is not None:
                p.stdout.close()
            if p.returncode != 0:
                # 3: stopped by a signal with a checkpoint written; rerunning the sweep resumes it.
                log.error(f"[table1] {job.name} exited with {p.returncode}; no new trainings "
                          f"start (rerun the sweep to continue)")
                status = status or p.returncode
            else:
                log.info(f"[table1] {job.name}: finished")
    return status


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of train.seed values (default 0-4)")
    p.add_argument("--only", default=None, help="comma list of rows: " + ",".join(BY_KEY))
    p.add_argument("--runs-root", default="runs", help="run dirs: RUNS_ROOT/table1-<row>-seed<k>")
    p.add_argument("--shards", default=None, help="data.shards for every run (default: the config's)")
    p.add_argument("--reduced", action="store_true", help="CPU-sized runs: " + " ".join(REDUCED))
    p.add_argument("config", nargs="*", metavar="yaml|key=value",
                   help="YAML files (merged before each experiment file) and overrides (after)")


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_intermixed_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected a comma list of integers")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if args.only:
        args.only = args.only.split(",")
        if unknown := sorted(set(args.only) - set(BY_KEY)):
            p.error(f"--only {','.join(unknown)}: rows are {','.join(BY_KEY)}")
    return args


def run_parser() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(prog="python -m asc_dist.table1 run",
                                description="Train every Table I row with every seed on the same "
                                            "shards (skipping finished runs), then collect.")
    _common(r)
    r.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per training (default 1)")
    r.add_argument("--parallel", type=int, default=1,
                   help="trainings at once (default 1); each logs to RUNS_ROOT/logs/<run>.log")
    r.add_argument("--out", default=None, help="table path (default: RUNS_ROOT/table1.md)")
    r.add_argument("--synthetic", action="store_true",
                   help="make and pack synthetic scenes first (into --shards, default "
                        "shards/table1-synth); implies --reduced")
    r.add_argument("--synthetic-data", default="data/table1-synth",
                   help="where the synthetic dataset is written (default data/table1-synth)")
    r.add_argument("--fresh", action="store_true", help="retrain finished runs (resume=never)")
    r.add_argument("--dry-run", action="store_true", help="print the training commands only")
    return r


def main(argv: list[str]) -> int:
    from asc_dist.table1.collect import collect_and_print

    p = run_parser()
    args = _parse(p, argv)
    if args.nproc < 1 or args.parallel < 1:
        p.error("--nproc and --parallel must be >= 1")
    if args.synthetic:
        args.shards = args.shards or "shards/table1-synth"
    todo = jobs(args)
    if args.dry_run:
        for job in todo:
            print(" ".join(torchrun.command(list(job.args), nproc=args.nproc)))
        return 0
    if args.synthetic:
        make_synthetic(Path(args.shards), Path(args.synthetic_data))
    done = [j for j in todo if not args.fresh and finished(j)]
    if done:
        log.info(f"[table1] skipping {len(done)} finished run(s): {', '.join(j.name for j in done)}")
    t0 = time.perf_counter()
    status = train_all([j for j in todo if j not in done], args.nproc, args.parallel)
    log.info(f"[table1] trainings took {time.perf_counter() - t0:.0f} s")
    out = args.out or str(Path(args.runs_root) / "table1.md")
    complete = collect_and_print([j.run_dir for j in todo], out)
    return status or (0 if complete else 1)


def plan_main(argv: list[str]) -> int:
    """One line per training: name, run dir, then the trainer's arguments, tab-separated."""
    p = argparse.ArgumentParser(prog="python -m asc_dist.table1 plan",
                                description="Print the (row, seed) trainings of the sweep, one "
                                            "tab-separated line each: name, run dir, arguments.")
    _common(p)
    for job in jobs(_parse(p, argv)):
        print("\t".join([job.name, str(job.run_dir), *job.args]))
    return 0
