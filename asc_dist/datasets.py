"""Download the DCASE acoustic scene datasets, resumably and verified.

    python -m asc_dist.datasets list [--json] [--registry FILE]
    python -m asc_dist.datasets fetch NAME DIR [--jobs N] [--mirror URL] [--registry FILE]

The registry lists each dataset's files with their size and MD5; a file's URL is ``base_url`` +
its name (``--mirror URL`` swaps the base URL). The built-in entries, in the data file
``asc_dist/datasets.yaml``, are the Zenodo records as dcase_util lists them (the ``package_list``
of its dataset classes, dcase_util/datasets/tut.py); ``--registry FILE`` adds a YAML or JSON file
of the same format, whose entries replace built-in ones of the same name::

    datasets:
      my-dataset:
        base_url: https://host/path/
        files:
          - {name: my-dataset.meta.zip, bytes: 69272, md5: e196065ee83c07af03a11a310364377d}

Each file is written as ``NAME.part`` beside its final name and renamed only once its size and
hash are right, so a final name always holds a verified file. A dropped connection or a rerun
continues the ``.part`` with an HTTP Range request (the bytes already there are hashed first); a
server that ignores Range is read from the start. Failed requests are retried with exponential
backoff. A file whose hash is wrong is downloaded once more from zero, then refused. Files already
present and verified are not downloaded again. :func:`fetch_all` is the one downloader, also used
by :mod:`asc_dist.weights`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from http.client import HTTPException
from importlib import resources
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import yaml

from asc_dist.atomic import free_space, fsync_dir, human_bytes
from asc_dist.cli import command
from asc_dist.errors import ConfigError, FetchError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read and per progress step; tests shrink it
RETRIES = 4  # retries per file after a failed request; bytes received reset the count
BACKOFF_S = 1.0  # first wait before a retry, doubled each time (1+2+4+8 s)
TIMEOUT_S = 60.0  # a connection silent this long counts as dropped
# Status codes worth retrying; any other HTTP error is an answer (404: wrong URL).
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}

# The built-in registry: a data file shipped in the package (pyproject.toml's package-data), in
# --registry FILE's format, every value cited there.
BUILTIN = "datasets.yaml"


class NetworkError(FetchError):
    """The server could not be reached or kept failing; the message names the URL."""


class _Stopped(Exception):
    """Another file failed: this one stops where it is, its ``.part`` kept for the next run."""


# -- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    name: str
    bytes: int
    md5: str


@dataclass(frozen=True)
class Dataset:
    name: str
    base_url: str
    files: tuple[RemoteFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


_MD5 = re.compile(r"[0-9a-f]{32}")


def folder_url(url: object, where: str) -> str:
    """``url`` checked, ending in ``/``: file names are appended to it."""
    parts = urlparse(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: expected an http(s) URL, got {url!r}")
    return url if url.endswith("/") else url + "/"


def _keys(obj: object, where: str, required: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping with {sorted(required)}, got {obj!r}")
    if obj.keys() != required:
        extra, missing = sorted(map(str, obj.keys() - required)), sorted(required - obj.keys())
        what = f"unknown field(s) {extra}" if extra else f"missing field(s) {missing}"
        raise ConfigError(f"{where}: {what}; expected exactly {sorted(required)}")
    return obj


def parse_registry(data: object, source: str) -> dict[str, Dataset]:
    """The datasets of a registry document; a ConfigError naming ``source`` and the field."""
    datasets = _keys(data, source, {"datasets"})["datasets"]
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"{source}: datasets: expected a mapping of name -> entry")
    out = {}
    for name, entry in datasets.items():
        where = f"{source}: datasets.{name}"
        entry = _keys(entry, where, {"base_url", "files"})
        base = folder_url(entry["base_url"], f"{where}.base_url")
        if not isinstance(entry["files"], list) or not entry["files"]:
            raise ConfigError(f"{where}.files: expected a non-empty list of files")
        files, seen = [], set()
        for i, f in enumerate(entry["files"]):
            at = f"{where}.files[{i}]"
            f = _keys(f, at, {"name", "bytes", "md5"})
            fname, size, md5 = f["name"], f["bytes"], f["md5"]
            if not isinstance(fname, str) or fname in ("", ".", "..") or re.search(r"[/\\]", fname):
                raise ConfigError(f"{at}.name: expected a plain file name, got {fname!r}")
            if fname in seen:
                raise ConfigError(f"{at}.name: {fname} is listed twice")
            if type(size) is not int or size <= 0:
                raise ConfigError(f"{at}.bytes: expected a positive integer, got {size!r}")
            # YAML reads an all-digit MD5 as a number: only a quoted string is taken
            if not isinstance(md5, str) or not _MD5.fullmatch(md5.lower()):
                raise ConfigError(f"{at}.md5: expected 32 hex digits as a string, got {md5!r}")
            seen.add(fname)
            files.append(RemoteFile(fname, size, md5.lower()))
        out[str(name)] = Dataset(str(name), base, tuple(files))
    return out


def builtin_registry() -> dict[str, Dataset]:
    """The registry shipped with the package (``asc_dist/datasets.yaml``), from a checkout or a
    wheel alike."""
    text = resources.files("asc_dist").joinpath(BUILTIN).read_text(encoding="utf-8")
    return parse_registry(yaml.safe_load(text), f"built-in registry (asc_dist/{BUILTIN})")


def load_registry(path: str | Path | None = None) -> dict[str, Dataset]:
    """The built-in registry, merged with the user's file at ``path`` if given."""
    registry = builtin_registry()
    if path is None:
        return registry
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"registry {path}: cannot parse it: {str(e).splitlines()[0]}") from None
    for name, ds in parse_registry(data, f"registry {path}").items():
        if name in registry:
            log.info("registry %s replaces the built-in entry %s", path, name)
        registry[name] = ds
    return registry


# -- the downloader -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Remote:
    """One file to fetch: ``digest`` is the expected hex digest of ``algo``, or a prefix of it
    (torchvision names its files by a sha256 prefix; empty: nothing known to check it by);
    ``size`` is None when unknown. ``require_length``: refuse a server that does not say the
    file's length (with nothing else to check, a cut download would pass for the file)."""

    url: str
    dest: Path
    digest: str
    algo: str = "md5"
    size: int | None = None
    require_length: bool = False

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")


def mismatch(remote: Remote, digest: str, size: int) -> str | None:
    """What is wrong with a file of ``size`` bytes hashing to ``digest``, or None if nothing."""
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, expected {remote.size}"
    if not digest.startswith(remote.digest.lower()):
        prefix = "..." if len(remote.digest) < len(digest) else ""
        return f"{remote.algo.upper()} is {digest}, expected {remote.digest}{prefix}"
    return None


def _hash_file(path: Path, h) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(max(CHUNK, 1 << 20)):
            h.update(chunk)
            n += len(chunk)
    return n


def file_digest(path: Path, algo: str) -> tuple[str, int]:
    """The hex digest and size of the file at ``path``."""
    h = hashlib.new(algo)
    n = _hash_file(path, h)
    return h.hexdigest(), n


def _on_disk(r: Remote) -> int:
    """Bytes of ``r`` already here (its final file of the right size, or a partial one)."""
    for p in (r.dest, r.part):
        if p.is_file() and (r.size is None or p.stat().st_size <= r.size):
            return p.stat().st_size
    return 0


class _Progress:
    """One bar per file and a total; tqdm draws nothing when stderr is not a terminal."""

    def __init__(self, remotes: list[Remote]) -> None:
        from tqdm import tqdm

        self._tqdm, self._lock = tqdm, threading.Lock()
        self.downloaded = 0
        sizes = [r.size for r in remotes]
        self.total = tqdm(total=None if None in sizes else sum(sizes), desc="total", unit="B",
                          unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=None,
                          initial=sum(_on_disk(r) for r in remotes))

    def file(self, r: Remote):
        return self._tqdm(total=r.size, desc=r.dest.name, unit="B", unit_scale=True,
                          unit_divisor=1024, leave=False, file=sys.stderr, disable=None)

    def add(self, bar, n: int) -> None:
        bar.update(n)
        with self._lock:
            self.total.update(n)
            self.downloaded += max(n, 0)


def _download(r: Remote, progress: _Progress, stop: threading.Event) -> tuple[str, int]:
    """Bring ``r.part`` to the remote's full content; its hex digest and size."""
    h = hashlib.new(r.algo)
    have = r.part.stat().st_size if r.part.is_file() else 0
    if r.size is not None and have > r.size:
        have = 0
    if have:
        _hash_file(r.part, h)
        log.info("%s: resuming at %s of %s", r.dest.name, human_bytes(have),
                 human_bytes(r.size) if r.size else "?")
    total, failures = r.size, 0
    bar = progress.file(r)
    bar.update(have)
    try:
        while total is None or have < total:
            got = 0
            headers = {"User-Agent": "asc-dist", **({"Range": f"bytes={have}-"} if have else {})}
            try:
                with urlopen(Request(r.url, headers=headers), timeout=TIMEOUT_S) as resp:
                    if have and resp.status != 206:  # Range ignored: this answer starts at zero
                        log.info("%s: the server ignores Range; downloading from zero", r.url)
                        progress.add(bar, -have)
                        have, h = 0, hashlib.new(r.algo)
                    if total is None:
                        total = _length(resp, have)
                        if total is None and r.require_length:
                            raise FetchError(f"{r.url}: the server does not say the file's length "
                                             f"(Content-Length) and no checksum is known: a cut "
                                             f"download could not be told from the whole file")
                    with open(r.part, "ab" if have else "wb") as f:
                        while chunk := resp.read(CHUNK):
                            if stop.is_set():
                                raise _Stopped
                            f.write(chunk)
                            h.update(chunk)
                            have += len(chunk)
                            got += len(chunk)
                            progress.add(bar, len(chunk))
                        f.flush()
                        os.fsync(f.fileno())
                if total is None or have >= total:
                    break  # with no length known, the end of the answer is the end of the file
                if got:
                    log.info("%s: the connection closed at %s of %s; resuming", r.dest.name,
                             human_bytes(have), human_bytes(total))
                    failures = 0
                    continue
                reason = "the server sent no data"
            except HTTPError as e:
                if e.code == 416 and have:  # the partial file is not a prefix of this one
                    log.info("%s: the server refuses to resume; downloading from zero", r.url)
                    progress.add(bar, -have)
                    have, h = 0, hashlib.new(r.algo)
                    r.part.unlink(missing_ok=True)
                    continue
                if e.code not in _TRANSIENT:
                    raise FetchError(f"cannot download {r.url}: HTTP {e.code} {e.reason}") from None
                reason = f"HTTP {e.code} {e.reason}"
            except (URLError, HTTPException, ConnectionError, TimeoutError) as e:
                reason = str(getattr(e, "reason", None) or e) or type(e).__name__
            failures = 1 if got else failures + 1
            if failures > RETRIES:
                kept = f"; {human_bytes(have)} kept in {r.part}, rerun to resume" if have else ""
                raise NetworkError(f"cannot download {r.url}: {reason} "
                                   f"({RETRIES + 1} tries){kept}")
            wait = BACKOFF_S * 2 ** (failures - 1)
            log.warning("%s: %s; retry %d of %d in %.0f s", r.dest.name, reason, failures, RETRIES,
                        wait)
            if stop.wait(wait):
                raise _Stopped
    finally:
        bar.close()
    return h.hexdigest(), have


def _length(resp, offset: int) -> int | None:
    """The whole file's size from a response's headers, if they say."""
    m = re.fullmatch(r"bytes \d+-\d+/(\d+)", resp.headers.get("Content-Range", "").strip())
    if m:
        return int(m.group(1))
    n = resp.headers.get("Content-Length")
    return offset + int(n) if n and n.isdigit() else None


def _fetch_one(r: Remote, progress: _Progress, stop: threading.Event) -> None:
    """Make ``r.dest`` the verified file, downloading what is missing."""
    if stop.is_set():
        return
    if r.dest.is_file():
        why = mismatch(r, *file_digest(r.dest, r.algo))
        if why is None:
            log.info("%s: already present and verified", r.dest.name)
            r.part.unlink(missing_ok=True)
            return
        if r.size and r.dest.stat().st_size < r.size and not r.part.exists():
            log.info("%s: resuming the partial file under its final name", r.dest.name)
            os.replace(r.dest, r.part)  # e.g. left by wget -c; checked once complete
        else:
            log.warning("%s is there but %s: downloading it again", r.dest, why)
    for attempt in (1, 2):
        digest, size = _download(r, progress, stop)
        why = mismatch(r, digest, size)
        if why is None:
            os.replace(r.part, r.dest)
            fsync_dir(r.dest.parent)
            log.info("%s: done (%s)", r.dest.name, human_bytes(size))
            return
        r.part.unlink()  # known bad: neither resumed nor kept
        if attempt == 1:
            log.warning("%s: %s; downloading it again from zero", r.dest.name, why)
    raise FetchError(f"{r.dest.name}: {why} after downloading it twice from {r.url}; "
                     "nothing was kept (the file served is not the one expected)")


def fetch_all(remotes: list[Remote], *, jobs: int = 1) -> int:
    """Download every remote that is not already present and verified, ``jobs`` at a time;
    returns the bytes downloaded.

    Refuses to start when the file system lacks room for what is left. On a failure the other
    downloads stop, keeping their ``.part`` files, and the first error is raised.
    """
    for folder in sorted({r.dest.parent for r in remotes}):
        folder.mkdir(parents=True, exist_ok=True)
        mine = [r for r in remotes if r.dest.parent == folder and r.size is not None]
        need = sum(r.size - _on_disk(r) for r in mine)
        free = free_space(folder)
        if need > free:
            raise FetchError(f"not enough disk space in {folder}: {human_bytes(need)} left to "
                             f"download, {human_bytes(free)} free")
    progress, stop = _Progress(remotes), threading.Event()
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="fetch") as pool:
            futures = [pool.submit(_fetch_one, r, progress, stop) for r in remotes]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        progress.total.close()
    return progress.downloaded


# -- the command --------------------------------------------------------------------------------

def _list(registry: dict[str, Dataset], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"datasets": {
            ds.name: {"base_url": ds.base_url, "bytes": ds.bytes,
                      "files": [{"name": f.name, "bytes": f.bytes, "md5": f.md5,
                                 "url": ds.base_url + f.name} for f in ds.files]}
            for ds in registry.values()}}, indent=2))
        return
    width = max(len("name"), *map(len, registry))
    print(f"{'name':<{width}}  files  {'total':>10}  base URL")
    for ds in registry.values():
        print(f"{ds.name:<{width}}  {len(ds.files):>5}  {human_bytes(ds.bytes):>10}  {ds.base_url}")


def fetch(ds: Dataset, out: Path, *, jobs: int = 2, mirror: str | None = None) -> int:
    """Download dataset ``ds`` into ``out``; returns the bytes downloaded."""
    base = folder_url(mirror, "--mirror") if mirror else ds.base_url
    remotes = [Remote(base + f.name, out / f.name, f.md5, "md5", f.bytes) for f in ds.files]
    log.info("%s: %d files, %s, from %s into %s", ds.name, len(remotes), human_bytes(ds.bytes),
             base, out)
    got = fetch_all(remotes, jobs=jobs)
    log.info("%s: all %d files present and verified in %s (%s downloaded)", ds.name,
             len(remotes), out, human_bytes(got))
    return got


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asc_dist.datasets",
                                description="List and download the DCASE scene datasets.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="the datasets of the registry")
    ls.add_argument("--json", action="store_true", help="every file with its size, MD5 and URL")
    get = sub.add_parser("fetch", help="download a dataset's files, resuming, verified")
    get.add_argument("name", help="a dataset name (see list)")
    get.add_argument("dir", type=Path, help="folder to put the files in (created if needed)")
    get.add_argument("--jobs", type=int, default=2, help="files downloaded at once (default 2)")
    get.add_argument("--mirror", metavar="URL", help="download the same file names from URL")
    for sp in (ls, get):
        sp.add_argument("--registry", metavar="FILE",
                        help="a YAML or JSON registry merged with the built-in one")
    return p


@command("asc_dist.datasets")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    registry = load_registry(args.registry)
    if args.cmd == "list":
        _list(registry, args.json)
        return 0
    if args.name not in registry:
        raise FetchError(f"unknown dataset {args.name!r}; known: {', '.join(registry)}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    fetch(registry[args.name], args.dir, jobs=args.jobs, mirror=args.mirror)
    return 0


if __name__ == "__main__":
    # the imported copy, whose logger is asc_dist.datasets (under -m this one's is __main__)
    from asc_dist.datasets import main as _main

    raise SystemExit(_main())
