#!/usr/bin/env bash
# usage: bash launch/table1.sh [--synthetic | --shards DIR] [--seeds 0,1,2,3,4] [--nproc N] [--parallel K]
#                              [options] [conf/x.yaml ...] [key=value ...]
# The paper's Table I as an experiment: every row (conf/experiment/*.yaml: DCASE baseline, SE-ResNet,
# ResNet-50 + NLL / focal / focal + mixup) with every seed on the same shards
# (runs/table1-<row>-seed<k>), then runs/table1.md, .json and .png: means, 95 % CIs, paired tests.
#   bash launch/table1.sh --synthetic --seeds 0,1,2   # CPU: synthetic scenes, reduced size
#   bash launch/table1.sh --nproc 4 conf/data/tut2018.yaml wandb.mode=online   # the reproduction
# Rerunning skips finished runs and resumes interrupted ones. All options: python -m asc_dist.table1 run --help
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; fi
source "$(dirname "$0")/setup.sh"
cd "$ASC_ROOT"
exec "$PY" -m asc_dist.table1 run "$@"
