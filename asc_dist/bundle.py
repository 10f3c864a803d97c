"""An offline bundle: every wheel asc-dist needs, for GPU nodes without internet (see --help).

Standard library only, and --join and --split-only run on Python 3.6 too (no ``from __future__
import annotations`` therefore): a node runs them from the source tree, with whatever python3 it
has, before anything is installed. pip runs as a subprocess: downloading needs no asc-dist either.
"""

import argparse
import base64
import hashlib
import itertools
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROG = "bash launch/offline_bundle.sh"
MIB = 1024 * 1024
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a project name as requirements start with it
SUFFIXES = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]  # split's
USAGE = f"""{PROG} DIR [--python 3.12] [--platform manylinux_2_28_x86_64]
       {" " * len(PROG)} [--skip torch,torchvision,torchaudio] [--dev] [--part-mb 60]
       {PROG} --join DIR
       {PROG} --split-only DIR --part-mb N
       (or: python -m asc_dist.bundle ..., in the checkout)"""
ABOUT = """\
Downloads every wheel asc-dist needs for one target Python and platform into DIR, for GPU nodes
without internet: the dependencies of pyproject.toml with everything they depend on, the build
backend (setup.sh's editable install needs it) and the wheel of asc-dist itself. On the node:
ASC_WHEELHOUSE=DIR bash launch/setup.sh, or pip install --no-index --find-links DIR asc-dist
(DIR/INSTALL.txt says how; the end of the run prints it)."""
NOTES = """\
DIR may hold an earlier bundle for the same target: wheels already there are not fetched again.
pip runs with ASC_PYTHON (default .venv/bin/python, else python3) and its own configuration
(index, proxy: PIP_INDEX_URL, pip.conf). --join and --split-only need nothing but python3."""


class BundleError(Exception):
    """An expected failure: each argument is one line of the message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the option, not argparse's usage block
        self.exit(2, f"error: {message} (see: {PROG} --help)\n")


def log(msg: str) -> None:
    print(f"[offline_bundle] {msg}", file=sys.stderr, flush=True)


def name_of(req: str) -> str:
    """The normalised project name a requirement starts with."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*(" + NAME + ")", req)[1]).lower()


def parse(argv) -> argparse.Namespace:
    p = _Parser(prog=PROG, usage=USAGE, description=ABOUT, epilog=NOTES, allow_abbrev=False,
                formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=96))
    p.add_argument("dir", nargs="?", metavar="DIR", help="the bundle folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--join", action="store_true", help="on the node: join the *.part-* files "
                      "of DIR back, check SHA256SUMS, remove the parts")
    mode.add_argument("--split-only", action="store_true",
                      help="no download: (re)write DIR/SHA256SUMS and split with --part-mb N")
    p.add_argument("--python", metavar="X.Y",
                   help="the node's Python (default: that of the python running pip)")
    p.add_argument("--platform", metavar="TAG", default="manylinux_2_28_x86_64",
                   help="the node's wheel platform (default %(default)s); older manylinux tags "
                   "and pure-Python wheels are taken too")
    p.add_argument("--skip", metavar="a,b", help="leave out these dependencies and whatever only "
                   "they need, e.g. for nodes with their own PyTorch: --skip torch,torchvision,"
                   "torchaudio (such a bundle installs with pip's --no-deps next to the node's "
                   "torch; see INSTALL.txt)")
    p.add_argument("--dev", action="store_true", help="also the dev extra (pytest, librosa, ruff)")
    p.add_argument("--part-mb", metavar="N", help="split each file larger than N MiB into "
                   "NAME.part-aa, NAME.part-ab, ... (upload limits); DIR/SHA256SUMS, always "
                   "written, checks the reassembly")
    a = p.parse_args(argv)
    for opt, value, pattern, what in (
        ("--python", a.python, r"3\.[0-9]{1,2}", "a Python version like 3.12"),
        ("--platform", a.platform, r"[A-Za-z0-9_.]+", "a platform tag like manylinux_2_28_x86_64"),
        ("--part-mb", a.part_mb, r"[1-9][0-9]*", "a positive integer (MiB)"),
        ("--skip", a.skip, rf"\s*{NAME}\s*(,\s*({NAME}\s*)?)*", "a list of names like torch,tqdm"),
    ):
        if value is not None and not re.fullmatch(pattern, value):
            p.error(f"{opt} '{value}' is not {what}")
    if a.dir is None:
        p.error("missing the DIR argument (the bundle folder)")
    if a.split_only and a.part_mb is None:
        p.error("--split-only needs --part-mb N")
    a.part_mb = int(a.part_mb or 0)
    a.skipped = sorted({name_of(s) for s in (a.skip or "").split(",") if s.strip()})
    if not (a.join or a.split_only):
        a.project = read_project()
        known = {name_of(r) for r in requirements(a.project, dev=True)}
        unknown = [s for s in a.skipped if s not in known]
        if unknown:  # checked before anything is fetched: a typo would download torch after all
            p.error(f"--skip {','.join(unknown)}: not among the requirements of pyproject.toml "
                    f"({', '.join(sorted(known))})")
    return a


def read_project() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the copy pip vendors
        from pip._vendor import tomli as tomllib
    if not (ROOT / "pyproject.toml").is_file():
        raise BundleError(f"{ROOT}/pyproject.toml is missing: download from a checkout of asc-dist")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def requirements(project: dict, dev: bool) -> list:
    """The dependencies, the dev extra if asked for, and the build backend."""
    extra = project["project"].get("optional-dependencies", {}).get("dev", []) if dev else []
    return [*project["project"].get("dependencies", []), *extra,
            *project.get("build-system", {}).get("requires", [])]


# ---- SHA256SUMS, splitting and joining: no network, no pip --------------------------------------


def sha256(*paths: Path, out=None) -> str:
    """The digest of the files one after another, written to ``out`` too if given."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(MIB), b""):
                h.update(block)
                if out is not None:
                    out.write(block)
    return h.hexdigest()


def whole_files(d: Path) -> list:
    """What the bundle consists of, less our bookkeeping, parts and half-joined files."""
    return sorted(p.name for p in d.iterdir() if p.is_file() and ".part-" not in p.name
                  and p.name not in ("SHA256SUMS", "INSTALL.txt")
                  and not p.name.endswith(".joining") and not p.name.startswith("."))


def parts_of(d: Path) -> dict:
    """NAME -> its NAME.part-* files, in order."""
    groups: dict = {}
    for p in sorted(d.glob("*.part-*")):
        if p.is_file():
            groups.setdefault(p.name.rsplit(".part-", 1)[0], []).append(p)
    return groups


def read_sums(d: Path):
    """NAME -> sha256 from DIR/SHA256SUMS; None without one."""
    if not (d / "SHA256SUMS").is_file():
        return None
    lines = (line.partition(" ") for line in (d / "SHA256SUMS").read_text().splitlines())
    return {name[1:]: digest for digest, _, name in lines if name}  # "HASH  NAME" or "HASH *NAME"


def write_sums_and_split(d: Path, part_mb) -> None:
    old = read_sums(d) or {}
    sums = {name: sha256(d / name) for name in whole_files(d)}
    sums.update({n: old[n] for n in parts_of(d) if n not in sums and n in old})  # already split
    tmp = d / f".SHA256SUMS.{os.getpid()}"
    tmp.write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    tmp.chmod(0o644)
    os.replace(tmp, d / "SHA256SUMS")  # never a half-written list
    for name in whole_files(d) if part_mb else []:
        size, limit = (d / name).stat().st_size, part_mb * MIB
        n = -(-size // limit)
        if n < 2:
            continue
        if n > len(SUFFIXES):
            raise BundleError(f"{name}: {n} parts are more than {len(SUFFIXES)}: raise --part-mb")
        for stale in parts_of(d).get(name, []):
            stale.unlink()
        with open(d / name, "rb") as f:
            for suffix in SUFFIXES[:n]:
                with open(d / f"{name}.part-{suffix}", "wb") as out:
                    out.writelines(f.read(MIB) for _ in range(part_mb))  # not all in memory
        (d / name).unlink()
        log(f"split {name} ({size // MIB} MiB) into {n} parts of {part_mb} MiB")


def join(d: Path) -> None:
    """Join every NAME.part-* group into NAME (one that does not match its sum leaves its parts
    and no NAME, to be copied again), then check every file SHA256SUMS lists."""
    groups, sums = parts_of(d), read_sums(d)
    if groups and sums is None:
        raise BundleError(f"{d}/SHA256SUMS is missing: cannot check the joined files")
    bad = [f"{name}: not listed in SHA256SUMS" for name in groups if name not in sums]
    for name, pieces in groups.items():
        if name not in sums:
            continue
        with open(d / f"{name}.joining", "wb") as out:
            got = sha256(*pieces, out=out)
        if got != sums[name]:
            (d / f"{name}.joining").unlink()
            bad.append(f"{name}: sha256 of its {len(pieces)} joined parts does not match "
                       f"SHA256SUMS (a part is damaged or missing; copy {name}.part-* again)")
            continue
        os.replace(d / f"{name}.joining", d / name)
        for p in pieces:
            p.unlink()
        log(f"joined {name} from {len(pieces)} parts (sha256 ok)")
    if bad:
        raise BundleError(*bad)
    if sums is None:
        log(f"no SHA256SUMS in {d}: nothing to check")
        return
    wrong = [f"{n}: missing" if not (d / n).is_file() else f"{n}: sha256 does not match"
             for n, digest in sums.items()
             if n not in groups and (not (d / n).is_file() or sha256(d / n) != digest)]
    if wrong:
        raise BundleError(*wrong, f"files in {d} do not match SHA256SUMS (damaged or missing; "
                          "copy them again)")
    log(f"{len(sums)} files match SHA256SUMS")


# ---- download -----------------------------------------------------------------------------------


def pip_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    py = os.environ.get("ASC_PYTHON") or (str(venv) if os.access(venv, os.X_OK) else "python3")
    found = shutil.which(py)
    if found is None:
        raise BundleError(f"python '{py}' not found: set ASC_PYTHON to a python with pip")
    if subprocess.run([found, "-m", "pip", "--version"], check=False,
                      capture_output=True).returncode != 0:
        raise BundleError(f"'{py}' has no pip (python -m pip)")
    return found


def platforms(tag: str) -> list:
    """The tag and the older ones its node takes too: pip does not widen manylinux_2_N itself."""
    tags = [tag]
    m = re.fullmatch(r"manylinux_2_([0-9]+)_(.+)", tag)
    if m:  # down to 2_17 = manylinux2014; pip adds manylinux2010 and manylinux1 to that
        tags += [f"manylinux_2_{n}_{m[2]}" for n in range(int(m[1]) - 1, 16, -1)]
        tags.append(f"manylinux2014_{m[2]}")
    m = re.fullmatch(r"musllinux_1_([0-9]+)_(.+)", tag)
    if m:
        tags += [f"musllinux_1_{n}_{m[2]}" for n in range(int(m[1]) - 1, 0, -1)]
    return tags + ["any"]


def placeholder(name: str, wanted: list, py: str, target: list, tmp: Path) -> str:
    """A requirement on an empty wheel of a skipped name: pip's resolver takes it wherever
    something depends on the name (adabound needs torch), so it fetches neither the real one nor
    what only that needs. Its version is the pin of pyproject.toml (as 2.11.0+asc.skipped, which
    satisfies ==2.11.0), else the newest on the index."""
    pins = [m[1] for r in wanted if name_of(r) == name
            for m in [re.search(r"===?\s*([0-9][A-Za-z0-9.!]*)\s*(?:[,;]|$)", r)] if m]
    if not pins:
        r = subprocess.run([py, "-m", "pip", "index", "versions", name, *target], check=False,
                           capture_output=True, text=True)
        pins = re.findall(r"^\S+ \((\S+)\)", r.stdout)
        if not pins:
            sys.stderr.write(r.stderr)
            raise BundleError(f"--skip {name}: found no version of it for this target on the "
                              "index (pin it in pyproject.toml)")
    version, dist = pins[0] + "+asc.skipped", name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digests = {arc: base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
               for arc, text in files.items()}
    files[f"{info}/RECORD"] = "".join(f"{arc},sha256={digests[arc].decode()},{len(text)}\n"
                                      for arc, text in files.items()) + f"{info}/RECORD,,\n"
    wheel = tmp / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
    return f"{name} @ {wheel.as_uri()}"


def own_wheel(py: str, d: Path, tmp: Path) -> None:
    # Built from a copy of a git checkout's files: a build in the tree would reuse its build/
    # folder, files deleted since included.
    src, git = ROOT, shutil.which("git")
    listed = git and subprocess.run([git, "-C", str(ROOT), "ls-files", "-z", "--cached",
                                     "--others", "--exclude-standard"],
                                    check=False, capture_output=True)
    if listed and listed.returncode == 0:
        src = tmp / "src"
        for rel in filter(None, os.fsdecode(listed.stdout).split("\0")):
            if (ROOT / rel).is_file():  # not deleted since it was added
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel, follow_symlinks=False)
    log("building the wheel of asc-dist")
    r = subprocess.run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(d), str(src)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise BundleError(f"pip could not build the wheel of asc-dist from {ROOT} (see pip's "
                          "message above)")


def download(a: argparse.Namespace, d: Path) -> None:
    py = pip_python()
    pyver = a.python or subprocess.run(
        [py, "-c", 'import sys; print("%d.%d" % sys.version_info[:2])'],
        check=True, capture_output=True, text=True).stdout.strip()
    tags = platforms(a.platform)
    target = ["--only-binary=:all:", "--python-version", pyver, "--implementation", "cp"]
    target += [arg for tag in tags for arg in ("--platform", tag)]
    wanted = requirements(a.project, a.dev)
    with tempfile.TemporaryDirectory() as tmp:
        reqs = [r for r in wanted if name_of(r) not in a.skipped]
        reqs += [placeholder(name, wanted, py, target, Path(tmp)) for name in a.skipped]
        Path(tmp, "requirements.txt").write_text("".join(r + "\n" for r in reqs))
        d.mkdir(parents=True, exist_ok=True)
        if parts_of(d):
            log(f"joining the split files of the earlier bundle in {d} first (they are reused)")
            join(d)
        log(f"CPython {pyver} on {' '.join(tags)}"
            + (f"; leaving out {' '.join(a.skipped)}" if a.skipped else ""))
        pip = [py, "-m", "pip", "download", *target, "-d", str(d), "-r", f"{tmp}/requirements.txt"]
        fetched = subprocess.run(pip, check=False).returncode == 0
        for stub in d.glob("*+asc.skipped-*.whl"):
            stub.unlink()
        if not fetched:
            raise BundleError(f"pip could not get wheels of every requirement for CPython {pyver} "
                              f"on {a.platform} (see pip's message above): --skip what has no "
                              "wheel there, or change --python/--platform")
        own_wheel(py, d, Path(tmp))
    write_sums_and_split(d, a.part_mb)
    text = install_text(a, d, pyver)
    (d / "INSTALL.txt").write_text(text.format(b="BUNDLE", where=" (BUNDLE below: its path there)"))
    print("\n" + text.format(b=d, where=""), end="")


INSTALL = """\
asc-dist {version} offline bundle: {n} wheels ({mib:.0f} MiB) for CPython {pyver} on {platform}
(and older manylinux / pure-Python wheels), made {made} by launch/offline_bundle.sh.
{left_out}
1. Copy the folder to the node{{where}}. Check every file (split ones are joined first):
     bash launch/offline_bundle.sh --join {{b}}      # from a checkout, or by hand:
     cd {{b}}
{cats}     sha256sum -c SHA256SUMS && rm -f -- *.part-*

"""
INSTALL_ALL = """\
2. Install, with Python {pyver}, from a checkout of asc-dist (makes .venv):
     ASC_WHEELHOUSE={{b}} {dev}bash launch/setup.sh
   or without a checkout, into the active environment:
     python{pyver} -m pip install --no-index --find-links {{b}} 'asc-dist{extra}'
"""
INSTALL_SKIPPED = """\
2. The node's own Python {pyver} environment must provide what was left out:
     {skipped}
   Install the rest into it without resolving against the pins (pip --no-deps), e.g. in
   a venv made with 'python -m venv --system-site-packages' over the cluster's PyTorch:
     python -m pip install --no-index --no-deps {{b}}/*.whl
   and run the launchers with ASC_PYTHON=$(command -v python). (If that environment has
   exactly the pinned versions, ASC_WHEELHOUSE={{b}} bash launch/setup.sh works too.)
"""


def install_text(a: argparse.Namespace, d: Path, pyver: str) -> str:
    """INSTALL.txt, still to be formatted with the bundle's path (b) and a note on it (where)."""
    skipped = " ".join(a.skipped)
    return (INSTALL + (INSTALL_SKIPPED if skipped else INSTALL_ALL)).format(
        version=a.project["project"].get("version", "?"), n=len(read_sums(d)), pyver=pyver,
        mib=sum(p.stat().st_size for p in d.iterdir() if p.is_file()) / MIB,
        platform=a.platform, made=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        left_out=f"Left out (--skip), with whatever only they need: {skipped}\n" if skipped else "",
        cats="".join(f"     cat {name}.part-* > {name}\n" for name in parts_of(d)),
        skipped=skipped, dev="ASC_DEV=1 " if a.dev else "", extra="[dev]" if a.dev else "")


def main(argv=None) -> int:
    try:
        a = parse(argv)
        d = Path(os.path.abspath(a.dir))
        if (a.join or a.split_only) and not d.is_dir():
            raise BundleError(f"{a.dir}: no such directory")
        if a.join:
            join(d)
            log(f"{d} is ready: ASC_WHEELHOUSE={d} bash launch/setup.sh (see {d}/INSTALL.txt)")
        elif a.split_only:
            write_sums_and_split(d, a.part_mb)
            cats = "".join(f"  cat {name}.part-* > {name}\n" for name in parts_of(d))
            if cats:
                print(f"reassemble with: {PROG} --join {d}   or:\n  cd {d}\n{cats}"
                      "  sha256sum -c SHA256SUMS && rm -f -- *.part-*")
        else:
            download(a, d)
    except SystemExit as e:  # from argparse: --help, or a usage error it has printed
        return int(e.code or 0)
    except BundleError as e:
        print("".join(f"error: {line}\n" for line in e.args), end="", file=sys.stderr)
        return 1
    except OSError as e:  # a file or folder that cannot be read or written: its own words
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
