#!/usr/bin/env bash
# usage: bash launch/test.sh [--fast] [pytest args ...]
# Sets up .venv with the dev extra and runs the whole test suite (what CI runs), printing the 15
# slowest tests. --fast skips the tests marked slow (real torchrun/SLURM/launcher processes, the
# wheel and PyPI round trips): the developer loop. "No tests collected" is a failure.
# ASC_TEST_WORKERS=N: pytest-xdist workers (default 2; 0 runs in this one process).
# As root, the SLURM tests' daemons (Debian's slurmctld, slurmd, slurm-client) are installed with
# apt-get when missing; elsewhere those tests skip naming what is missing.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,8p' "$0" | sed 's/^# //'; exit 0
fi
marks=()
if [ "${1:-}" = "--fast" ]; then shift; marks=(-m "not slow"); fi
ASC_DEV=1 source "$(dirname "$0")/setup.sh"
cd "$ASC_ROOT"
if [ ${#marks[@]} -eq 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null 2>&1; then
  echo "[test] installing slurmctld slurmd slurm-client for tests/test_slurm.py" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends slurmctld slurmd slurm-client; } >/dev/null \
    || echo "[test] installing SLURM failed: tests/test_slurm.py will say why" >&2
fi
set +e
# Two workers: a suite of many short processes leaves one of two cores idle most of the time.
# loadfile: a file's tests share its expensive fixtures (a SLURM cluster, a sweep), so one
# worker runs them all.
workers=()
# --no-loadscope-reorder: xdist would otherwise queue the files by their number of tests,
# ignoring conftest's longest-first order (a 48-s file of 2 tests then ran last, alone).
[ "${ASC_TEST_WORKERS:-2}" != 0 ] && workers=(-n "${ASC_TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder)
# One math thread per worker: torch's default (one per core) in each of two workers
# oversubscribes a 2-core machine, and a ResNet-50 test then ran 5-10x slower (BENCHMARKS.md).
[ ${#workers[@]} -gt 0 ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# ${a[@]+...}: an empty array under set -u is an error in bash < 4.4
"$PY" -m pytest -q --durations=15 ${workers[@]+"${workers[@]}"} ${marks[@]+"${marks[@]}"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "launch/test.sh: pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
