"""The weights registry: published weight files asc-dist reads from torch hub's cache, and the
record that makes a file without a published checksum checkable.

torchvision's ImageNet ResNets are named by a sha256 prefix in their file names
(:mod:`asc_dist.models.resnet`); the files here are not, and their publishers give no checksum
or exact size. For them ``python -m asc_dist.weights fetch NAME`` writes a record beside the file,
``<file>.sha256.json`` = {sha256, bytes, url, how}: the first complete download (its length
checked against the server's Content-Length) records what it got, ``--sha256`` pins a known hash,
``--from FILE`` records a file brought over as given. Every later fetch, and every load by
``model.pretrained=NAME``, checks the file against its record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from asc_dist.errors import ConfigError

RECORD_SUFFIX = ".sha256.json"


@dataclass(frozen=True)
class Published:
    """A published weights file: where it comes from and which model it fits."""

    name: str  # model.pretrained=<name>; python -m asc_dist.weights fetch <name>
    url: str
    model: str  # model.name it fits
    arch: str  # the family's architecture (model.passt.arch)
    about: str

    @property
    def file_name(self) -> str:
        return os.path.basename(self.url)


PUBLISHED: dict[str, Published] = {
    "passt-audioset": Published(
        name="passt-audioset",
        # kkoutini/PaSST release v0.0.1-audioset (hear21passt's default_cfgs['passt_s_swa_p16_128_
        # ap476']): the AudioSet model CP-JKU's DCASE 2023 teacher starts from; 527 classes.
        url="https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/"
            "passt-s-f128-p16-s10-ap.476-swa.pt",
        model="passt", arch="passt_s_swa_p16_128_ap476",
        about="PaSST-S (ViT-B, 16x16 patches, stride 10) trained on AudioSet, mAP .476 (SWA)"),
}


def hub_file(name: str) -> Path:
    """Where torch hub's cache keeps published weights ``name`` (resolved now: TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PUBLISHED[name].file_name


def record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def read_record(path: Path) -> dict | None:
    """The record of ``path`` (sha256, bytes, url, how), None when there is none."""
    rec = record_path(path)
    if not rec.is_file():
        return None
    try:
        d, why = json.loads(rec.read_text()), "no sha256 and bytes"
    except (OSError, ValueError) as e:
        d, why = None, str(e)
    if not (isinstance(d, dict) and isinstance(d.get("sha256"), str)
            and isinstance(d.get("bytes"), int)):
        raise ConfigError(f"{rec}: unreadable record of {path.name} ({why}); delete it and fetch "
                          f"the file again")
    return d


def sha256_of(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def verified_file(name: str) -> Path:
    """Published weights ``name``, checked against their record; a ConfigError saying what to
    run when the file or its record is missing or the file differs from it."""
    path = hub_file(name)
    fetch = f"python -m asc_dist.weights fetch {name}"
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained={name}: {path.name} not found at {path} (TORCH_HOME="
            f"{os.environ.get('TORCH_HOME', '<unset>')}): `{fetch}` downloads it there; without "
            f"network, download {PUBLISHED[name].url} elsewhere and install it with `{fetch} "
            f"--from FILE`")
    record = read_record(path)
    if record is None:
        raise ConfigError(f"model.pretrained={name}: {path} has no record of its sha256 "
                          f"({record_path(path).name}; it was not installed by `{fetch}`): run "
                          f"`{fetch} --sha256 HEX` with a hash you trust, or `{fetch} --from {path}`")
    digest, size = sha256_of(path)
    if (digest, size) != (record["sha256"], record["bytes"]):
        raise ConfigError(f"model.pretrained={name}: {path} ({size} bytes, sha256 {digest}) is not "
                          f"the file recorded when it was fetched ({record['bytes']} bytes, sha256 "
                          f"{record['sha256']}): delete both and `{fetch}` again")
    return path
