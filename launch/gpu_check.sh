#!/usr/bin/env bash
# usage: bash launch/gpu_check.sh OUT_DIR [--plan] [--only a,b] [--skip a,b] [--work DIR]
#                                         [--device cuda|cpu] [--quick] [--budget S] [--json]
# Verifies a GPU node end to end and writes OUT_DIR/results.json and OUT_DIR/summary.md (only
# those): the gpu-marked tests, DALI/torch log-mel on the GPU vs the CPU, a bf16 training run
# stopped and resumed, evaluate/predict on cuda vs cpu, and throughput at per-GPU batch 64 and
# 256 (the model alone, a plain PyTorch loop, the real trainer cached and streamed): clips/s,
# step ms, data wait, memory, MFU. The check is planned first (`--plan` prints each step's
# budget and runs nothing; a plan not worth a GPU lease is refused); every step runs in its own
# process group, killed when it passes its budget; the files are rewritten after every step.
# `--only`/`--skip` split it over several calls sharing one `--work` (data built once).
# Runs in the python it is given and changes nothing there; needs no network. Without DALI it
# says so and runs the rest. `--device cpu --quick` runs it all at toy size (the tests do).
#   ASC_PYTHON=python3   the python to use (default: the repo's .venv, else python3)
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ $# -eq 0 ]; then
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; [ $# -gt 0 ]; exit $?
fi
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -x "${ASC_PYTHON:-$ASC_ROOT/.venv/bin/python}" ] || ASC_PYTHON=${ASC_PYTHON:-python3}
PY=$(asc_python) || exit 1
cd "$ASC_ROOT"
exec "$PY" -m asc_dist.bench gpu "$@"
