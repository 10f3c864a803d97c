"""python -m asc_dist.datasets against a loopback HTTP server this file starts itself.

The server (:class:`Server`, also used by tests/test_weights.py) answers Range requests, can drop
the connection part-way through a file or serve a file corrupted a number of times, and records
the Range header of every request and the body bytes it sent, per file.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import socket
import threading
import zipfile
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from asc_dist import datasets as D

CHUNK = 16 * 1024


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        s: Server = self.server.owner
        name = self.path.rsplit("/", 1)[-1]
        with s.lock:
            s.ranges[name].append(self.headers.get("Range"))
            data = s.files.get(name)
            corrupt = s.corrupt[name] > 0
            s.corrupt[name] -= corrupt
            drop_at = s.drop.pop(name, None)
        if data is None:
            self.send_error(404)
            return
        if corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and not s.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:] if drop_at is None else data[start:drop_at]
        self.wfile.write(body)
        self.wfile.flush()
        with s.lock:
            s.sent[name] += len(body)
        if drop_at is not None:  # cut the connection short of Content-Length
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args) -> None:
        pass


class Server:
    """``with Server() as s: s.files[name] = data`` -> served at ``s.url + name``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop: dict[str, int] = {}  # name -> offset where the next answer stops (once)
        self.corrupt: Counter = Counter()  # name -> answers still to serve with a flipped byte
        self.ignore_range = False  # answer 200 with the whole file to a Range request
        self.ranges: dict[str, list[str | None]] = defaultdict(list)
        self.sent: Counter = Counter()
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.ranges.clear()
        self.sent.clear()

    def __enter__(self) -> Server:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/files/"


def random_zip(seed: int, size: int) -> bytes:
    """A real zip holding ``size`` random (incompressible) bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("audio/clip.bin", random.Random(seed).randbytes(size))
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def error_line(capsys, prog: str = "asc_dist.datasets") -> str:
    """The one error line of a failed command (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(D, "CHUNK", CHUNK)
    monkeypatch.setattr(D, "BACKOFF_S", 0.0)
    monkeypatch.setattr(D, "TIMEOUT_S", 5.0)


@pytest.fixture
def server():
    with Server() as s:
        s.files = {"toy.meta.zip": random_zip(1, 40_000), "toy.audio.1.zip": random_zip(2, 300_000),
                   "toy.audio.2.zip": random_zip(3, 200_000)}
        yield s


def write_registry(path: Path, server: Server, name: str = "toy", **override) -> Path:
    files = [{"name": n, "bytes": len(d), "md5": md5(d)} for n, d in server.files.items()]
    for f in files:
        f.update(override.get(f["name"], {}))
    path.write_text(json.dumps({"datasets": {name: {"base_url": server.url, "files": files}}}))
    return path


def fetch(tmp_path, server, *extra) -> int:
    reg = write_registry(tmp_path / "registry.json", server)
    return D.main(["fetch", "toy", str(tmp_path / "data"), "--registry", str(reg), *extra])


def test_fetch_resumes_repairs_and_skips_what_is_there(tmp_path, server, capsys):
    big, small = "toy.audio.1.zip", "toy.audio.2.zip"
    server.drop[big] = 100_000
    server.corrupt[small] = 1
    assert fetch(tmp_path, server, "--jobs", "3") == 0
    out = tmp_path / "data"
    for name, data in server.files.items():
        assert md5((out / name).read_bytes()) == md5(data), name
    assert not list(out.glob("*.part"))
    # dropped at 100000 bytes: the rest is asked from exactly there, nothing is fetched twice
    assert server.ranges[big] == [None, "bytes=100000-"]
    assert len(server.files[big]) <= server.sent[big] < len(server.files[big]) + CHUNK
    # served corrupted once: noticed, downloaded again from zero, right the second time
    assert server.ranges[small] == [None, None]
    assert server.sent[small] == 2 * len(server.files[small])
    err = capsys.readouterr().err
    assert f"{small}: MD5 is" in err and "downloading it again from zero" in err
    # a second fetch downloads nothing
    server.reset()
    assert fetch(tmp_path, server) == 0
    assert not server.ranges and not server.sent
    assert err.count("already present") == 0 and "already present" in capsys.readouterr().err


def test_rerun_resumes_a_partial_file_and_hashes_its_bytes(tmp_path, server):
    name = "toy.audio.1.zip"
    data = server.files[name]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f"{name}.part").write_bytes(data[:123_456])
    assert fetch(tmp_path, server) == 0
    assert server.ranges[name] == ["bytes=123456-"]
    assert server.sent[name] == len(data) - 123_456
    assert (tmp_path / "data" / name).read_bytes() == data
    # a partial file whose bytes are wrong: caught by the MD5 (the old bytes are hashed too)
    (tmp_path / "data" / name).unlink()
    (tmp_path / "data" / f"{name}.part").write_bytes(b"\0" * 50_000)
    server.reset()
    assert fetch(tmp_path, server) == 0
    assert server.ranges[name] == ["bytes=50000-", None]
    assert (tmp_path / "data" / name).read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(tmp_path, server):
    name = "toy.audio.2.zip"
    data = server.files[name]
    server.ignore_range = True
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f"{name}.part").write_bytes(data[:70_000])
    assert fetch(tmp_path, server) == 0
    assert server.ranges[name] == ["bytes=70000-"]
    assert server.sent[name] == len(data)
    assert (tmp_path / "data" / name).read_bytes() == data


def test_md5_wrong_twice_is_refused(tmp_path, server, capsys):
    name = "toy.meta.zip"
    server.corrupt[name] = 2
    assert fetch(tmp_path, server) == 2
    line = error_line(capsys)
    assert name in line and f"expected {md5(server.files[name])}" in line
    assert f"MD5 is {md5(bytes([server.files[name][0] ^ 0xFF]) + server.files[name][1:])}" in line
    assert server.ranges[name] == [None, None]
    assert not [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(name)]


def test_unreachable_server_names_the_url(tmp_path, server, capsys):
    url = closed_port_url()
    assert fetch(tmp_path, server, "--mirror", url, "--jobs", "1") == 2
    line = error_line(capsys)
    assert f"cannot download {url}toy." in line and "5 tries" in line
    assert not [p for p in (tmp_path / "data").iterdir() if not p.name.endswith(".part")]


def test_missing_file_on_the_server_is_not_retried(tmp_path, server, capsys):
    reg = write_registry(tmp_path / "registry.json", server)
    del server.files["toy.meta.zip"]
    assert D.main(["fetch", "toy", str(tmp_path / "data"), "--registry", str(reg)]) == 2
    assert "toy.meta.zip: HTTP 404" in error_line(capsys)
    assert server.ranges["toy.meta.zip"] == [None]


def test_unknown_dataset_lists_the_known_ones(tmp_path, capsys):
    assert D.main(["fetch", "tut2017", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert "unknown dataset 'tut2017'" in line and "tut2018-development" in line


def test_not_enough_disk_is_refused_before_downloading(tmp_path, server, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    assert fetch(tmp_path, server) == 2
    line = error_line(capsys)
    total = sum(map(len, server.files.values()))
    assert "not enough disk space" in line and "1000 B free" in line
    assert f"{D.human_bytes(total)} left to download" in line
    assert not server.ranges


def test_malformed_registry_names_file_and_field(tmp_path, server, capsys):
    reg = write_registry(tmp_path / "reg.json", server, **{"toy.meta.zip": {"md5": "abc"}})
    assert D.main(["fetch", "toy", str(tmp_path / "d"), "--registry", str(reg)]) == 2
    assert f"registry {reg}: datasets.toy.files[" in (line := error_line(capsys))
    assert "].md5: expected 32 hex digits" in line
    bad = tmp_path / "reg.yaml"
    bad.write_text("datasets:\n  x:\n    files: []\n")
    assert D.main(["list", "--registry", str(bad)]) == 2
    assert "datasets.x: missing field(s) ['base_url']" in error_line(capsys)
    bad.write_text("datasets: [unclosed\n")
    assert D.main(["list", "--registry", str(bad)]) == 2
    assert f"registry {bad}: cannot parse it" in error_line(capsys)


def test_list_and_user_registry(tmp_path, server, capsys):
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"datasets:\n  tut2018-development:\n    base_url: {server.url}\n    files:\n"
                   "      - {name: a.zip, bytes: 3, md5: 900150983cd24fb0d6963f7d28e17f72}\n")
    assert D.main(["list", "--json", "--registry", str(reg)]) == 0
    out, err = capsys.readouterr()
    listed = json.loads(out)["datasets"]
    assert listed["tut2018-development"]["files"] == [
        {"name": "a.zip", "bytes": 3, "md5": "900150983cd24fb0d6963f7d28e17f72",
         "url": server.url + "a.zip"}]
    assert "replaces the built-in entry tut2018-development" in err
    assert D.main(["list"]) == 0
    table = capsys.readouterr().out
    assert "tau2022-mobile-development" in table and "19.9 GiB" in table


BUILTIN = ("tut2018-development", "tut2018-leaderboard", "tut2018-evaluation",
           "tau2019-development", "tau2020-mobile-development", "tau2022-mobile-development",
           "tau2022-mobile-evaluation")


def test_builtin_registry_is_well_formed():
    """The data file shipped in the package (asc_dist/datasets.yaml; the wheel's copy is checked
    by tests/test_config.py), values as dcase_util's package_list gives them."""
    registry = D.builtin_registry()
    assert list(registry) == list(BUILTIN)
    names = [f.name for ds in registry.values() for f in ds.files]
    assert len(names) == len(set(names))
    for ds in registry.values():
        assert ds.base_url.startswith("https://zenodo.org/record/") and ds.base_url.endswith("/")
        for f in ds.files:
            assert re.fullmatch(r"[0-9a-f]{32}", f.md5) and f.bytes > 0, f
            assert f.name.startswith(("TUT-urban-acoustic-scenes-", "TAU-urban-acoustic-scenes-"))
    dev = registry["tut2018-development"]
    assert len(dev.files) == 15 and dev.base_url == "https://zenodo.org/record/1228142/files/"
    assert D.RemoteFile("TUT-urban-acoustic-scenes-2018-development.meta.zip", 69272,
                        "e196065ee83c07af03a11a310364377d") in dev.files
    # dcase_util's TAUUrbanAcousticScenes_2022_Mobile_EvaluationSet: Zenodo record 6591203
    ev = registry["tau2022-mobile-evaluation"]
    assert len(ev.files) == 10 and ev.base_url == "https://zenodo.org/record/6591203/files/"
    stem = "TAU-urban-acoustic-scenes-2022-mobile-evaluation"
    assert [f.name for f in ev.files] == [f"{stem}.{p}.zip" for p in
                                          ("doc", "meta", *(f"audio.{i}" for i in range(1, 9)))]
    assert D.RemoteFile(f"{stem}.audio.8.zip", 1451063404,
                        "93b3c7dc8be152f9bf1edbbe8cf8d1b1") in ev.files
