#!/usr/bin/env bash
# usage: bash launch/demo.sh [--nproc N] [key=value ...]
# The whole system on the embedded synthetic dataset, on CPU: set up .venv, synthesise TUT-layout
# scenes, pack them into shards, train with torchrun (2 processes, gloo) on conf/demo.yaml, and
# print the class-wise accuracy report. Extra key=value arguments override conf/demo.yaml.
#   DEMO_DIR=path  where data, shards and the run go (default: the repo's data/, shards/, runs/)
set -euo pipefail
nproc=2
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
if [ "${1:-}" = "--nproc" ]; then nproc="$2"; shift 2; fi
source "$(dirname "$0")/setup.sh"
cd "$ASC_ROOT"
root="${DEMO_DIR:-.}"
data="$root/data/demo"; shards="$root/shards/demo"
start=$(date +%s)
if [ ! -f "$data/meta.csv" ]; then
  "$PY" -m asc_dist.synth "$data" --clips-per-class "${DEMO_CLIPS:-48}" --duration 2 --seed 0
fi
if [ ! -f "$shards/train/manifest.json" ]; then
  "$PY" -m asc_dist.pack "$data" "$shards" --workers 2 --overwrite
fi
rm -rf "$root/runs/demo"  # the demo always trains from scratch
"$PY" -m asc_dist.torchrun --nproc "$nproc" -- conf/demo.yaml \
  data.shards="$shards" run_dir="$root/runs/demo" "$@"
echo "demo finished in $(( $(date +%s) - start )) s; report: $root/runs/demo/eval/report.md," \
     "curves: $root/runs/demo/curves.png"
