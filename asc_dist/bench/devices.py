"""A device-specific-models pipeline check on synthetic device scenes (DCASE 2025's two stages)::

    python -m asc_dist.bench devices OUT_DIR [--clips-per-class 36] [--general-iters 300]
        [--device-iters 60] [--batch 32] [key=value ...]

Synthesises 1-s scenes at 32 kHz recorded by simulated devices (asc_dist.synth --devices: the
training devices a, b, c, s1, s2, s3 and, in the test split only, s4, s5, s6), packs them, trains
the general model with the DCASE 2025 recipe (conf/experiment/dcase2024_baseline.yaml +
dcase2025_general.yaml: cp_mobile, fp16 test, the last partial batch kept; shortened to
``--general-iters`` of ``--batch``), fine-tunes it once per training device
(conf/experiment/dcase2025_device.yaml, ``--device-iters`` each) into a device set, evaluates the
set on the test split (each clip routed by its device) and reports, per device, the general
model's class-wise accuracy beside the set's, and the known / unknown and real / seen / unseen
groups. Writes OUT_DIR/results.json and OUT_DIR/summary.md; trailing ``key=value`` overrides go
to every run. On synthetic data this checks the pipeline, not the method: the numbers say
nothing about TAU 2022 or the baseline's published gains.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from asc_dist.bench import machine, synthetic_shards, write_results
from asc_dist.bench.distill import warmup

log = logging.getLogger(__name__)

DATA = "conf/data/tau2022.yaml"
GENERAL = ["conf/experiment/dcase2024_baseline.yaml", "conf/experiment/dcase2025_general.yaml"]
DEVICE = "conf/experiment/dcase2025_device.yaml"
TRAIN_DEVICES = ["a", "b", "c", "s1", "s2", "s3"]
UNSEEN = ["s4", "s5", "s6"]


def add_parser(sub) -> None:
    p = sub.add_parser("devices", help="general model -> device set -> routed evaluation, on "
                                       "synthetic device scenes",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path,
                   help="output dir (data/, runs/, devset/, results.json, summary.md)")
    p.add_argument("--clips-per-class", type=int, default=36)
    p.add_argument("--general-iters", type=int, default=300)
    p.add_argument("--device-iters", type=int, default=60)
    p.add_argument("--batch", type=int, default=32, help="global batch of every run")
    p.add_argument("config", nargs="*", help="key=value overrides for every run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asc_dist import devices, evaluate, train
    from asc_dist.errors import UserError

    out: Path = args.out
    shards = synthetic_shards(out / "data", args.clips_per_class, TRAIN_DEVICES, UNSEEN)
    common = [f"data.shards={shards}", "wandb.mode=disabled", f"train.global_batch={args.batch}",
              "train.epochs=0", *args.config]
    seconds = {}
    general = out / "runs" / "general"
    t0 = time.perf_counter()
    if train.main([DATA, *GENERAL, f"run_dir={general}", f"train.max_iters={args.general_iters}",
                   f"optim.warmup_iters={warmup(args.general_iters)}",
                   f"train.eval_every={args.general_iters}",
                   f"train.ckpt_every={args.general_iters}",
                   *common]) != 0:
        raise UserError("training the general model failed")
    seconds["general"] = time.perf_counter() - t0
    devset = out / "devset"
    t0 = time.perf_counter()
    if devices.main(["finetune", str(general), "--out", str(devset), "--devices",
                     ",".join(TRAIN_DEVICES), DEVICE, f"train.max_iters={args.device_iters}",
                     f"optim.warmup_iters={warmup(args.device_iters)}",
                     f"train.eval_every={args.device_iters}",
                     f"train.ckpt_every={args.device_iters}",
                     *common]) != 0:  # train.epochs=0 after the recipe's 50: iterations instead
        raise UserError("device-specific fine-tuning failed")
    seconds["finetune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if evaluate.main([str(devset), "--split", str(shards / "test"), "--out", str(devset / "eval"),
                      "--quiet"]) != 0:
        raise UserError("evaluating the device set failed")
    seconds["evaluate"] = time.perf_counter() - t0
    report = json.loads((devset / "eval" / "report.json").read_text())

    def general_of(device: str) -> float | None:
        return report["general"]["breakdowns"]["device"][device]["classwise_accuracy"]

    results = {
        "machine": machine(), "clips_per_class": args.clips_per_class, "batch": args.batch,
        "general_iters": args.general_iters, "device_iters": args.device_iters,
        "split": report["split"], "count": report["count"], "precision": report["precision"],
        "set": {"classwise_accuracy": report["classwise_accuracy"], "log_loss": report["log_loss"]},
        "general": {"classwise_accuracy": report["general"]["classwise_accuracy"],
                    "log_loss": report["general"]["log_loss"]},
        "per_device": {d: {"general": general_of(d), "set": r["classwise_accuracy"],
                           "model": "own" if d in report["members"] else "general",
                           "clips": r["count"]}
                       for d, r in report["breakdowns"]["device"].items()},
        "groups": {g: {"set": r["classwise_accuracy"],
                       "general": report["general"]["device_groups"][g]["classwise_accuracy"],
                       "devices": r["devices"]}
                   for g, r in report.get("device_groups", {}).items()},
        "seconds": seconds,
    }
    return write_results(out, results, format_summary(results))


def format_summary(r: dict) -> str:
    lines = [
        f"Device-specific models, a pipeline check on synthetic 1-s device scenes "
        f"({r['clips_per_class']} clips per class; {r['machine']})",
        "",
        f"general model (cp_mobile, {r['general_iters']} iterations of {r['batch']}), then one "
        f"fine-tuned copy per training device ({r['device_iters']} iterations each); scored on "
        f"`{r['split']}` ({r['count']} clips, {r['precision']} precision)",
        "",
        "| device | scored by | clips | general class-wise | set class-wise | gain |",
        "|---|---|---:|---:|---:|---:|",
        f"| **all** | routed | {r['count']} | {r['general']['classwise_accuracy']:.3f} | "
        f"{r['set']['classwise_accuracy']:.3f} | "
        f"{r['set']['classwise_accuracy'] - r['general']['classwise_accuracy']:+.3f} |",
    ]
    for d, v in r["per_device"].items():
        lines.append(f"| {d} | {v['model']} model | {v['clips']} | {v['general']:.3f} | "
                     f"{v['set']:.3f} | {v['set'] - v['general']:+.3f} |")
    lines += ["", "| group | devices | general class-wise | set class-wise |",
              "|---|---|---:|---:|"]
    for g, v in r["groups"].items():
        lines.append(f"| {g} | {', '.join(v['devices'])} | {v['general']:.3f} | {v['set']:.3f} |")
    s = r["seconds"]
    lines += ["", f"wall time: general {s['general']:.0f} s, fine-tuning {s['finetune']:.0f} s, "
                  f"evaluation {s['evaluate']:.0f} s"]
    return "\n".join(lines) + "\n"
