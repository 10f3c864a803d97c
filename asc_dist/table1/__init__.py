"""The paper's Table I (Ye et al.) as an experiment: every row trained with several seeds on the
same shards, each row's mean with a confidence interval, and paired comparisons of the ablation
steps with bootstrap intervals, beside the paper's single-run numbers::

    python -m asc_dist.table1 run [--seeds 0,1,2] [--parallel K] [--nproc N] [--reduced | --synthetic]
                                  [--shards DIR] [--runs-root runs] [--only rows] [yaml ...] [k=v ...]
    python -m asc_dist.table1 collect --runs RUN_DIR_OR_ROOT... [--out table1.md]
    python -m asc_dist.table1 plan [--seeds ...] [--runs-root ...] [--only ...]  (for schedulers)

The paper's ablation rests on differences of 0.8 and 1.4 points from one run each on 2,518 test
clips, where the binomial standard error alone is ~0.9 points: one run per row cannot order the
rows (run.py trains them, collect.py tabulates them, stats.py holds the statistics).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from asc_dist.cli import command


@dataclass(frozen=True)
class Row:
    key: str
    label: str  # the table's first column
    paper: float  # the paper's class-wise accuracy (Table I)
    experiment: str  # conf/experiment/<experiment>.yaml
    note: str = ""  # what differs from the paper's system
    reduced: tuple[str, ...] = ()  # the row's own overrides in CPU-sized (--reduced) sweeps


ROWS = (
    Row("baseline", "DCASE 2018 baseline CNN", 0.625, "baseline",
        "the baseline's own recipe: 40 mels, 40 ms windows, Adam, batch 16, 200 epochs",
        reduced=("train.global_batch=16",)),
    Row("seresnet", "SE-ResNet", 0.725, "seresnet",
        "timm seresnet50 from scratch with CE; the original's GAN-based augmentation is not reproduced"),
    Row("nll", "ResNet-50 + NLL", 0.725, "nll"),
    Row("focal", "ResNet-50 + focal loss", 0.733, "focal"),
    Row("focal_mixup", "ResNet-50 + focal loss + mixup", 0.747, "focal_mixup"),
)
BY_KEY = {r.key: r for r in ROWS}
# The ablation steps the paper's argument rests on: (from, to).
COMPARISONS = (("baseline", "nll"), ("nll", "focal"), ("focal", "focal_mixup"))


def run_name(row: Row, seed: int) -> str:
    return f"table1-{row.key.replace('_', '-')}-seed{seed}"


def config_value(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def row_of(cfg: dict) -> str | None:
    """Which Table I row a run's config is: by model, loss and mixup (None: not a Table I row)."""
    model, loss = config_value(cfg, "model.name") or "", config_value(cfg, "loss.name")
    mixup = bool(config_value(cfg, "augment.mixup.enabled"))
    if model == "dcase_baseline":
        return "baseline"
    if model.startswith("seresnet"):
        return "seresnet" if loss == "ce" and not mixup else None
    if loss == "ce" and not mixup:
        return "nll"
    if loss == "focal":
        return "focal_mixup" if mixup else "focal"
    return None


USAGE = """usage: python -m asc_dist.table1 {run,collect,plan} [-h] ...

Reproduce Ye et al.'s Table I with seeds and confidence intervals.
  run       train every row x seed (skipping finished runs), then collect
  collect   tabulate finished runs into table1.md, table1.json and table1.png
  plan      print the (row, seed) trainings as tab-separated lines, for job schedulers
"""


@command("asc_dist.table1")
def main(argv: list[str] | None = None) -> int:
    from asc_dist.table1 import collect, run

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("run", "collect", "plan"):
        helped = bool(argv) and argv[0] in ("-h", "--help")
        print(USAGE, file=sys.stdout if helped else sys.stderr)
        return 0 if helped else 2
    return {"run": run.main, "collect": collect.main, "plan": run.plan_main}[argv[0]](argv[1:])
