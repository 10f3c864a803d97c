"""Download the DCASE acoustic scene datasets, resumably and verified.

    python -m asc_dist.datasets list [--json] [--registry FILE]
    python -m asc_dist.datasets fetch NAME DIR [--jobs N] [--mirror URL] [--registry FILE]

The registry lists each dataset's files with their size and MD5; a file's URL is ``base_url`` +
its name (``--mirror URL`` swaps the base URL). The built-in entries are the Zenodo records as
dcase_util lists them (the ``package_list`` of its dataset classes, dcase_util/datasets/tut.py);
``--registry FILE`` adds a YAML or JSON file of the same format, whose entries replace built-in
ones of the same name::

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

# dcase_util (github.com/DCASE-REPO/dcase_util, dcase_util/datasets/tut.py at a2694b0b, the
# package_list of the class named): base URL, file name stem, then (suffix, bytes, MD5) per file.
_BUILTIN = {
    "tut2018-development": (  # TUTUrbanAcousticScenes_2018_DevelopmentSet
        "https://zenodo.org/record/1228142/files/",
        "TUT-urban-acoustic-scenes-2018-development", [
            ("doc.zip", 10517, "28a4a9c46a6f46709ecc8eece365a3a4"),
            ("meta.zip", 69272, "e196065ee83c07af03a11a310364377d"),
            ("audio.1.zip", 1657811579, "62f97087c447e29def8716204469bf89"),
            ("audio.2.zip", 1783489370, "8e569a92025d82bff6b02b956d7c6dc9"),
            ("audio.3.zip", 1809675304, "00d2020582a4535af5e65322fb2bad56"),
            ("audio.4.zip", 1756582525, "d691eb4271f83ba6ba9a28797accc497"),
            ("audio.5.zip", 1724002546, "c4d64b5483b60f85e9fe080b3435a6be"),
            ("audio.6.zip", 1645753049, "2f0feee78f216697eb19497714d97642"),
            ("audio.7.zip", 1671903917, "07cfefe80a0731de6819181841239f3a"),
            ("audio.8.zip", 1673304843, "213f3c012859c2e9dcb74aacc8558458"),
            ("audio.9.zip", 1674839259, "b724442b09abcb3bd095ebff497cef85"),
            ("audio.10.zip", 1662932947, "a27a32fa52e283ed8013375b8a16f269"),
            ("audio.11.zip", 1751473843, "7073a121e825ffef99832507f30d6644"),
            ("audio.12.zip", 1742332198, "6567aa61db12776568b6267ce122fb18"),
            ("audio.13.zip", 798990513, "d00eeb2db0e093d8975521323a96c519"),
        ]),
    "tut2018-leaderboard": (  # TUTUrbanAcousticScenes_2018_LeaderboardSet
        "https://zenodo.org/record/1245181/files/",
        "TUT-urban-acoustic-scenes-2018-leaderboard", [
            ("doc.zip", 7592, "ec83e81f5c25c6f3fbaaab2930d74d5d"),
            ("meta.zip", 2936, "2b52300b9de2e69cce8849b5d1daba28"),
            ("audio.1.zip", 1717617702, "33523d95683f80e488f318500c793431"),
            ("audio.2.zip", 1256040072, "dee89b1b99fb3f2600250008ef840b18"),
        ]),
    "tut2018-evaluation": (  # TUTUrbanAcousticScenes_2018_EvaluationSet
        "https://zenodo.org/record/1293883/files/",
        "TUT-urban-acoustic-scenes-2018-evaluation", [
            ("doc.zip", 7702, "05edd37e0da5f301e86b1dbd2ccae191"),
            ("meta.zip", 8840, "b519d0b2addcb5e8569ec0c44df14e3e"),
            ("audio.1.zip", 1718662668, "4fd51d1365df3d13735b86a51ff8840b"),
            ("audio.2.zip", 1715801158, "f6916f68a16b25f128badff441f80d8a"),
            ("audio.3.zip", 1718666070, "05a6f5d1259a4da49cda32f534c71cc6"),
            ("audio.4.zip", 1716820790, "fcdceb6a022d698064e5537edbbd6664"),
            ("audio.5.zip", 1716577566, "ff94b9abc4f01bf2dd9a2aca79d8590d"),
            ("audio.6.zip", 320850287, "3dd86135fb4df726f6036ffafe0dff88"),
        ]),
    "tau2019-development": (  # TAUUrbanAcousticScenes_2019_DevelopmentSet
        "https://zenodo.org/record/2589280/files/",
        "TAU-urban-acoustic-scenes-2019-development", [
            ("doc.zip", 11299, "1f6879544e80da70099a191613e7e51f"),
            ("meta.zip", 156863, "09782f2097e4735687af73c44919329c"),
            ("audio.1.zip", 1657550587, "aca4ebfd9ed03d5f747d6ba8c24bc728"),
            ("audio.2.zip", 1666219450, "c4f170408ce77c8c70c532bf268d7be0"),
            ("audio.3.zip", 1817901591, "c7214a07211f10f3250290d05e72c37e"),
            ("audio.4.zip", 1821710642, "a6a62110f6699cf4432072acb1dffda6"),
            ("audio.5.zip", 1803118466, "091a0b6d3c84b8e60e46940aa7d4a8a0"),
            ("audio.6.zip", 1789566029, "114f4ca13e074391b98a1cfd8140de65"),
            ("audio.7.zip", 1747953866, "5951dd2968f7a514e2afbe279c4f060d"),
            ("audio.8.zip", 1728724513, "b0b63dc95b327e1509857c8d8a663cc3"),
            ("audio.9.zip", 1667106209, "3c32a693a6b111ffb957be3c1dd22e9b"),
            ("audio.10.zip", 1632636175, "0ffbf60006da520cc761fb74c878b98b"),
            ("audio.11.zip", 1671793546, "599055d93b4c11057c29be2df54538d4"),
            ("audio.12.zip", 1672592150, "98b8d162ff3665695c4c910e6c372cc8"),
            ("audio.13.zip", 1673481614, "a356c08b1a5a21d433eba37ef87587f4"),
            ("audio.14.zip", 1666137450, "f8969771e7faf7dd471d1cf78b0cf011"),
            ("audio.15.zip", 1675127004, "4758c4b0fb7484faa632266e78850820"),
            ("audio.16.zip", 1648240966, "a18acad9ede8ea76574216feb887f0bc"),
            ("audio.17.zip", 1698414214, "1af7703484632f340da5c33662dc9632"),
            ("audio.18.zip", 1731093704, "b67402bf3e08f4da394a7c18756c0fd2"),
            ("audio.19.zip", 1745153640, "035db315f19106eb848b6f9b32bcc47c"),
            ("audio.20.zip", 1774038704, "9cb28c74911bf8a3eadcf53f50a5b5d6"),
            ("audio.21.zip", 1333808800, "0e44ed85c88ec036a9725b4dd1dfaea0"),
        ]),
    "tau2020-mobile-development": (  # TAUUrbanAcousticScenes_2020_Mobile_DevelopmentSet
        "https://zenodo.org/record/3819968/files/",
        "TAU-urban-acoustic-scenes-2020-mobile-development", [
            ("doc.zip", 18066, "175f40dc3fec144347abad4d2962b7ae"),
            ("meta.zip", 214159, "6eae9db553ce48e4ea246e34e50a3cf5"),
            ("audio.1.zip", 1726039031, "b1e85b8a908d3d6a6ab73268f385d5c8"),
            ("audio.2.zip", 1782268370, "4310a13cc2943d6ce3f70eba7ba4c784"),
            ("audio.3.zip", 1870468865, "ed38956c4246abb56190c1e9b602b7b8"),
            ("audio.4.zip", 1879413176, "97ab8560056b6816808dedc044dcc023"),
            ("audio.5.zip", 1823936584, "b50f5e0bfed33cd8e52cb3e7f815c6cb"),
            ("audio.6.zip", 1827246144, "fbf856a3a86fff7520549c899dc94372"),
            ("audio.7.zip", 1728630243, "0dbffe7b6e45564da649378723284062"),
            ("audio.8.zip", 1748646043, "bb6f77832bf0bd9f786f965beb251b2e"),
            ("audio.9.zip", 1780487215, "a65596a5372eab10c78e08a0de797c9e"),
            ("audio.10.zip", 1726068853, "2ad595819ffa1d56d2de4c7ed43205a6"),
            ("audio.11.zip", 1744480272, "0ad29f7040a4e6a22cfd639b3a6738e5"),
            ("audio.12.zip", 1738707195, "e5f4400c6b9697295fab4cf507155a2f"),
            ("audio.13.zip", 1835797785, "8855ab9f9896422746ab4c5d89d8da2f"),
            ("audio.14.zip", 1846390881, "092ad744452cd3e7de78f988a3d13020"),
            ("audio.15.zip", 1869032508, "4b5eb85f6592aebf846088d9df76b420"),
            ("audio.16.zip", 436971777, "2e0a89723e58a3836be019e6996ae460"),
        ]),
    "tau2022-mobile-development": (  # TAUUrbanAcousticScenes_2022_Mobile_DevelopmentSet
        "https://zenodo.org/record/6337421/files/",
        "TAU-urban-acoustic-scenes-2022-mobile-development", [
            ("doc.zip", 16819, "9c4f610bdb5d3e3e72a17d393a26452a"),
            ("meta.zip", 1538781, "419b6ff6570f1030730352dc80cd8d15"),
            ("audio.1.zip", 1736050960, "8be14bdbd844481dce059ab31fbd2239"),
            ("audio.2.zip", 1791821989, "e821abda49b069248bb75eab39df7575"),
            ("audio.3.zip", 1878561499, "9c7897f78bb42ca0008936daddf3f8f3"),
            ("audio.4.zip", 1887825128, "53ec3e37c0fc0be75f53c5abbc5300b8"),
            ("audio.5.zip", 1832871840, "528422c33c5d10263203d2c61cb1f3be"),
            ("audio.6.zip", 1836165296, "4759a9465c903e13e57d5e82e791fc28"),
            ("audio.7.zip", 1737838582, "6d545fc83a55a17856a9ccc1ac9aff6b"),
            ("audio.8.zip", 1758317867, "3a2916a9b5d3f43cc7a22a62b180b0d9"),
            ("audio.9.zip", 1790044829, "071f664c86639ad730f7be4e3c39d886"),
            ("audio.10.zip", 1736836871, "e0839d019e9b77ecbcbb0eff85965530"),
            ("audio.11.zip", 1754618148, "fc60f1c83726be3963ae14fbcb95eeb4"),
            ("audio.12.zip", 1748795940, "02246547f86c0a814dc63ec65d7033bb"),
            ("audio.13.zip", 1844234922, "88ae9ef884665140d1572d8061725e00"),
            ("audio.14.zip", 1854884822, "c3f400d74ae90e5190dc518cde43de47"),
            ("audio.15.zip", 1877789093, "85594c6fe4f91c10aa2a410f748103b8"),
            ("audio.16.zip", 435379083, "6e2df8438c69f6789414aeba8cbad9d8"),
        ]),
}


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
    doc = {"datasets": {
        name: {"base_url": base, "files": [{"name": f"{stem}.{suffix}", "bytes": size, "md5": md5}
                                           for suffix, size, md5 in files]}
        for name, (base, stem, files) in _BUILTIN.items()}}
    return parse_registry(doc, "built-in registry")


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
