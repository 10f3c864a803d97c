#!/usr/bin/env bash
# usage: bash launch/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--skip-tests]
# Verifies a GPU node end to end in one command (<= 8 minutes on one GPU) and writes
# OUT_DIR/results.json and OUT_DIR/summary.md: the gpu-marked tests, DALI/torch log-mel on the GPU
# vs the CPU, a bf16 training run stopped and resumed, evaluate/predict on cuda vs cpu, and a
# throughput table at per-GPU batch 64 and 256 (the model alone, a plain PyTorch loop, the real
# trainer with each data backend, cached and streamed): clips/s, step ms, data wait, memory, MFU.
# Runs in the python it is given and changes nothing there (GPU nodes often bring their own
# PyTorch); needs no network (it makes its own synthetic data). Without DALI it says so and runs
# the rest. `--device cpu --quick` runs it all at toy size on a CPU (the test suite does).
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
