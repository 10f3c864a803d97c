#!/usr/bin/env bash
# usage: bash launch/single_node.sh [--nproc N] [conf/extra.yaml ...] [key=value ...]
# Train on this machine: torchrun --standalone with one process per GPU (default: every visible
# GPU, 1 process without a GPU), e.g.
#   bash launch/single_node.sh conf/data/tut2018.yaml conf/experiment/focal_mixup.yaml wandb.mode=online
# Rerunning the same command resumes the run (runs/<name>/checkpoints/latest). SIGTERM/SIGINT
# (Ctrl-C) make every rank checkpoint at the same step and exit (non-zero: stopped early, rerun to resume).
#   ASC_PYTHON=path       python of the venv (default: .venv/bin/python; make it: bash launch/setup.sh)
#   ASC_NPROC_PER_NODE=N  same as --nproc
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; fi
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = "--nproc" ]; then
  [ $# -ge 2 ] || { echo "error: --nproc needs a number" >&2; exit 2; }
  ASC_NPROC_PER_NODE=$2; shift 2
fi
PY=$(asc_python) || exit 1
NPROC=$(asc_nproc_per_node) || exit 1
asc_network_env
cd "$ASC_ROOT"
echo "[single_node] $NPROC process(es): $*" >&2
# exec: signals sent to this script reach torchrun, which passes them on to its ranks.
exec "$PY" -m asc_dist.torchrun --nproc "$NPROC" -- "$@"
