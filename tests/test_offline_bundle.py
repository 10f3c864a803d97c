"""asc_dist.bundle (launch/offline_bundle.sh): its arguments, the split/join round trip on local
files (no network), the wrapper on a python without site-packages, and a real but small download
from the package index that then installs with pip's --no-index."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from asc_dist import bundle

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "offline_bundle.sh"
MIB = 1024 * 1024


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("ASC_")}
    e["ASC_PYTHON"] = sys.executable
    return e


def offline_pip_env() -> dict:
    """No index, proxy or find-links from pip's configuration: only what the command names."""
    e = {k: v for k, v in env().items() if not k.startswith("PIP_")}
    e["PIP_CONFIG_FILE"] = os.devnull
    return e


@pytest.fixture
def run(capfd, monkeypatch):
    """bundle.main in this process -> (exit status, stdout, stderr), pip's output included."""
    for k in [k for k in os.environ if k.startswith("ASC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("ASC_PYTHON", sys.executable)

    def main(*args: str) -> tuple[int, str, str]:
        code = bundle.main([str(a) for a in args])
        out, err = capfd.readouterr()
        return code, out, err

    return main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sums(d: Path) -> dict[str, str]:
    out = {}
    for line in (d / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.lstrip("*")] = digest
    return out


def parts(d: Path, name: str) -> list[Path]:
    return sorted(d.glob(f"{name}.part-*"))


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(run, flag):
    code, out, err = run(flag)
    assert code == 0, err
    usage = "usage: bash launch/offline_bundle.sh DIR [--python 3.12]"
    assert out.splitlines()[0].startswith(usage)
    for word in ("--platform", "--skip", "--part-mb", "--join DIR", "--split-only DIR",
                 "INSTALL.txt", "python -m asc_dist.bundle"):
        assert word in out


@pytest.mark.parametrize(
    "args,names",
    [
        ([], "DIR"),
        (["out", "--bogus"], "--bogus"),
        (["out", "other"], "other"),
        (["out", "--part-mb", "0"], "--part-mb"),
        (["out", "--part-mb", "1.5"], "--part-mb"),
        (["out", "--part-mb", "abc"], "--part-mb"),
        (["out", "--python", "3"], "--python"),
        (["out", "--python", "python3.12"], "--python"),
        (["out", "--python"], "--python"),
        (["out", "--platform", "many linux"], "--platform"),
        (["--split-only", "out"], "--part-mb"),
        (["--join", "--split-only", "out"], "--join"),
        (["out", "--skip", "torch,tourch"], "tourch"),  # a typo would download torch after all
        (["out", "--skip", ","], "--skip"),
        (["out", "--skip=torch;rm"], "torch;rm"),
    ],
)
def test_bad_arguments(run, tmp_path, monkeypatch, args, names):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(*args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and names in err
    assert not (tmp_path / "out").exists()  # nothing made, nothing downloaded


# ---- split and join, no network ----------------------------------------------------------------


def test_split_and_join_offline(run, tmp_path, monkeypatch):
    d = tmp_path / "bundle"
    d.mkdir()
    content = {
        "big-1.0-py3-none-any.whl": os.urandom(3 * MIB + 1000),  # 3 parts of 1 MiB + 1000 bytes
        "exact-1.0-py3-none-any.whl": os.urandom(MIB),  # not larger than 1 MiB: stays whole
        "small-1.0-py3-none-any.whl": os.urandom(200 * 1024),
    }
    for name, data in content.items():
        (d / name).write_bytes(data)
    want = {name: hashlib.sha256(data).hexdigest() for name, data in content.items()}
    big, small = "big-1.0-py3-none-any.whl", "small-1.0-py3-none-any.whl"

    monkeypatch.chdir(tmp_path)
    code, out, err = run("--split-only", "bundle", "--part-mb", "1")  # a relative DIR too
    assert code == 0, err
    assert sums(d) == want  # hashes of the files before splitting
    assert not (d / big).exists()
    suffixes = [p.name[len(big):] for p in parts(d, big)]
    assert suffixes == [".part-aa", ".part-ab", ".part-ac", ".part-ad"]
    assert [p.stat().st_size for p in parts(d, big)] == [MIB, MIB, MIB, 1000]
    assert (d / "exact-1.0-py3-none-any.whl").is_file() and (d / small).is_file()
    assert not parts(d, "exact-1.0-py3-none-any.whl") and not parts(d, small)
    assert f"cat {big}.part-* > {big}" in out and "sha256sum -c SHA256SUMS" in out
    assert "[offline_bundle] split big-1.0-py3-none-any.whl (3 MiB) into 4 parts" in err

    # Splitting again keeps the sum of the file that now exists only as parts.
    assert run("--split-only", d, "--part-mb", "1")[0] == 0
    assert sums(d) == want and len(parts(d, big)) == 4

    code, out, err = run("--join", "bundle")
    assert code == 0, err
    assert (d / big).read_bytes() == content[big]
    assert not list(d.glob("*.part-*")) and not list(d.glob("*.joining"))
    assert "3 files match SHA256SUMS" in err

    # A damaged part: the join fails naming the file, keeps the parts, leaves no half-joined file.
    run("--split-only", d, "--part-mb", "1")
    ab = d / f"{big}.part-ab"
    good = ab.read_bytes()
    ab.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    code, out, err = run("--join", d)
    assert code == 1, (out, err)
    assert err.startswith(f"error: {big}: sha256 of its 4 joined parts") and "Traceback" not in err
    assert not (d / big).exists() and len(parts(d, big)) == 4 and not list(d.glob("*.joining"))

    # A missing part fails the same way; with every part good again the join succeeds.
    ab.write_bytes(good)
    ad = d / f"{big}.part-ad"
    last = ad.read_bytes()
    ad.unlink()
    code, out, err = run("--join", d)
    assert code == 1 and big in err
    ad.write_bytes(last)
    assert run("--join", d)[0] == 0
    assert (d / big).read_bytes() == content[big]

    # A damaged whole (never split) file is caught by the final SHA256SUMS check.
    whole = content[small]
    (d / small).write_bytes(bytes([whole[0] ^ 0xFF]) + whole[1:])  # always a change (b"x" was not)
    code, out, err = run("--join", d)
    assert code == 1 and f"error: {small}: sha256 does not match" in err
    (d / small).unlink()
    code, out, err = run("--join", d)
    assert code == 1 and f"error: {small}: missing" in err

    # Parts without the SHA256SUMS to check them against, and no folder at all.
    (d / "SHA256SUMS").unlink()
    (d / "lone.whl.part-aa").write_bytes(b"x")
    code, out, err = run("--join", d)
    assert code == 1 and "SHA256SUMS is missing" in err
    code, out, err = run("--join", tmp_path / "nowhere")
    assert code == 1 and err == f"error: {tmp_path / 'nowhere'}: no such directory\n"


def test_wrapper_joins_with_nothing_but_the_standard_library(run, tmp_path):
    """The one run through the shell: bash launch/offline_bundle.sh on a python3 without any
    site-packages (python -S), as on a node before anything is installed, outside the checkout."""
    d = tmp_path / "bundle"
    d.mkdir()
    data = os.urandom(2 * MIB + 10)
    (d / "big-1.0-py3-none-any.whl").write_bytes(data)
    assert run("--split-only", d, "--part-mb", "1")[0] == 0
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    shim.chmod(0o755)
    bare = {"PATH": f"{shim.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "LC_ALL": "C"}

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=False, capture_output=True, text=True, env=bare,
                              cwd=tmp_path, timeout=60)

    assert sh("python3", "-c", "import omegaconf").returncode != 0  # really no site-packages
    p = sh("bash", str(SCRIPT), "--join", "bundle")
    assert p.returncode == 0, p.stderr
    assert (d / "big-1.0-py3-none-any.whl").read_bytes() == data and not parts(d, "big")
    assert "1 files match SHA256SUMS" in p.stderr
    (d / "big-1.0-py3-none-any.whl").write_bytes(b"damaged")
    p = sh("bash", str(SCRIPT), "--join", "bundle")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: big-1.0-py3-none-any.whl: sha256 does not match")


# ---- the download's parts, no network ----------------------------------------------------------


def test_platforms_take_the_older_tags_the_node_takes_too():
    tags = bundle.platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "any"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_16_x86_64" not in tags
    assert bundle.platforms("musllinux_1_2_aarch64") == [
        "musllinux_1_2_aarch64", "musllinux_1_1_aarch64", "any"]
    assert bundle.platforms("win_amd64") == ["win_amd64", "any"]


def test_a_skipped_name_becomes_an_empty_wheel_of_its_pinned_version(tmp_path):
    req = bundle.placeholder("torch", ["torch==2.11.0", "numpy"], sys.executable, [], tmp_path)
    wheel = tmp_path / "torch-2.11.0+asc.skipped-py3-none-any.whl"
    assert req == f"torch @ {wheel.as_uri()}"
    with zipfile.ZipFile(wheel) as z:
        meta = z.read("torch-2.11.0+asc.skipped.dist-info/METADATA").decode()
        assert "Version: 2.11.0+asc.skipped" in meta and "Requires-Dist" not in meta
        assert sorted(n.rsplit("/", 1)[1] for n in z.namelist()) == ["METADATA", "RECORD", "WHEEL"]


# ---- a real download (small: omegaconf's closure, adabound, setuptools, asc-dist) ---------------


@pytest.fixture(scope="session")
def index_reachable(tmp_path_factory):
    """The package index as pip is configured here; skip (with the reason) when it is not there."""
    out = tmp_path_factory.mktemp("probe")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
             str(out), "--timeout", "20", "--retries", "1", "omegaconf"],
            check=False, capture_output=True, text=True, env=env(), timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("package index unreachable: pip download timed out")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"package index unreachable: {last}")


def project() -> tuple[dict[str, str], str]:
    """Dependencies of pyproject.toml (normalised name -> requirement) and asc-dist's version."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {}
    for req in data["project"]["dependencies"]:
        deps[norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))] = req
    return deps, data["project"]["version"]


def whole_names(d: Path) -> set[str]:
    """Every file the bundle consists of, whole or split into parts."""
    names = {p.name for p in d.iterdir() if p.is_file() and ".part-" not in p.name}
    names |= {p.name.rsplit(".part-", 1)[0] for p in d.glob("*.part-*")}
    return names - {"SHA256SUMS", "INSTALL.txt"}


def wheel_project(filename: str) -> str:
    return norm(filename.split("-", 1)[0])


@pytest.mark.slow
def test_real_download_then_offline_install(run, tmp_path, index_reachable):
    deps, version = project()
    assert "omegaconf" in deps
    keep = {"omegaconf", "adabound"} & deps.keys()  # adabound needs torch: skipped below
    skip = sorted(deps.keys() - keep)
    assert "torch" in skip
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = "3.12" if here != "3.12" else "3.13"

    # 1. For another Python than this one: the wheels of that version, split, listed, rejoined.
    d = tmp_path / f"bundle-{other}"
    code, out, err = run(d, "--python", other, "--part-mb", "1", "--skip", ",".join(skip))
    assert code == 0, out[-3000:] + err[-3000:]
    names = whole_names(d)
    projects = {wheel_project(n) for n in names}
    assert f"asc_dist-{version}-py3-none-any.whl" in names
    assert any(re.fullmatch(r"omegaconf-[^-]+-py3-none-any\.whl", n) for n in names)
    assert keep <= projects and "pyyaml" in projects and "setuptools" in projects  # + build backend
    tag = "cp" + other.replace(".", "")
    assert all(f"-{tag}-" in n for n in names if n.startswith("pyyaml-")), names
    assert not projects & set(skip), names  # neither the skipped nor torch through adabound
    assert not any("+asc.skipped" in n for n in names)  # no placeholder left behind
    assert set(sums(d)) == names
    split = {n for n in names if parts(d, n)}
    for n in names:
        if n in split:
            sizes = [p.stat().st_size for p in parts(d, n)]
            assert not (d / n).exists() and sum(sizes) > MIB and set(sizes[:-1]) == {MIB}
            assert 0 < sizes[-1] <= MIB
        else:
            assert (d / n).stat().st_size <= MIB  # every larger file was split
    fetched = sum(p.stat().st_size for p in d.iterdir())
    print(
        f"bundle for {other}: {len(names)} files, {fetched / MIB:.2f} MiB, split: {sorted(split)}"
    )
    install = (d / "INSTALL.txt").read_text()
    assert "--no-deps" in install and "torch" in install and "sha256sum -c SHA256SUMS" in install
    assert "BUNDLE" in install and str(d) in out and f"CPython {other}" in install
    assert run("--join", d)[0] == 0
    assert not list(d.glob("*.part-*"))
    assert {n: sha256(d / n) for n in names} == sums(d)

    # 2. For this Python: installs with no index at all, and builds a project with asc-dist's
    #    build backend from the bundle (what setup.sh's editable install from it needs).
    d = tmp_path / f"bundle-{here}"
    code, out, err = run(d, "--python", here, "--part-mb", "1", "--skip", ",".join(skip))
    assert code == 0, out[-3000:] + err[-3000:]
    assert run("--join", d)[0] == 0

    def pip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                              check=False, capture_output=True, text=True, env=offline_pip_env(),
                              timeout=180)

    target = tmp_path / "target"
    r = pip("install", "-q", "--no-index", "--find-links", str(d), "--target", str(target),
            "omegaconf")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import omegaconf, yaml; print(omegaconf.__file__, yaml.__file__)"],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**offline_pip_env(), "PYTHONPATH": str(target)},
    )
    assert r.returncode == 0, r.stderr
    assert all(f.startswith(str(target)) for f in r.stdout.split()), r.stdout  # not the venv's
    pin = re.search(r"==\s*([^,;\s]+)", deps["omegaconf"])
    if pin:
        assert list(target.glob(f"omegaconf-{pin.group(1)}.dist-info"))

    # The --skip recipe of INSTALL.txt: every wheel of the bundle with --no-deps.
    target2 = tmp_path / "target2"
    r = pip("install", "-q", "--no-index", "--no-deps", "--target", str(target2),
            *map(str, sorted(d.glob("*.whl"))))
    assert r.returncode == 0, r.stderr
    assert (target2 / "asc_dist" / "conf" / "config.yaml").is_file()
    assert (target2 / "asc_dist" / "bundle.py").is_file()
    assert (target2 / "adabound").is_dir()

    probe = tmp_path / "probe"
    probe.mkdir()
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    (probe / "pyproject.toml").write_text(
        f"[build-system]\nrequires = {json.dumps(build['requires'])}\n"
        + f'build-backend = "{build["build-backend"]}"\n'
        '[project]\nname = "asc-probe"\nversion = "0"\n[tool.setuptools]\npy-modules = []\n'
    )
    r = pip("wheel", "-q", "--no-index", "--find-links", str(d), "--no-deps", "-w",
            str(tmp_path / "probe-out"), str(probe))
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "probe-out").glob("asc_probe-0-*.whl"))
