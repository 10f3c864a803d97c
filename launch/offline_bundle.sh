#!/usr/bin/env bash
# usage: bash launch/offline_bundle.sh --help  (asc_dist/bundle.py: python3 alone runs it)
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # ASC_ROOT, and this checkout first on PYTHONPATH
exec "${ASC_PYTHON:-python3}" -m asc_dist.bundle "$@"
