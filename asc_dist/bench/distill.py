"""A distillation pipeline check on synthetic 1-s scenes::

    python -m asc_dist.bench distill OUT_DIR [--seeds 0,1,2] [--clips-per-class 24]
        [--teacher-model resnet18] [--teacher-iters 150] [--student-iters 200] [key=value ...]

Synthesises 1-s scenes (asc_dist.synth) at 32 kHz, packs them, trains one teacher
(``--teacher-model`` from scratch, on the DCASE 2024 front end), computes its logits over the
training split once, then trains the DCASE 2024 baseline student (cp_mobile,
conf/experiment/dcase2024_baseline.yaml, shortened to ``--student-iters``) without and with
distillation (conf/experiment/dcase2024_kd.yaml) for every seed, and reports both arms with the
Table I statistics: mean and t-interval over seeds, and the paired bootstrap difference
(asc_dist.table1.stats). Writes OUT_DIR/results.json and OUT_DIR/summary.md; trailing
``key=value`` overrides go to every run. On synthetic data this checks the pipeline, not the
method: the numbers say nothing about TAU 2022.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from asc_dist import atomic
from asc_dist.bench import machine

log = logging.getLogger(__name__)

DATA = "conf/data/tau2022.yaml"
STUDENT = "conf/experiment/dcase2024_baseline.yaml"
KD = "conf/experiment/dcase2024_kd.yaml"


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="teacher -> cp_mobile student without/with KD, on synthetic 1-s scenes",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output dir (runs/, data/, results.json, summary.md)")
    p.add_argument("--seeds", default="0,1,2", help="student seeds (comma-separated)")
    p.add_argument("--clips-per-class", type=int, default=24)
    p.add_argument("--teacher-model", default="resnet18")
    p.add_argument("--teacher-iters", type=int, default=150)
    p.add_argument("--student-iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="global batch of every run")
    p.add_argument("config", nargs="*", help="key=value overrides for every run")
    p.set_defaults(func=run)


def warmup(iters: int) -> int:
    """A tenth of the run, and always shorter than it (the cosine must decay)."""
    return min(max(1, iters // 10), iters - 1)


def _train(args: list[str]) -> float:
    from asc_dist import train
    from asc_dist.errors import UserError

    start = time.perf_counter()
    if train.main(args) != 0:
        raise UserError(f"training failed: python -m asc_dist.train {' '.join(args)}")
    return time.perf_counter() - start


def _predictions(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    from asc_dist.validate import read_predictions

    classes, rows = read_predictions(run_dir / "eval" / "predictions.tsv")
    keys = sorted(rows)
    labels = np.array([rows[k][0] for k in keys])
    preds = np.array([int(np.argmax(rows[k][1])) for k in keys])
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    return classes, labels, preds, float(report["classwise_accuracy"])


def run(args: argparse.Namespace) -> int:
    from asc_dist import pack, synth
    from asc_dist.table1.stats import mean_ci, paired_bootstrap

    out: Path = args.out
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    data, runs = out / "data", out / "runs"
    shards = data / "shards"
    if not (shards / "train" / "manifest.json").is_file():
        log.info(f"synthesising {args.clips_per_class} 1-s clips per class at 32 kHz -> {data}")
        synth.generate(data / "dataset", clips_per_class=args.clips_per_class, duration=1.0,
                       sample_rate=32000, channels=1, seed=0, progress=False, overwrite=True)
        pack.pack(data / "dataset", shards, sample_rate=32000, seed=0, progress=False,
                  verbose=False, overwrite=True)
    common = [f"data.shards={shards}", "resume=never", "wandb.mode=disabled",
              f"train.global_batch={args.batch}", "train.epochs=0", *args.config]
    timing = {}
    teacher = runs / "teacher"
    timing["teacher"] = _train([DATA, f"run_dir={teacher}", f"model.name={args.teacher_model}",
                                "model.pretrained=none", "loss.name=ce", "augment.mixup.enabled=false",
                                "optim.name=adamw", "optim.schedule=cosine",
                                f"optim.warmup_iters={warmup(args.teacher_iters)}",
                                f"train.max_iters={args.teacher_iters}",
                                f"train.eval_every={args.teacher_iters}", "wandb.job_type=teacher",
                                *common])
    student = [DATA, STUDENT, f"train.max_iters={args.student_iters}",
               f"optim.warmup_iters={warmup(args.student_iters)}",
               f"train.eval_every={args.student_iters}", f"train.ckpt_every={args.student_iters}"]
    arms = {"student": [], "student_kd": [KD, f"distill.teachers=[{teacher}]"]}
    results: dict = {"machine": machine(), "seeds": seeds, "clips_per_class": args.clips_per_class,
                     "teacher_model": args.teacher_model, "teacher_iters": args.teacher_iters,
                     "student_iters": args.student_iters, "batch": args.batch, "arms": {}}
    per_arm: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    classes: list[str] = []
    for arm, extra in arms.items():
        per_arm[arm], accs = {}, []
        for seed in seeds:
            run_dir = runs / f"{arm}-seed{seed}"
            timing[run_dir.name] = _train([*student, *extra, f"run_dir={run_dir}",
                                           f"train.seed={seed}", *common])
            classes, labels, preds, acc = _predictions(run_dir)
            per_arm[arm][seed] = (labels, preds)
            accs.append(acc)
        results["arms"][arm] = {"accuracy": accs, **mean_ci(accs)}
    results["teacher"] = {"classwise_accuracy": _predictions(teacher)[3]}
    results["difference"] = paired_bootstrap(per_arm["student"], per_arm["student_kd"], len(classes))
    results["seconds"] = timing
    atomic.write_text(out / "results.json", json.dumps(results, indent=2))
    summary = format_summary(results)
    atomic.write_text(out / "summary.md", summary)
    print(summary)
    return 0


def format_summary(r: dict) -> str:
    def ci(a: dict) -> str:
        lo, hi = a["ci95"]
        return "-" if lo is None else f"[{lo:.3f}, {hi:.3f}]"

    d = r["difference"]
    lines = [
        f"Distillation pipeline check on synthetic 1-s scenes ({r['clips_per_class']} clips per "
        f"class; {r['machine']})",
        "",
        f"teacher {r['teacher_model']} ({r['teacher_iters']} iterations): class-wise accuracy "
        f"{r['teacher']['classwise_accuracy']:.3f}",
        "",
        "| student (cp_mobile, %d iterations) | class-wise accuracy: mean ± std | 95 %% CI | seeds |"
        % r["student_iters"],
        "|---|---|---|---|",
    ]
    for arm, name in (("student", "without distillation"), ("student_kd", "with distillation")):
        a = r["arms"][arm]
        lines.append(f"| {name} | {a['mean']:.3f} ± {a['std']:.3f} | {ci(a)} | "
                     f"{', '.join(f'{v:.3f}' for v in a['accuracy'])} |")
    lines += ["", f"paired difference (with - without): {d['mean_diff']:+.3f}, 95 % bootstrap CI "
                  f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] over {d['n_seeds']} seeds x "
                  f"{d['n_clips']} clips: {d['verdict']}"]
    return "\n".join(lines) + "\n"
