#!/usr/bin/env bash
# usage: bash launch/gpu_check.sh OUT_DIR [--plan] [--only a,b] [--skip a,b] [--work DIR]
#          [--device cuda|cpu] [--quick] [--budget S] [--costs results.json] [--json]
# Verifies a GPU node end to end and writes OUT_DIR/results.json and OUT_DIR/summary.md (only
# those). First, in one line: the project dependencies missing from this python and the
# `python -m asc_dist.bundle ... --skip torch,...` command that fetches exactly those (rows that
# need one are planned as "not run: <package> missing"). Then, in priority order: synthetic data,
# the real trainer at batch 256 cached and streamed, a bf16 run stopped and resumed, evaluate/
# predict on cuda vs cpu, DALI/torch log-mel parity, the model alone and a plain PyTorch loop,
# the batch-64 rows, train.compile on vs off, the gpu-marked tests: clips/s, step ms (CUDA
# events), data wait, memory, MFU, and the numbers a GPU user asks for (time to first step,
# GPU idle, host-to-device GB/s, ...). Planned first (`--plan` prints each step's fixed costs and
# work; a plan not worth a lease is refused; what does not fit --budget, default 360 s, is
# "not run: budget"); every step runs in its own process group, killed when it passes its
# budget, and keeps what it measured; the files are rewritten after every step. `--only`/`--skip`
# split it over several calls sharing one `--work` (data built once). Runs in the python it is
# given and changes nothing there; needs no network. `--device cpu --quick` runs it all at toy
# size (the tests do). docs/gpu_check.md says more.
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
