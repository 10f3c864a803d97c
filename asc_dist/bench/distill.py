"""A distillation pipeline check on synthetic 1-s scenes::

    python -m asc_dist.bench distill OUT_DIR [--seeds 0,1,2] [--clips-per-class 24]
        [--teacher-model resnet18|passt] [--teacher-iters 150] [--student-iters 200]
        [--cost-steps 40] [key=value ...]

Synthesises 1-s scenes (asc_dist.synth) at 32 kHz, packs them, trains one teacher
(``--teacher-model`` from scratch, on the DCASE 2024 front end), computes its logits over the
training split once, then trains the DCASE 2024 baseline student (cp_mobile,
conf/experiment/dcase2024_baseline.yaml, on the waveform cache, shortened to
``--student-iters``) without and with distillation (conf/experiment/dcase2024_kd.yaml) for every
seed, and reports both arms with the Table I statistics: mean and t-interval over seeds, and the
paired bootstrap difference (asc_dist.table1.stats). Writes OUT_DIR/results.json and
OUT_DIR/summary.md; trailing ``key=value`` overrides go to every run. On synthetic data this
checks the pipeline, not the method: the numbers say nothing about TAU 2022.

``--teacher-model passt`` walks DCASE 2025's path instead: the scenes are recorded by simulated
devices (a, b, c, s1-s3; s4-s6 in the test split only), the teacher is a tiny PaSST
(``--passt-dims``, random init, lr ``--teacher-lr``) with CP-JKU's teacher recipe
(conf/experiment/passt_teacher.yaml) through the waveform cache, its device impulse responses
made here (``--irs`` decaying noise responses at 48 kHz, resampled on load) and convolved into
device a's clips, and the students follow DCASE 2025's general recipe
(+ conf/experiment/dcase2025_general.yaml). ``--cost-steps N`` (> 0) also trains N steps of the
teacher and of a student with the waveform cache and with the feature cache (the waveform-only
augmentations off there, the roll by frames) and reports the trainer's time per step of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from asc_dist.bench import machine, synthetic_shards, write_results

log = logging.getLogger(__name__)

DATA = "conf/data/tau2022.yaml"
STUDENT = "conf/experiment/dcase2024_baseline.yaml"
GENERAL25 = "conf/experiment/dcase2025_general.yaml"
KD = "conf/experiment/dcase2024_kd.yaml"
TEACHER = "conf/experiment/passt_teacher.yaml"
TRAIN_DEVICES, UNSEEN = ["a", "b", "c", "s1", "s2", "s3"], ["s4", "s5", "s6"]
# what the feature cache cannot do: off in its arm of the cost comparison
WAVE_ONLY_OFF = ["augment.dir.p=0", "augment.mel_band.fmin_range=0",
                 "augment.mel_band.fmax_range=0"]


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="teacher -> cp_mobile student without/with KD, on synthetic 1-s scenes",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output dir (runs/, data/, results.json, summary.md)")
    p.add_argument("--seeds", default="0,1,2", help="student seeds (comma-separated)")
    p.add_argument("--clips-per-class", type=int, default=24)
    p.add_argument("--teacher-model", default="resnet18",
                   help="a model name, or passt: the DCASE 2025 path (module doc)")
    p.add_argument("--teacher-iters", type=int, default=150)
    p.add_argument("--student-iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="global batch of every run")
    p.add_argument("--teacher-batch", type=int, default=0, help="the teacher's (0: --batch)")
    p.add_argument("--passt-dims", default="32,2,4", help="passt: embed_dim,depth,num_heads")
    p.add_argument("--teacher-lr", type=float, default=1e-3,
                   help="passt: the teacher's lr (the recipe's 1e-5 is for the AudioSet weights)")
    p.add_argument("--irs", type=int, default=8, help="passt: impulse responses to make")
    p.add_argument("--cost-steps", type=int, default=0,
                   help="> 0: time this many steps on the waveform and on the feature cache")
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


def make_irs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` made impulse responses (48 kHz WAV, unit energy): a direct path plus a decaying
    noise tail of 4-40 ms, each its own colour (a one-pole low-pass of its own cut-off)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(192, 1920))
        tail = rng.standard_normal(n) * np.exp(-np.arange(n) / (n / 5)) * rng.uniform(0.2, 0.8)
        h = np.concatenate([[1.0], tail])
        pole = rng.uniform(0.0, 0.9)
        for k in range(1, len(h)):  # colour: y[k] = (1 - a) x[k] + a y[k-1]
            h[k] = (1 - pole) * h[k] + pole * h[k - 1]
        sf.write(folder / f"made_{i:02d}.wav", (h / np.sqrt((h * h).sum())).astype(np.float32),
                 48000, subtype="FLOAT")


def step_time(run_dir: Path) -> float:
    """The trainer's mean seconds per step over a run's log windows, the first (warm-up) left
    out."""
    from asc_dist.tracking import read_metrics

    times = [r["train/step_time"] for r in read_metrics(run_dir / "metrics.jsonl")
             if "train/step_time" in r]
    return float(np.mean(times[1:] if len(times) > 1 else times))


def cost_per_step(runs: Path, recipes: dict[str, list[str]], steps: int) -> dict:
    """Per recipe: the trainer's seconds per step with the waveform cache and the feature cache."""
    out = {}
    for name, args in recipes.items():
        row = {}
        for cache, extra in (("waveform", ["data.cache=waveform"]),
                             ("device", ["data.cache=device", *WAVE_ONLY_OFF])):
            run_dir = runs / f"cost-{name}-{cache}"
            _train([*args, *extra, f"run_dir={run_dir}", f"train.max_iters={steps}",
                    f"train.eval_every={10 * steps}", f"train.ckpt_every={10 * steps}",
                    "train.log_every=5", f"optim.warmup_iters={warmup(steps)}"])
            row[cache] = step_time(run_dir)
        row["ratio"] = row["waveform"] / row["device"]
        out[name] = row
    return out


def run(args: argparse.Namespace) -> int:
    from asc_dist.table1.stats import mean_ci, paired_bootstrap

    out: Path = args.out
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    data, runs = out / "data", out / "runs"
    passt = args.teacher_model == "passt"
    devices, unseen = (TRAIN_DEVICES, UNSEEN) if passt else ([], [])
    shards = synthetic_shards(data, args.clips_per_class, devices, unseen)
    common = [f"data.shards={shards}", "resume=never", "wandb.mode=disabled",
              f"train.global_batch={args.batch}", "train.epochs=0", *args.config]
    timing = {}
    teacher = runs / "teacher"
    if passt:
        make_irs(data / "irs", args.irs)
        dims = dict(zip(("embed_dim", "depth", "num_heads"), str(args.passt_dims).split(",")))
        teacher_recipe = [DATA, TEACHER, "model.pretrained=none",
                          f"augment.dir.path={data / 'irs'}",
                          *[f"model.passt.{k}={v}" for k, v in dims.items()],
                          f"optim.lr={args.teacher_lr}", *common]
    else:
        teacher_recipe = [DATA, f"model.name={args.teacher_model}", "model.pretrained=none",
                          "loss.name=ce", "augment.mixup.enabled=false", "optim.name=adamw",
                          "optim.schedule=cosine", *common]
    teacher_batch = args.teacher_batch or args.batch
    teacher_recipe.append(f"train.global_batch={teacher_batch}")
    timing["teacher"] = _train([*teacher_recipe, f"run_dir={teacher}",
                                f"optim.warmup_iters={warmup(args.teacher_iters)}",
                                f"train.max_iters={args.teacher_iters}",
                                f"train.eval_every={args.teacher_iters}", "wandb.job_type=teacher"])
    recipe = [DATA, STUDENT, *([GENERAL25] if passt else [])]
    student = [*recipe, f"train.max_iters={args.student_iters}",
               f"optim.warmup_iters={warmup(args.student_iters)}",
               f"train.eval_every={args.student_iters}", f"train.ckpt_every={args.student_iters}"]
    arms = {"student": [], "student_kd": [KD, f"distill.teachers=[{teacher}]"]}
    results: dict = {"machine": machine(), "seeds": seeds, "clips_per_class": args.clips_per_class,
                     "teacher_model": args.teacher_model, "teacher_iters": args.teacher_iters,
                     "student_iters": args.student_iters, "batch": args.batch, "arms": {},
                     "teacher_batch": teacher_batch,
                     "recipes": {"teacher": teacher_recipe[:-len(common) - 1],
                                 "student": recipe}}
    if passt:
        results["teacher_dims"], results["irs"] = args.passt_dims, args.irs
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
    if args.cost_steps > 0:
        results["cost_per_step"] = cost_per_step(runs, {"teacher": teacher_recipe,
                                                        "student": [*recipe, *common]},
                                                 args.cost_steps)
        results["cost_steps"] = args.cost_steps
    return write_results(out, results, format_summary(results))


def format_summary(r: dict) -> str:
    def ci(a: dict) -> str:
        lo, hi = a["ci95"]
        return "-" if lo is None else f"[{lo:.3f}, {hi:.3f}]"

    d = r["difference"]
    dims = f", embed/depth/heads {r['teacher_dims']}, {r['irs']} made impulse responses" if (
        "teacher_dims" in r) else ""
    lines = [
        f"Distillation pipeline check on synthetic 1-s scenes ({r['clips_per_class']} clips per "
        f"class; {r['machine']})",
        "",
        f"teacher {r['teacher_model']} ({r['teacher_iters']} iterations of "
        f"{r.get('teacher_batch', r['batch'])}{dims}): class-wise "
        f"accuracy {r['teacher']['classwise_accuracy']:.3f}",
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
    if "cost_per_step" in r:
        lines += ["", (f"the trainer's seconds per step ({r['cost_steps']} steps each, the "
                       f"first log window left out):"), "",
                  "| run | waveform cache | feature cache | ratio |", "|---|---:|---:|---:|"]
        for name, c in r["cost_per_step"].items():
            lines.append(f"| {name} | {c['waveform']:.4f} | {c['device']:.4f} | {c['ratio']:.2f} |")
    return "\n".join(lines) + "\n"
