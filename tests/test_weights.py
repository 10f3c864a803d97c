"""python -m asc_dist.weights: the sha256-prefix check, downloads through --mirror from the
loopback server of tests/test_datasets.py, --from FILE, and the trainer's message.

A generated file cannot match torchvision's real prefixes, so the accepting cases make
``weights.source`` name, for resnet18, a file named by the generated file's own sha256 prefix;
the refusing cases use the real names. Both go through the same checking code.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from test_datasets import CHUNK, Server, closed_port_url, error_line

from asc_dist import datasets as D
from asc_dist import weights as W
from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError
from asc_dist.model import imagenet_weights_file, pretrained_file

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
