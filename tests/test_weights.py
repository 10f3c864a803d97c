"""python -m asc_dist.weights: the sha256-prefix check, downloads through --mirror from the
loopback server of tests/test_datasets.py, --from FILE, and the trainer's message.

A generated file cannot match torchvision's real prefixes, so the accepting cases make
``weights.source`` name, for resnet18, a file named by the generated file's own sha256 prefix;
the refusing cases use the real names. Both go through the same checking code.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from test_datasets import CHUNK, Server, closed_port_url, error_line

from asc_dist import datasets as D
from asc_dist import weights as W
from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError
from asc_dist.models import imagenet_weights_file, pretrained_file

PROG = "asc_dist.weights"


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(D, "CHUNK", CHUNK)
    monkeypatch.setattr(D, "BACKOFF_S", 0.0)
    monkeypatch.setattr(D, "TIMEOUT_S", 5.0)
    return tmp_path / "torch_home"


@pytest.fixture
def blob(monkeypatch):
    """Random 'weights' and resnet18 redirected to a file named by their own sha256 prefix."""
    data = random.Random(0).randbytes(250_000)
    real = W.source
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"

    def source(model):
        url, dest = real(model)
        return (url.rsplit("/", 1)[0] + "/" + name, dest.with_name(name)) if model == "resnet18" \
            else (url, dest)

    monkeypatch.setattr(W, "source", source)
    return data, name


def installed(torch_home):
    folder = torch_home / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_from_file_with_the_right_prefix_is_installed(tmp_path, torch_home, blob):
    data, name = blob
    src = tmp_path / "downloaded.pth"
    src.write_bytes(data)
    assert W.main(["fetch", "resnet18", "--from", str(src)]) == 0
    assert (torch_home / "hub" / "checkpoints" / name).read_bytes() == data
    assert installed(torch_home) == [name]


def test_from_file_with_a_wrong_prefix_is_refused(tmp_path, torch_home, capsys):
    src = tmp_path / "resnet50.pth"
    src.write_bytes(b"not the weights" * 1000)
    assert W.main(["fetch", "resnet50", "--from", str(src)]) == 2
    line = error_line(capsys, PROG)
    assert str(src) in line and "expected 0676ba61" in line and "resnet50-0676ba61.pth" in line
    assert "nothing installed" in line and installed(torch_home) == []


def test_download_through_mirror_resumes_and_checks(torch_home, blob, capsys):
    data, name = blob
    with Server() as server:
        server.files[name] = data
        server.drop[name] = 100_000
        assert W.main(["fetch", "resnet18", "--mirror", server.url]) == 0
        assert server.ranges[name] == [None, "bytes=100000-"]
        assert server.sent[name] == len(data)
        assert (torch_home / "hub" / "checkpoints" / name).read_bytes() == data
        capsys.readouterr()
        assert W.main(["list"]) == 0
        assert "resnet18" in (out := capsys.readouterr().out) and name in out
        assert [line.split()[-1] for line in out.splitlines()].count("installed") == 1
        # a second fetch finds it there
        server.reset()
        assert W.main(["fetch", "resnet18", "--mirror", server.url]) == 0
        assert not server.ranges


def test_download_of_the_wrong_file_is_refused(torch_home, blob, capsys):
    data, name = blob
    with Server() as server:
        server.files[name] = data[::-1]
        assert W.main(["fetch", "resnet18", "--mirror", server.url + "/"]) == 2
        assert server.ranges[name] == [None, None]  # downloaded again once, then refused
    line = error_line(capsys, PROG)
    assert name in line and f"expected {name[9:17]}" in line and "SHA256 is" in line
    assert installed(torch_home) == []


def test_offline_says_so(torch_home, capsys):
    assert W.main(["fetch", "resnet34", "--mirror", closed_port_url()]) == 2
    line = error_line(capsys, PROG)
    assert "resnet34-" in line and "offline?" in line and "--from FILE" in line
    assert installed(torch_home) == []


def test_unknown_name_and_list(capsys):
    assert W.main(["fetch", "seresnet50"]) == 2
    assert "known: resnet18, resnet34, resnet50, resnet101, resnet152" in error_line(capsys, PROG)
    assert W.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(W.NAMES)
    assert all(line.endswith("missing") for line in lines)


def test_trainer_names_the_fetch_command(torch_home):
    with pytest.raises(ConfigError) as e:
        pretrained_file(ModelConfig(name="resnet50", pretrained="imagenet"))
    msg = str(e.value)
    assert "python -m asc_dist.weights fetch resnet50`" in msg and "--from FILE" in msg
    assert str(imagenet_weights_file("resnet50")) in msg and f"TORCH_HOME={torch_home}" in msg


# -- the weights registry: PaSST's AudioSet file (no published checksum or size) ------------------

PASST = "passt-audioset"


def _passt(torch_home):
    """(its file name, where it goes, the model config that loads it)."""
    from asc_dist.models.hub import PUBLISHED, hub_file

    return PUBLISHED[PASST].file_name, hub_file(PASST), ModelConfig(name="passt", pretrained=PASST)


def test_passt_first_download_records_its_sha256_then_fetches_and_loads_check_it(torch_home, capsys):
    """The first download must reach the server's Content-Length (a cut one resumes) and records
    size and sha256; a later fetch and every load check the file against that record."""
    from asc_dist.models.hub import record_path

    name, dest, cfg = _passt(torch_home)
    blob = random.Random(1).randbytes(300_000)
    with Server() as server:
        server.files[name] = blob
        server.drop[name] = 120_000
        assert W.main(["fetch", PASST, "--mirror", server.url]) == 0
        assert server.ranges[name] == [None, "bytes=120000-"]  # short of Content-Length: resumed
        assert dest.read_bytes() == blob
        record = json.loads(record_path(dest).read_text())
        assert record == {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                          "url": server.url + name, "how": "first download, length checked"}
        assert pretrained_file(cfg) == dest
        server.reset()
        assert W.main(["fetch", PASST, "--mirror", server.url]) == 0
        assert not server.ranges  # present and matching its record: nothing downloaded
        # same-size damage: loads refuse; a fetch brings the recorded file back
        dest.write_bytes(bytes([blob[0] ^ 1]) + blob[1:])
        with pytest.raises(ConfigError, match=r"is not the file recorded when it was fetched "
                                              rf"\({len(blob)} bytes, sha256 {record['sha256']}"):
            pretrained_file(cfg)
        assert W.main(["fetch", PASST, "--mirror", server.url]) == 0
        assert dest.read_bytes() == blob and server.ranges[name] == [None]
        # the server now serves another file: held to the record, refused, nothing kept
        server.files[name] = blob[::-1]
        dest.unlink()
        capsys.readouterr()
        assert W.main(["fetch", PASST, "--mirror", server.url]) == 2
        assert f"expected {record['sha256']}" in error_line(capsys, PROG) and not dest.exists()


def test_passt_pins_unrecorded_files_and_servers_without_a_length(tmp_path, torch_home, capsys):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from asc_dist.models.hub import read_record

    name, dest, cfg = _passt(torch_home)
    blob = random.Random(2).randbytes(50_000)
    with Server() as server:  # --sha256 pins the hash: another file is refused
        server.files[name] = blob
        assert W.main(["fetch", PASST, "--mirror", server.url, "--sha256", "0" * 64]) == 2
    assert f"expected {'0' * 64}" in error_line(capsys, PROG) and not dest.exists()

    class NoLength(BaseHTTPRequestHandler):  # the whole file, then the connection closes
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NoLength)
    Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        assert W.main(["fetch", PASST, "--mirror", url]) == 2  # nothing to tell a cut download by
        assert "does not say the file's length" in error_line(capsys, PROG)
        assert W.main(["fetch", PASST, "--mirror", url, "--sha256",
                       hashlib.sha256(blob).hexdigest()]) == 0  # a known hash: it can
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert read_record(dest)["how"] == "--sha256" and pretrained_file(cfg) == dest
    # a file put there by hand, without a record: loads and fetches say what to run
    dest.unlink()
    dest.with_name(dest.name + ".sha256.json").unlink()
    dest.write_bytes(blob)
    with pytest.raises(ConfigError, match=r"has no record of its sha256.*--sha256 HEX"):
        pretrained_file(cfg)
    assert W.main(["fetch", PASST, "--mirror", closed_port_url()]) == 2
    assert "without a record of its sha256" in error_line(capsys, PROG)
    src = tmp_path / "brought.pt"
    src.write_bytes(blob)
    assert W.main(["fetch", PASST, "--from", str(src)]) == 0  # taken as given, and recorded
    assert read_record(dest)["how"] == "--from FILE, as given" and pretrained_file(cfg) == dest
