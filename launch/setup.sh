#!/usr/bin/env bash
# Sourced by the other launchers: create/reuse .venv and install asc-dist into it.
#   ASC_VENV=path   use another venv (default: .venv in the repo)
#   ASC_DEV=1       also install the dev extra (pytest, librosa, ruff)
# Reinstalls only when pyproject.toml changed since the last install (stamp file in the venv).
set -euo pipefail
ASC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASC_VENV="${ASC_VENV:-$ASC_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$ASC_VENV/bin/python" ]; then
  echo "[setup] creating venv $ASC_VENV" >&2
  "$PYTHON_BIN" -m venv "$ASC_VENV"
fi
extra=""; [ "${ASC_DEV:-0}" = "1" ] && extra="[dev]"
stamp="$ASC_VENV/.asc-dist-installed$extra"
want="$(sha256sum "$ASC_ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing asc-dist$extra into $ASC_VENV (first time: several minutes, ~5.5 GB)" >&2
  "$ASC_VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$ASC_VENV/bin/python" -m pip install -q -e "$ASC_ROOT$extra" >&2
  echo "$want" > "$stamp"
fi
PY="$ASC_VENV/bin/python"
export PY ASC_ROOT ASC_VENV
