#!/usr/bin/env bash
# usage: bash launch/test.sh [pytest args ...]
# Sets up .venv with the dev extra and runs the test suite. "No tests collected" is a failure.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,3p' "$0" | sed 's/^# //'; exit 0
fi
ASC_DEV=1 source "$(dirname "$0")/setup.sh"
cd "$ASC_ROOT"
set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "launch/test.sh: pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
