#!/usr/bin/env bash
# usage: bash launch/table1.sh [--synthetic | --shards DIR] [--nproc N] [options] [conf/x.yaml ...] [key=value ...]
# The paper's Table I: trains conf/experiment/{baseline,nll,focal,focal_mixup}.yaml one after another
# with torchrun on the same shards and seed (runs/table1-<row>), then writes runs/table1.md.
#   bash launch/table1.sh --synthetic                 # CPU: synthetic scenes, reduced size (minutes)
#   bash launch/table1.sh --nproc 4 conf/data/tut2018.yaml wandb.mode=online   # the real reproduction
# Rerunning continues an interrupted sweep. All options: python -m asc_dist.table1 run --help
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
source "$(dirname "$0")/setup.sh"
cd "$ASC_ROOT"
exec "$PY" -m asc_dist.table1 run "$@"
