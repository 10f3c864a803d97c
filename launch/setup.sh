#!/usr/bin/env bash
# Sourced by the other launchers: create/reuse .venv and install asc-dist into it.
#   ASC_VENV=path        use another venv (default: .venv in the repo)
#   ASC_DEV=1            also install the dev extra (pytest, librosa, ruff)
#   ASC_WHEELHOUSE=DIR   install offline from a folder of wheels (launch/offline_bundle.sh makes one)
#   PYTHON=python3.x     the interpreter to create the venv with
# Reinstalls only when pyproject.toml changed since the last install (stamp file in the venv).
# Exports ASC_PYTHON (and PY) = the venv's python, which every launcher then uses.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ASC_VENV="${ASC_VENV:-$ASC_ROOT/.venv}"
if [ ! -x "$ASC_VENV/bin/python" ]; then
  echo "[setup] creating venv $ASC_VENV" >&2
  "${PYTHON:-python3}" -m venv "$ASC_VENV"
fi
extra=""; [ "${ASC_DEV:-0}" = "1" ] && extra="[dev]"
stamp="$ASC_VENV/.asc-dist-installed$extra"
want="$(sha256sum "$ASC_ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$ASC_VENV/bin/python" -m pip install -q)
  if [ -n "${ASC_WHEELHOUSE:-}" ]; then
    echo "[setup] installing asc-dist$extra into $ASC_VENV offline from $ASC_WHEELHOUSE" >&2
    pip+=(--no-index --find-links "$ASC_WHEELHOUSE")
  else
    echo "[setup] installing asc-dist$extra into $ASC_VENV (first time: several minutes, ~5.5 GB)" >&2
    "$ASC_VENV/bin/python" -m pip install -q --upgrade pip >&2
  fi
  "${pip[@]}" -e "$ASC_ROOT$extra" >&2
  echo "$want" > "$stamp"
fi
ASC_PYTHON="$ASC_VENV/bin/python"
PY="$ASC_PYTHON"
export ASC_PYTHON PY ASC_VENV
