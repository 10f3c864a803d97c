"""The paper's Table I (Ye et al.): run the four ablation rows and tabulate ours beside theirs.

    python -m asc_dist.table1 run [--nproc N] [--shards DIR] [--reduced | --synthetic]
                                  [--runs-root runs] [--out table1.md] [yaml ...] [key=value ...]
    python -m asc_dist.table1 collect --runs RUN_DIR... [--out table1.md]

``run`` trains conf/experiment/{baseline,nll,focal,focal_mixup}.yaml one after another with
torchrun (a plain process for ``--nproc 1``), on the same shards and seed (run dirs ``<runs-root>/table1-<row>``), then collects.
Extra YAML files are merged before the experiment file (e.g. conf/data/tut2018.yaml), key=value
overrides after it. A finished run is not trained again (``resume=auto``; ``--fresh`` restarts
them), so an interrupted sweep continues where it stopped. ``--reduced`` is the CPU-sized
variant (see REDUCED); ``--synthetic`` also makes synthetic TUT-layout data and packs it first.

``collect`` reads each run's ``eval/report.json`` (the final evaluation the trainer writes),
``config.yaml`` (which row it is: model, loss, mixup) and the newest checkpoint's W&B run id,
and writes ``table1.md`` (and ``table1.json``) with the paper's class-wise accuracy beside ours.
The SLURM variant (slurm/table1.sh) trains the same rows and calls ``collect``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asc_dist import atomic, torchrun
from asc_dist.config import conf_dir


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    paper: float
    experiment: str  # conf/experiment/<experiment>.yaml
    run_name: str


ROWS = (
    Row("baseline", "DCASE 2018 baseline CNN", 0.625, "baseline", "table1-baseline"),
    Row("nll", "ResNet-50 + NLL", 0.725, "nll", "table1-nll"),
    Row("focal", "ResNet-50 + focal loss", 0.733, "focal", "table1-focal"),
    Row("focal_mixup", "ResNet-50 + focal loss + mixup", 0.747, "focal_mixup", "table1-focal-mixup"),
)
PAPER_ONLY = "The paper's SE-ResNet row (0.725) has no counterpart here (no squeeze-excitation model)."
# CPU-sized sweep for the synthetic data: the paper's front end on 2 s clips (as conf/demo.yaml),
# no ImageNet weights, 100 iterations with the paper's 25 lr decays scaled down.
REDUCED = (
    "model.pretrained=none", "features.clip_seconds=2.0", "features.frames=64",
    "train.max_iters=100", "train.global_batch=32", "train.eval_every=100", "train.ckpt_every=100",
    "train.log_every=10", "optim.decay_every=4", "data.num_threads=1",
)
# Runs must agree on these to be one ablation.
SHARED_KEYS = ("data.shards", "data.train_split", "data.test_split", "train.seed", "train.max_iters",
               "train.global_batch", "features")
TUT2018_FOLD1_TEST = 2518


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def row_of(cfg: dict) -> str | None:
    """Which Table I row a run's config is: by model, loss and mixup (None: not a Table I row)."""
    model, loss, mixup = _get(cfg, "model.name"), _get(cfg, "loss.name"), bool(_get(cfg, "mixup.enabled"))
    if model == "dcase_baseline":
        return "baseline"
    if loss == "ce" and not mixup:
        return "nll"
    if loss == "focal":
        return "focal_mixup" if mixup else "focal"
    return None


# ---------------------------------------------------------------------------------------------
# collect


def _wandb(run_dir: Path, cfg: dict) -> dict:
    """W&B run id from the newest checkpoint, and a link where one can be built."""
    import torch

    from asc_dist.checkpoint import Checkpointer

    mode = _get(cfg, "wandb.mode") or "disabled"
    out = {"mode": mode, "id": None, "url": None, "project": _get(cfg, "wandb.project")}
    latest = Checkpointer(run_dir).latest()
    if latest is not None:
        try:  # mmap: only the pickle is read, not the weights
            out["id"] = torch.load(latest, map_location="cpu", weights_only=True, mmap=True).get("wandb_id")
        except Exception as e:  # noqa: BLE001 - a link is a nicety; latest() already vetted the file
            print(f"warning: cannot read the W&B run id from {latest}: {e}", file=sys.stderr)
    entity = _get(cfg, "wandb.entity") or os.environ.get("WANDB_ENTITY")
    if out["id"] and mode == "online" and entity:
        out["url"] = f"https://wandb.ai/{entity}/{out['project']}/runs/{out['id']}"
    return out


def read_run(run_dir: str | Path) -> dict:
    """One run's Table I facts; ``problem`` says what is missing, if anything."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    rec: dict[str, Any] = {"run_dir": str(run_dir), "problem": None, "report": None}
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        rec["problem"] = f"no config.yaml in {run_dir} (not a run dir?)"
        return rec
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    rec.update(
        name=cfg.get("name"), row=row_of(cfg), model=_get(cfg, "model.name"),
        pretrained=_get(cfg, "model.pretrained"), loss=_get(cfg, "loss.name"),
        mixup=bool(_get(cfg, "mixup.enabled")), max_iters=_get(cfg, "train.max_iters"),
        shared={k: _get(cfg, k) for k in SHARED_KEYS}, wandb=_wandb(run_dir, cfg),
    )
    report_path = run_dir / "eval" / "report.json"
    if not report_path.is_file():
        rec["problem"] = f"no {report_path} (run not finished?)"
        return rec
    try:
        report = json.loads(report_path.read_text())
        rec["report"] = {k: report[k] for k in ("step", "classwise_accuracy", "accuracy", "count")}
        rec["report"]["log_loss"] = report.get("log_loss")
    except (ValueError, KeyError) as e:
        rec["problem"] = f"{report_path}: unreadable report ({type(e).__name__}: {e})"
        return rec
    if rec["max_iters"] is not None and rec["report"]["step"] < rec["max_iters"]:
        rec["problem"] = f"report is from step {rec['report']['step']} of {rec['max_iters']}"
    return rec


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run dirs as given; a folder of run dirs (e.g. runs/) stands for its table1-* runs."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file() or not p.is_dir():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "config.yaml").is_file() and d.name.startswith("table1-"))
        out.extend(subs or [p])
    return out


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _wandb_cell(w: dict | None, run_dir: str) -> str:
    if not w or not w.get("id"):
        return "—"
    if w.get("url"):
        return f"[{w['id']}]({w['url']})"
    if w.get("mode") == "offline":
        return f"`{w['id']}` (offline: `wandb sync {run_dir}/wandb/offline-run-*`)"
    return f"`{w['id']}` (project {w.get('project')})"


def render(runs: list[dict]) -> tuple[str, list[dict]]:
    """table1.md text and the rows as data (paper rows first, then any other runs)."""
    by_row: dict[str, dict] = {}
    others: list[dict] = []
    for r in runs:
        if r.get("row") in {x.key for x in ROWS} and r["row"] not in by_row:
            by_row[r["row"]] = r
        else:
            others.append(r)
    lines = [
        "# Table I: Ye et al. ablation, paper vs. this reproduction",
        "",
        ("Class-wise accuracy = mean over scene classes of per-class accuracy, on the held-out split, "
         "from each run's final evaluation (`eval/report.json`)."),
        "",
        ("| Table I row | paper | ours: class-wise acc. | Δ vs. paper | ours: accuracy | model | loss | "
         "mixup | iterations | test clips | run | W&B |"),
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|---|---|",
    ]
    rows_out: list[dict] = []

    def line(label: str, paper: float | None, r: dict | None) -> None:
        rep = (r or {}).get("report") or {}
        ours = rep.get("classwise_accuracy")
        delta = "—" if ours is None or paper is None else f"{ours - paper:+.3f}"
        if r is None:
            lines.append(f"| {label} | {_fmt(paper)} | not run | — | — | — | — | — | — | — | — | — |")
        else:
            status = _fmt(ours) if r.get("problem") is None else f"{_fmt(ours)} ⚠ {r['problem']}"
            lines.append(
                f"| {label} | {_fmt(paper)} | {status} | {delta} | {_fmt(rep.get('accuracy'))} | "
                f"{r.get('model', '—')} | {r.get('loss', '—')} | {'yes' if r.get('mixup') else 'no'} | "
                f"{rep.get('step', '—')} | {rep.get('count', '—')} | `{r['run_dir']}` | "
                f"{_wandb_cell(r.get('wandb'), r['run_dir'])} |")
        rows_out.append({"row": label, "paper": paper, "ours": ours, "accuracy": rep.get("accuracy"),
                         "run": r})

    for row in ROWS:
        line(row.label, row.paper, by_row.get(row.key))
    for r in others:
        line(f"other: {r.get('name') or r['run_dir']}", None, r)
    lines += ["", PAPER_ONLY, ""]

    done = [r for r in by_row.values() if r.get("report")]
    counts = {r["report"]["count"] for r in done}
    if counts == {TUT2018_FOLD1_TEST}:
        lines.append(f"Data: TUT Urban Acoustic Scenes 2018 fold 1 test split ({TUT2018_FOLD1_TEST} "
                     f"clips), as in the paper.")
    elif counts:
        lines.append(f"Data: {', '.join(map(str, sorted(counts)))} test clips, not the TUT 2018 fold 1 "
                     f"test split ({TUT2018_FOLD1_TEST} clips): a check of the pipeline, not a "
                     f"reproduction of the paper's numbers.")
    present = [r for r in by_row.values() if r.get("shared")]
    for key in SHARED_KEYS:
        values = {json.dumps(r["shared"][key], sort_keys=True) for r in present}
        if len(values) > 1:
            lines.append(f"⚠ The runs differ in `{key}`: the rows are not one controlled ablation.")
    if present and all(len({json.dumps(r['shared'][k], sort_keys=True) for r in present}) == 1
                       for k in SHARED_KEYS):
        s = present[0]["shared"]
        lines.append(f"All rows: shards `{s['data.shards']}`, seed {s['train.seed']}, "
                     f"{s['train.max_iters']} iterations, global batch {s['train.global_batch']}.")
    pretrained = {r["run_dir"]: r.get("pretrained") for r in present if r.get("row") != "baseline"}
    if any(p != "imagenet" for p in pretrained.values()):
        lines.append("Note: the paper's ResNet-50 rows start from ImageNet weights; here "
                     + ", ".join(f"`{Path(k).name}` used pretrained={v}" for k, v in pretrained.items())
                     + ".")
    return "\n".join(lines) + "\n", rows_out


def collect(run_dirs: list[str | Path], out: str | Path) -> tuple[str, list[dict]]:
    """Write ``out`` (markdown) and ``out`` with .json; returns (markdown, rows)."""
    runs = [read_run(d) for d in expand_run_dirs(run_dirs)]
    text, rows = render(runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, text)
    atomic.write_text(out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    return text, rows


# ---------------------------------------------------------------------------------------------
# run


def make_synthetic(shards: Path, data: Path, *, clips_per_class: int = 48, seed: int = 0) -> None:
    """Synthetic TUT-layout scenes (2 s, 48 kHz) packed into ``shards``, unless already there."""
    from asc_dist import pack, synth

    if (shards / "train" / "manifest.json").is_file():
        return
    if not (data / "meta.csv").is_file():
        synth.generate(data, clips_per_class=clips_per_class, duration=2.0, sample_rate=48000,
                       seed=seed, workers=2, overwrite=True)
    pack.pack(data, shards, workers=2, seed=seed, overwrite=True)


def commands(args: argparse.Namespace) -> list[tuple[Row, list[str]]]:
    yamls = [a for a in args.config if "=" not in a]
    overrides = [a for a in args.config if "=" in a]
    reduced = list(REDUCED) if args.reduced or args.synthetic else []
    fixed = [f"train.seed={args.seed}"] + ([f"data.shards={args.shards}"] if args.shards else [])
    fixed += ["resume=never"] if args.fresh else []
    only = set(args.only.split(",")) if args.only else None
    out = []
    for row in ROWS:
        if only is not None and row.key not in only:
            continue
        exp = conf_dir() / "experiment" / f"{row.experiment}.yaml"
        if exp.is_relative_to(Path.cwd()):
            exp = exp.relative_to(Path.cwd())
        cmd = torchrun.command([*yamls, str(exp), *reduced, f"name={row.run_name}",
                                f"run_dir={Path(args.runs_root) / row.run_name}", *fixed, *overrides],
                               nproc=args.nproc)
        out.append((row, cmd))
    return out


def run(args: argparse.Namespace) -> int:
    if args.synthetic:
        args.shards = args.shards or "shards/table1-synth"
        if not args.dry_run:
            make_synthetic(Path(args.shards), Path(args.synthetic_data))
    plan = commands(args)
    if args.dry_run:
        for _, cmd in plan:
            print(" ".join(cmd))
        return 0
    env = dict(os.environ)
    status = 0
    for i, (row, cmd) in enumerate(plan, 1):
        print(f"[table1 {i}/{len(plan)}] {row.label}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, env=env, check=False).returncode
        if rc != 0:
            # 3: stopped by a signal with a checkpoint written; rerunning the sweep resumes it.
            print(f"[table1] {row.run_name} exited with {rc}; stopping the sweep (rerun to continue)",
                  file=sys.stderr, flush=True)
            status = rc
            break
    run_dirs = [Path(args.runs_root) / row.run_name for row, _ in plan]
    text, rows = collect(run_dirs, args.out)
    print(text)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return status or (0 if all(r["ours"] is not None for r in rows if r["run"]) else 1)


USAGE = """usage: python -m asc_dist.table1 {run,collect} [-h] ...

Reproduce Ye et al.'s Table I and tabulate it.
  run       train the four rows sequentially with torchrun, then collect
  collect   tabulate finished runs into table1.md (+ table1.json)
"""


def collect_parser() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(prog="python -m asc_dist.table1 collect",
                                description="Tabulate finished runs into table1.md (+ table1.json).")
    c.add_argument("--runs", nargs="+", required=True,
                   help="run dirs (or a folder holding table1-* run dirs, e.g. runs/)")
    c.add_argument("--out", default="table1.md")
    return c


def run_parser() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(prog="python -m asc_dist.table1 run",
                                description="Train the four Table I rows sequentially with torchrun "
                                            "(same shards and seed), then collect.")
    r.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run (default 1)")
    r.add_argument("--shards", default=None, help="data.shards for every run (default: the config's)")
    r.add_argument("--runs-root", default="runs", help="run dirs go to RUNS_ROOT/table1-<row>")
    r.add_argument("--out", default=None, help="table path (default: RUNS_ROOT/table1.md)")
    r.add_argument("--seed", type=int, default=0, help="train.seed, the same for every row")
    r.add_argument("--reduced", action="store_true",
                   help="CPU-sized runs: " + " ".join(REDUCED))
    r.add_argument("--synthetic", action="store_true",
                   help="make and pack synthetic scenes first (into --shards, default "
                        "shards/table1-synth); implies --reduced")
    r.add_argument("--synthetic-data", default="data/table1-synth",
                   help="where the synthetic dataset is written (default data/table1-synth)")
    r.add_argument("--fresh", action="store_true", help="retrain finished runs (resume=never)")
    r.add_argument("--only", default=None,
                   help="comma-separated rows to run: " + ",".join(x.key for x in ROWS))
    r.add_argument("--dry-run", action="store_true", help="print the training commands only")
    r.add_argument("config", nargs="*", metavar="yaml|key=value",
                   help="YAML files (merged before each experiment file) and overrides (after)")
    return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("run", "collect"):
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "collect":
        args = collect_parser().parse_args(argv[1:])
        text, rows = collect(args.runs, args.out)
        print(text)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
        missing = [r["row"] for r in rows if r["run"] is None or r["run"].get("problem")]
        if missing:
            print(f"incomplete rows: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    p = run_parser()
    args = p.parse_intermixed_args(argv[1:])
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    if args.only and not set(args.only.split(",")) <= {x.key for x in ROWS}:
        p.error(f"--only: rows are {','.join(x.key for x in ROWS)}")
    args.out = args.out or str(Path(args.runs_root) / "table1.md")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
