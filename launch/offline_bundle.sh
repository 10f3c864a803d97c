#!/usr/bin/env bash
# usage: bash launch/offline_bundle.sh DIR [--python 3.12] [--platform manylinux_2_28_x86_64]
#                                      [--skip torch,torchvision,torchaudio] [--dev] [--part-mb 60]
#        bash launch/offline_bundle.sh --join DIR
#        bash launch/offline_bundle.sh --split-only DIR --part-mb N
# Downloads every wheel asc-dist needs for one target Python and platform into DIR, for GPU nodes
# without internet: the dependencies of pyproject.toml with everything they depend on, the build
# backend (setup.sh's editable install needs it) and the wheel of asc-dist itself. On the node:
# ASC_WHEELHOUSE=DIR bash launch/setup.sh, or pip install --no-index --find-links DIR asc-dist
# (DIR/INSTALL.txt says how; the end of the run prints it).
#   --python X.Y      the node's Python (default: the version of the python running pip here)
#   --platform TAG    the node's wheel platform (default manylinux_2_28_x86_64); older manylinux
#                     tags and pure-Python wheels are taken too
#   --skip a,b        leave out these dependencies and whatever only they need, e.g. for nodes with
#                     their own PyTorch: --skip torch,torchvision,torchaudio (such a bundle
#                     installs with pip's --no-deps next to the node's torch; see INSTALL.txt)
#   --dev             also the dev extra (pytest, librosa, ruff)
#   --part-mb N       split each file larger than N MiB into NAME.part-aa, NAME.part-ab, ...
#                     (upload limits); DIR/SHA256SUMS, always written, checks the reassembly
#   --join DIR        on the node: join the *.part-* files back, check SHA256SUMS, remove the parts
#   --split-only DIR  no download: (re)write DIR/SHA256SUMS and split with --part-mb N
# DIR may hold an earlier bundle for the same target: wheels already there are not fetched again.
# pip runs with ASC_PYTHON (default .venv/bin/python, else python3) and its own configuration
# (index, proxy: PIP_INDEX_URL, pip.conf); downloading needs no installed asc-dist.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; fi
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export LC_ALL=C  # one sort order for the part suffixes and SHA256SUMS

usage_error() { echo "error: $* (see: bash launch/offline_bundle.sh --help)" >&2; exit 2; }
log() { echo "[offline_bundle] $*" >&2; }

mode=download dir="" pyver="" platform=manylinux_2_28_x86_64 skip="" dev=0 part_mb=""
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in --*=*) set -- "${arg#*=}" "$@"; arg=${arg%%=*} ;; esac  # --opt=value
  case $arg in
    -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    --python | --platform | --skip | --part-mb)
      if [ $# -eq 0 ] || [ -z "$1" ]; then usage_error "$arg needs a value"; fi
      case $arg in
        --python) pyver=$1 ;;
        --platform) platform=$1 ;;
        --skip) skip=$1 ;;
        --part-mb) part_mb=$1 ;;
      esac
      shift ;;
    --dev) dev=1 ;;
    --join) mode="join" ;;
    --split-only) mode="split" ;;
    -*) usage_error "unknown option '$arg'" ;;
    *) [ -z "$dir" ] || usage_error "one DIR only (got '$dir' and '$arg')"; dir=$arg ;;
  esac
done
[ -n "$dir" ] || usage_error "missing the DIR argument (the bundle folder)"
if [ -n "$part_mb" ]; then
  [[ $part_mb =~ ^[1-9][0-9]*$ ]] || usage_error "--part-mb '$part_mb' is not a positive integer (MiB)"
fi
if [ -n "$pyver" ]; then
  [[ $pyver =~ ^3\.[0-9]{1,2}$ ]] || usage_error "--python '$pyver' is not a Python version like 3.12"
fi
[[ $platform =~ ^[A-Za-z0-9_.]+$ ]] || usage_error "--platform '$platform' is not a wheel platform tag like manylinux_2_28_x86_64"
[ "$mode" != split ] || [ -n "$part_mb" ] || usage_error "--split-only needs --part-mb N"

# ---- SHA256SUMS, splitting and joining (no network, no python) --------------------------------

# The files a bundle consists of: plain files other than our own bookkeeping and parts.
bundle_files() {
  local f
  for f in "$dir"/*; do
    [ -f "$f" ] || continue
    case ${f##*/} in SHA256SUMS | INSTALL.txt | *.part-* | *.joining | .*) continue ;; esac
    printf '%s\n' "${f##*/}"
  done
}

# Names that exist only as parts (NAME.part-aa, NAME.part-ab, ... without NAME).
part_groups() {
  local f
  for f in "$dir"/*.part-*; do
    [ -f "$f" ] || continue
    f=${f##*/}; printf '%s\n' "${f%.part-*}"
  done | sort -u
}

# Hash every whole file into SHA256SUMS (keeping the lines of files that are already split), then
# split each file larger than $part_mb MiB (none without --part-mb) and remove it.
write_sums_and_split() {
  local tmp name size limit n
  tmp=$(mktemp "$dir/.SHA256SUMS.XXXXXX")
  (
    cd "$dir"
    bundle_files | while IFS= read -r name; do sha256sum -- "$name"; done
    if [ -f SHA256SUMS ]; then
      part_groups | while IFS= read -r name; do
        [ -f "$name" ] || awk -v n="$name" '$2 == n || $2 == "*" n' SHA256SUMS
      done
    fi
  ) | sort -k2 > "$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$dir/SHA256SUMS"
  [ -n "$part_mb" ] || return 0
  limit=$((part_mb * 1024 * 1024))
  while IFS= read -r name; do
    size=$(stat -c %s "$dir/$name")
    [ "$size" -gt "$limit" ] || continue
    rm -f -- "$dir/$name".part-*
    split -b "${part_mb}M" -- "$dir/$name" "$dir/$name.part-"
    rm -f -- "$dir/$name"
    n=$(find "$dir" -maxdepth 1 -name "$name.part-*" | wc -l)
    log "split $name ($((size / 1024 / 1024)) MiB) into $n parts of ${part_mb} MiB"
  done < <(bundle_files)
}

# Join every NAME.part-* group into NAME, check it against SHA256SUMS (a bad join leaves the
# parts and no NAME), then check every file SHA256SUMS lists.
join_parts() {
  local name want got n bad=()
  mapfile -t groups < <(part_groups)
  if [ ${#groups[@]} -gt 0 ] && [ ! -f "$dir/SHA256SUMS" ]; then
    asc_die "$dir/SHA256SUMS is missing: cannot check the joined files"; return 1
  fi
  for name in "${groups[@]}"; do
    want=$(awk -v n="$name" '$2 == n || $2 == "*" n {print $1; exit}' "$dir/SHA256SUMS")
    if [ -z "$want" ]; then bad+=("$name: not listed in SHA256SUMS"); continue; fi
    cat -- "$dir/$name".part-* > "$dir/$name.joining"
    got=$(sha256sum < "$dir/$name.joining"); got=${got%% *}
    n=$(find "$dir" -maxdepth 1 -name "$name.part-*" | wc -l)
    if [ "$got" != "$want" ]; then
      rm -f -- "$dir/$name.joining"
      bad+=("$name: sha256 of its $n joined parts does not match SHA256SUMS (a part is damaged or missing; copy $name.part-* again)")
      continue
    fi
    mv -f -- "$dir/$name.joining" "$dir/$name"
    rm -f -- "$dir/$name".part-*
    log "joined $name from $n parts (sha256 ok)"
  done
  if [ ${#bad[@]} -gt 0 ]; then
    printf 'error: %s\n' "${bad[@]}" >&2; return 1
  fi
  if [ -f "$dir/SHA256SUMS" ]; then
    local out
    out=$(cd "$dir" && sha256sum -c --quiet SHA256SUMS 2>&1) || {
      printf '%s\n' "$out" >&2
      asc_die "files in $dir do not match SHA256SUMS (damaged or missing; copy them again)"; return 1
    }
    log "$(grep -c . "$dir/SHA256SUMS") files match SHA256SUMS"
  else
    log "no SHA256SUMS in $dir: nothing to check"
  fi
}

if [ "$mode" != download ]; then
  [ -d "$dir" ] || { asc_die "$dir: no such directory"; exit 1; }
  dir=$(cd "$dir" && pwd)
fi
case $mode in
  join)
    join_parts || exit 1
    log "$dir is ready: ASC_WHEELHOUSE=$dir bash launch/setup.sh (see $dir/INSTALL.txt)"
    exit 0 ;;
  split)
    write_sums_and_split
    split_names=$(part_groups)
    if [ -n "$split_names" ]; then
      echo "reassemble with: bash launch/offline_bundle.sh --join $dir   or:"
      echo "  cd $dir"
      while IFS= read -r name; do echo "  cat $name.part-* > $name"; done <<< "$split_names"
      echo "  sha256sum -c SHA256SUMS && rm -f -- *.part-*"
    fi
    exit 0 ;;
esac

# ---- download ---------------------------------------------------------------------------------

if [ -n "${ASC_PYTHON:-}" ] || [ -x "$ASC_ROOT/.venv/bin/python" ]; then
  py=$(asc_python) || exit 1
else
  py=python3  # no venv yet: pip download does not need asc-dist installed
  command -v "$py" >/dev/null 2>&1 || { asc_die "no python3 to run pip with; set ASC_PYTHON"; exit 1; }
fi
"$py" -m pip --version >/dev/null 2>&1 || { asc_die "'$py' has no pip (python -m pip)"; exit 1; }
[ -n "$pyver" ] || pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# pip does not widen a manylinux_2_N tag to older ones (only the legacy manylinux2014 alias).
platforms=("$platform")
if [[ $platform =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  for ((m = BASH_REMATCH[1] - 1; m >= 17; m--)); do platforms+=("manylinux_2_${m}_${BASH_REMATCH[2]}"); done
  platforms+=("manylinux2014_${BASH_REMATCH[2]}")  # pip adds manylinux2010 and manylinux1
elif [[ $platform =~ ^musllinux_1_([0-9]+)_(.+)$ ]]; then
  for ((m = BASH_REMATCH[1] - 1; m >= 1; m--)); do platforms+=("musllinux_1_${m}_${BASH_REMATCH[2]}"); done
fi
platforms+=(any)
target=(--only-binary=:all: --python-version "$pyver" --implementation cp)
for p in "${platforms[@]}"; do target+=(--platform "$p"); done

# The requirements from pyproject.toml (never a second copy of the pins here). A skipped name
# becomes a placeholder wheel without dependencies, required by direct URL, so that pip's
# resolver takes it instead of the real one wherever something depends on it (adabound needs
# torch) and fetches neither the real one nor what only that needs. Its version is the pin of
# pyproject.toml (as 2.11.0+asc.skipped, which satisfies ==2.11.0), else the newest on the index.
"$py" - "$ASC_ROOT/pyproject.toml" "$dev" "$skip" "$tmp" "${target[@]}" <<'EOF' || exit $?
import base64, hashlib, os, re, subprocess, sys, zipfile
from pathlib import Path
try:
    import tomllib
except ImportError:  # Python < 3.11: the copy pip vendors
    from pip._vendor import tomli as tomllib

path, dev, skip, tmp = sys.argv[1:5]
target = sys.argv[5:]
with open(path, "rb") as f:
    data = tomllib.load(f)
project = data["project"]
deps = list(project.get("dependencies", []))
dev_deps = list(project.get("optional-dependencies", {}).get("dev", []))
build = list(data.get("build-system", {}).get("requires", []))


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def name_of(req):
    return norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


wanted = deps + (dev_deps if dev == "1" else []) + build
known = {name_of(r) for r in deps + dev_deps + build}
skipped = {norm(s.strip()) for s in skip.split(",") if s.strip()}
unknown = sorted(skipped - known)
if unknown:
    print(f"error: --skip {','.join(unknown)}: not among the requirements of pyproject.toml "
          f"({', '.join(sorted(known))}) (see: bash launch/offline_bundle.sh --help)", file=sys.stderr)
    sys.exit(2)
lines = [r for r in wanted if name_of(r) not in skipped]

stubs = Path(tmp, "stubs")
stubs.mkdir()
for name in sorted(skipped):
    pins = [m.group(1) for r in wanted if name_of(r) == name
            for m in [re.search(r"===?\s*([0-9][A-Za-z0-9.!]*)\s*(?:[,;]|$)", r)] if m]
    if pins:
        version = pins[0]
    else:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, *target],
                             capture_output=True, text=True)
        m = re.match(r"\S+ \((\S+)\)", out.stdout)
        if not m:
            print(out.stderr.strip(), file=sys.stderr)
            print(f"error: --skip {name}: found no version of it for this target on the index "
                  "(pin it in pyproject.toml)", file=sys.stderr)
            sys.exit(1)
        version = m.group(1)
    version += "+asc.skipped"
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            "Summary: placeholder of launch/offline_bundle.sh --skip\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: asc-dist offline_bundle\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    wheel = stubs / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for arc, text in files.items():
            blob = text.encode()
            z.writestr(arc, blob)
            digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(blob)}\n")
        z.writestr(f"{info}/RECORD", "".join(record) + f"{info}/RECORD,,\n")
    lines.append(f"{name} @ {wheel.as_uri()}")
Path(tmp, "requirements.txt").write_text("".join(r + "\n" for r in lines))
Path(tmp, "skipped.txt").write_text("".join(n + "\n" for n in sorted(skipped)))
EOF
mapfile -t skipped < "$tmp/skipped.txt"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -n "$(part_groups)" ]; then
  log "joining the split files of the earlier bundle in $dir first (they are reused)"
  join_parts || exit 1
fi

log "CPython $pyver on ${platforms[*]}${skipped:+; leaving out ${skipped[*]}}"
if ! "$py" -m pip download "${target[@]}" -d "$dir" -r "$tmp/requirements.txt"; then
  rm -f -- "$dir"/*+asc.skipped-*.whl
  echo "error: pip could not get wheels of every requirement for CPython $pyver on $platform" \
       "(see pip's message above): --skip what has no wheel there, or change --python/--platform" >&2
  exit 1
fi
rm -f -- "$dir"/*+asc.skipped-*.whl  # the placeholders

# asc-dist's own wheel, from a clean copy of the checkout's files when it is a git checkout (a
# build in the tree would reuse its build/ folder, files deleted since included).
src=$ASC_ROOT
if command -v git >/dev/null 2>&1 && git -C "$ASC_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  src=$tmp/src; mkdir -p "$src"
  git -C "$ASC_ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ASC_ROOT" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done; true) \
    | tar -C "$ASC_ROOT" --null -T - -cf - | tar -C "$src" -xf -
fi
log "building the wheel of asc-dist"
if ! "$py" -m pip wheel -q --no-deps -w "$dir" "$src" > "$tmp/wheel.log" 2>&1; then
  cat "$tmp/wheel.log" >&2
  asc_die "pip could not build the wheel of asc-dist from $ASC_ROOT (see pip's message above)"; exit 1
fi

write_sums_and_split

# ---- how to use it ----------------------------------------------------------------------------
mapfile -t groups < <(part_groups)
nfiles=$(grep -c . "$dir/SHA256SUMS")
size=$(du -sh "$dir" | cut -f1)
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ASC_ROOT/pyproject.toml" | head -1)
extra=""; [ "$dev" = 1 ] && extra="[dev]"
instructions() {  # $1: the bundle's path in the commands, $2: a note on it
  local b=$1 name
  echo "asc-dist $version offline bundle: $nfiles wheels ($size) for CPython $pyver on $platform"
  echo "(and older manylinux / pure-Python wheels), made $(date -u +%Y-%m-%dT%H:%MZ) by launch/offline_bundle.sh."
  [ ${#skipped[@]} -eq 0 ] || echo "Left out (--skip), with whatever only they need: ${skipped[*]}"
  echo
  echo "1. Copy the folder to the node$2. Check every file (split ones are joined first):"
  echo "     bash launch/offline_bundle.sh --join $b      # from a checkout, or by hand:"
  echo "     cd $b"
  for name in "${groups[@]}"; do echo "     cat $name.part-* > $name"; done
  echo "     sha256sum -c SHA256SUMS && rm -f -- *.part-*"
  echo
  if [ ${#skipped[@]} -eq 0 ]; then
    echo "2. Install, with Python $pyver, from a checkout of asc-dist (makes .venv):"
    if [ "$dev" = 1 ]; then
      echo "     ASC_WHEELHOUSE=$b ASC_DEV=1 bash launch/setup.sh"
    else
      echo "     ASC_WHEELHOUSE=$b bash launch/setup.sh"
    fi
    echo "   or without a checkout, into the active environment:"
    echo "     python$pyver -m pip install --no-index --find-links $b 'asc-dist$extra'"
  else
    echo "2. The node's own Python $pyver environment must provide what was left out:"
    echo "     ${skipped[*]}"
    echo "   Install the rest into it without resolving against the pins (pip --no-deps), e.g. in"
    echo "   a venv made with 'python -m venv --system-site-packages' over the cluster's PyTorch:"
    echo "     python -m pip install --no-index --no-deps $b/*.whl"
    echo "   and run the launchers with ASC_PYTHON=\$(command -v python). (If that environment has"
    echo "   exactly the pinned versions, ASC_WHEELHOUSE=$b bash launch/setup.sh works too.)"
  fi
}
instructions BUNDLE " (BUNDLE below: its path there)" > "$dir/INSTALL.txt"
echo
instructions "$dir" ""
