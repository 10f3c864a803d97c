"""``table1 collect``: finished runs -> ``table1.md``, ``table1.json``, ``table1.png``.

Each run dir is read for its resolved ``config.yaml`` (which row, which seed: asc_dist.table1.
row_of), its final ``eval/report.json`` and ``eval/predictions.tsv``, and the W&B run id of its
newest checkpoint. Per row: the mean, standard deviation and 95 % t-interval of class-wise
accuracy over seeds, and whether the paper's value lies inside. Per ablation step: the mean
paired difference with a 95 % bootstrap interval over test clips and seeds, in plain words.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from asc_dist import atomic
from asc_dist import config as config_lib
from asc_dist.table1 import BY_KEY, COMPARISONS, ROWS, config_value, row_of
from asc_dist.table1.stats import mean_ci, paired_bootstrap

log = logging.getLogger(__name__)

TUT2018_FOLD1_TEST = 2518
# Every run of the sweep must read the same data; the ResNet rows (not the baseline, which has
# its own recipe) must also share the front end and the training budget.
SHARED_ALL = ("data.shards", "data.train_split", "data.test_split")
SHARED_ABLATION = ("features", "train.max_iters", "train.global_batch")


def _wandb(run_dir: Path, cfg: dict) -> dict:
    """W&B run id from the newest checkpoint, and a link where one can be built."""
    import torch

    from asc_dist.checkpoint import Checkpointer

    mode = config_value(cfg, "wandb.mode") or "disabled"
    out = {"mode": mode, "id": None, "url": None, "project": config_value(cfg, "wandb.project")}
    latest = Checkpointer(run_dir).latest()
    if latest is not None:
        try:  # mmap: only the pickle is read, not the weights
            out["id"] = torch.load(latest, map_location="cpu", weights_only=True, mmap=True).get("wandb_id")
        except Exception as e:  # noqa: BLE001 - a link is a nicety; latest() already vetted the file
            log.warning(f"cannot read the W&B run id from {latest}: {e}")
    entity = config_value(cfg, "wandb.entity") or os.environ.get("WANDB_ENTITY")
    if out["id"] and mode == "online" and entity:
        out["url"] = f"https://wandb.ai/{entity}/{out['project']}/runs/{out['id']}"
    return out


def read_run(run_dir: str | Path) -> dict:
    """One run's Table I facts; ``problem`` says what is missing, if anything."""
    run_dir = Path(run_dir)
    rec: dict[str, Any] = {"run_dir": str(run_dir), "problem": None, "report": None}
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        rec["problem"] = f"no config.yaml in {run_dir} (not a run dir?)"
        return rec
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    try:  # through today's schema: keys that moved since, and defaults of keys added since
        cfg = config_lib.to_dict(config_lib.from_dict(cfg))
    except Exception as e:  # noqa: BLE001 - a config this version cannot read: compare it as saved
        log.warning(f"{cfg_path}: does not fit this version's config ({type(e).__name__}); "
                    f"read as saved")
        cfg = config_lib.carry_over(cfg)
    rec.update(
        name=cfg.get("name"), row=row_of(cfg), seed=config_value(cfg, "train.seed"),
        model=config_value(cfg, "model.name"), pretrained=config_value(cfg, "model.pretrained"),
        loss=config_value(cfg, "loss.name"), mixup=bool(config_value(cfg, "augment.mixup.enabled")),
        max_iters=config_value(cfg, "train.max_iters"),
        shared={k: config_value(cfg, k) for k in (*SHARED_ALL, *SHARED_ABLATION)}, wandb=_wandb(run_dir, cfg),
    )
    report_path = run_dir / "eval" / "report.json"
    if not report_path.is_file():
        rec["problem"] = f"no {report_path} (run not finished?)"
        return rec
    try:
        report = json.loads(report_path.read_text())
        rec["report"] = {k: report[k] for k in ("step", "classwise_accuracy", "accuracy", "count")}
    except (ValueError, KeyError) as e:
        rec["problem"] = f"{report_path}: unreadable report ({type(e).__name__}: {e})"
        return rec
    if rec["max_iters"] is not None and rec["report"]["step"] < rec["max_iters"]:
        rec["problem"] = f"report is from step {rec['report']['step']} of {rec['max_iters']}"
    preds = run_dir / "eval" / "predictions.tsv"
    rec["predictions"] = str(preds) if preds.is_file() else None
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


def _aligned(runs_a: list[dict], runs_b: list[dict]) -> tuple[dict, dict, int]:
    """Per seed (labels, preds) of both rows over the clips every run predicted, in one key
    order, and the number of classes."""
    import numpy as np

    from asc_dist.validate import read_predictions

    read = {(side, r["seed"]): read_predictions(r["predictions"])
            for side, runs in (("a", runs_a), ("b", runs_b)) for r in runs}
    keys = sorted(set.intersection(*(set(table) for _, table in read.values())))
    out: dict[str, dict] = {"a": {}, "b": {}}
    for (side, seed), (_, table) in read.items():
        out[side][seed] = (np.array([table[k][0] for k in keys]),
                           np.array([int(table[k][1].argmax()) for k in keys]))
    num_classes = len(next(iter(read.values()))[0])
    return out["a"], out["b"], num_classes


def summarize(runs: list[dict]) -> dict:
    """The table1.json structure: rows with statistics over seeds, then the paired comparisons."""
    rows, by_row = [], {}
    for row in ROWS:
        mine = sorted((r for r in runs if r.get("row") == row.key), key=lambda r: r["seed"])
        done = [r for r in mine if r["report"] is not None and r["problem"] is None]
        ci = mean_ci([r["report"]["classwise_accuracy"] for r in done]) if done else None
        lo, hi = ci["ci95"] if ci else (None, None)
        rows.append({
            "row": row.label, "key": row.key, "paper": row.paper, "note": row.note,
            "mean": ci and ci["mean"], "std": ci and ci["std"], "ci95": [lo, hi],
            "paper_in_ci": None if lo is None else lo <= row.paper <= hi,
            "accuracy_mean": (sum(r["report"]["accuracy"] for r in done) / len(done)) if done else None,
            "model": mine[0]["model"] if mine else None, "loss": mine[0]["loss"] if mine else None,
            "mixup": mine[0]["mixup"] if mine else None,
            "seeds": [{"seed": r["seed"], "run_dir": r["run_dir"], "problem": r["problem"],
                       "classwise": r["report"] and r["report"]["classwise_accuracy"],
                       "accuracy": r["report"] and r["report"]["accuracy"],
                       "test_clips": r["report"] and r["report"]["count"], "wandb": r["wandb"]}
                      for r in mine],
        })
        by_row[row.key] = [r for r in done if r.get("predictions")]
    comparisons = []
    for a, b in COMPARISONS:
        entry = {"from": BY_KEY[a].label, "to": BY_KEY[b].label}
        seeds = {r["seed"] for r in by_row[a]} & {r["seed"] for r in by_row[b]}
        if not seeds:
            comparisons.append({**entry, "mean_diff": None, "ci95": [None, None],
                                "verdict": "not available: no seed with predictions.tsv in both rows"})
            continue
        runs_a, runs_b, num_classes = _aligned([r for r in by_row[a] if r["seed"] in seeds],
                                               [r for r in by_row[b] if r["seed"] in seeds])
        comparisons.append({**entry, **paired_bootstrap(runs_a, runs_b, num_classes)})
    return {"rows": rows, "comparisons": comparisons}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _wandb_cell(w: dict | None, run_dir: str) -> str:
    if not w or not w.get("id"):
        return "—"
    if w.get("url"):
        return f"[{w['id']}]({w['url']})"
    if w.get("mode") == "offline":
        return f"`{w['id']}` (offline: `wandb sync {run_dir}/wandb/offline-run-*`)"
    return f"`{w['id']}` (project {w.get('project')})"


def notes(runs: list[dict], summary: dict) -> list[str]:
    """What a reader must know before comparing with the paper: data, pretraining, consistency."""
    lines = []
    done = [r for r in runs if r.get("report")]
    counts = {r["report"]["count"] for r in done}
    if counts == {TUT2018_FOLD1_TEST}:
        lines.append(f"Data: TUT Urban Acoustic Scenes 2018 fold 1 test split ({TUT2018_FOLD1_TEST} "
                     f"clips). The paper's values are leaderboard accuracies (1,200 clips, models "
                     f"trained on all 8,640 development clips): a loose reference, not the same "
                     f"test; on fold 1 the DCASE 2018 baseline scores 59.7 % (docs/table1.md).")
    elif counts:
        lines.append(f"Data: {', '.join(map(str, sorted(counts)))} test clips, not the TUT 2018 fold 1 "
                     f"test split ({TUT2018_FOLD1_TEST} clips): a check of the pipeline, not a "
                     f"reproduction of the paper's numbers.")
    present = [r for r in runs if r.get("shared")]
    for keys, who in ((SHARED_ALL, present), (SHARED_ABLATION, [r for r in present if r["row"] != "baseline"])):
        for key in keys:
            if len({json.dumps(r["shared"][key], sort_keys=True) for r in who}) > 1:
                lines.append(f"⚠ The runs differ in `{key}`: the rows are not one controlled ablation.")
    seeds = {row["row"]: tuple(s["seed"] for s in row["seeds"]) for row in summary["rows"] if row["seeds"]}
    if len(set(seeds.values())) > 1:
        lines.append("⚠ The rows were run with different seeds: " + "; ".join(
            f"{k}: {list(v)}" for k, v in seeds.items()) + ".")
    if present and not any(line.startswith("⚠") for line in lines):
        s = next((r for r in present if r["row"] != "baseline"), present[0])["shared"]
        lines.append(f"All rows: shards `{s['data.shards']}`, seeds {sorted({r['seed'] for r in present})}; "
                     f"the ResNet rows {s['train.max_iters']} iterations at global batch "
                     f"{s['train.global_batch']}.")
    unpretrained = sorted({Path(r["run_dir"]).name for r in present
                           if r["row"] in ("nll", "focal", "focal_mixup") and r["pretrained"] != "imagenet"})
    if unpretrained:
        lines.append("Note: the paper's ResNet-50 rows start from ImageNet weights; these runs did "
                     f"not: {', '.join(unpretrained)}.")
    return lines


def render(runs: list[dict], summary: dict) -> str:
    lines = [
        "# Table I: Ye et al. ablation, paper vs. this reproduction",
        "",
        ("Class-wise accuracy (mean over scene classes of per-class accuracy) on the held-out split, "
         "from each run's final evaluation. Ours: mean ± standard deviation over seeds, with a 95 % "
         "t-interval; the paper reports one run per row."),
        "",
        "| Table I row | paper | ours: mean ± std | 95 % CI | paper in CI | seeds | accuracy | model | loss | mixup |",
        "|---|---:|---:|---|:---:|---:|---:|---|---|---|",
    ]
    for row in summary["rows"]:
        n = sum(1 for s in row["seeds"] if s["classwise"] is not None and s["problem"] is None)
        if not row["seeds"]:
            lines.append(f"| {row['row']} | {_fmt(row['paper'])} | not run | — | — | 0 | — | — | — | — |")
            continue
        lo, hi = row["ci95"]
        inside = "—" if row["paper_in_ci"] is None else ("yes" if row["paper_in_ci"] else "no")
        lines.append(
            f"| {row['row']} | {_fmt(row['paper'])} | {_fmt(row['mean'])} ± {_fmt(row['std'])} | "
            f"[{_fmt(lo)}, {_fmt(hi)}] | {inside} | {n} | {_fmt(row['accuracy_mean'])} | "
            f"{row['model']} | {row['loss']} | {'yes' if row['mixup'] else 'no'} |")
    lines += ["", "## Ablation steps (paired bootstrap over test clips and seeds)", "",
              "| from | to | mean difference | 95 % CI | in plain words |", "|---|---|---:|---|---|"]
    for c in summary["comparisons"]:
        lo, hi = c["ci95"]
        diff = "—" if c["mean_diff"] is None else f"{100 * c['mean_diff']:+.1f} points"
        ci = "—" if lo is None else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
        words = c["verdict"].split(": ", 1)[-1]  # the numbers have their own columns
        lines.append(f"| {c['from']} | {c['to']} | {diff} | {ci} | {words} |")
    lines += ["", "## Rows that differ from the paper's systems", ""]
    lines += [f"- {row['row']}: {row['note']}." for row in summary["rows"] if row["note"]]
    lines += ["", *notes(runs, summary), "", "## Runs", "",
              "| row | seed | class-wise acc. | accuracy | test clips | run | W&B |",
              "|---|---:|---:|---:|---:|---|---|"]
    for row in summary["rows"]:
        for s in row["seeds"]:
            status = _fmt(s["classwise"]) if s["problem"] is None else f"{_fmt(s['classwise'])} ⚠ {s['problem']}"
            lines.append(f"| {row['row']} | {s['seed']} | {status} | {_fmt(s['accuracy'])} | "
                         f"{s['test_clips'] or '—'} | `{s['run_dir']}` | "
                         f"{_wandb_cell(s['wandb'], s['run_dir'])} |")
    others = [r for r in runs if r.get("row") not in BY_KEY]
    lines += [f"| other: {r.get('name') or r['run_dir']} | {r.get('seed', '—')} | "
              f"{_fmt((r.get('report') or {}).get('classwise_accuracy'))} | — | — | `{r['run_dir']}` | — |"
              for r in others]
    return "\n".join(lines) + "\n"


def collect(run_dirs: list[str | Path], out: str | Path) -> tuple[str, dict]:
    """Write ``out`` (markdown), its .json and .png; returns (markdown, summary)."""
    from asc_dist.plots import plot_table1

    runs = [read_run(d) for d in expand_run_dirs(run_dirs)]
    summary = summarize(runs)
    text = render(runs, summary)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, text)
    atomic.write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    plot_table1(summary, out.with_suffix(".png"))
    return text, summary


def collect_and_print(run_dirs: list[str | Path], out: str | Path) -> bool:
    """collect, print the table and what was written; True when every run is complete."""
    text, summary = collect(run_dirs, out)
    print(text)
    out = Path(out)
    log.info(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    missing = [f"{row['row']} seed {s['seed']}" for row in summary["rows"] for s in row["seeds"]
               if s["problem"] is not None]
    if missing:
        log.warning(f"incomplete runs: {', '.join(missing)}")
    return not missing


def main(argv: list[str]) -> int:
    c = argparse.ArgumentParser(prog="python -m asc_dist.table1 collect",
                                description="Tabulate finished runs into table1.md, .json and .png.")
    c.add_argument("--runs", nargs="+", required=True,
                   help="run dirs (or a folder holding table1-* run dirs, e.g. runs/)")
    c.add_argument("--out", default="table1.md")
    args = c.parse_args(argv)
    return 0 if collect_and_print(args.runs, args.out) else 1
