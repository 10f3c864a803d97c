"""Put pretrained weights where the trainer reads them (torch hub's cache, under ``TORCH_HOME``).

    python -m asc_dist.weights list
    python -m asc_dist.weights fetch NAME [--from FILE] [--mirror URL] [--sha256 HEX]

NAME is a torchvision ResNet (``resnet18`` ... ``resnet152``, their ImageNet weights for
``model.pretrained=imagenet``) or an entry of the weights registry (:mod:`asc_dist.models.hub`:
``passt-audioset``, PaSST's AudioSet weights for ``model.pretrained=passt-audioset``). The
trainer never downloads: ``fetch`` puts the file there, downloaded from its URL (or the same file
name under ``--mirror URL``) with the datasets' downloader (resumable, retried, written as
``.part`` and renamed once checked), or, on a machine without network, copied atomically from
``--from FILE``, a file brought over from elsewhere.

How a file is checked:

* ResNets: as torch hub's ``check_hash`` does. torchvision names each file ``<name>-<first 8 hex
  digits of its sha256>.pth``, and the file's sha256 must start with that prefix.
* Registry entries have no published checksum or exact size (PaSST's release gives neither), so
  the first complete download is taken as the file: its length must be the server's
  Content-Length (a download cut short resumes; a server that gives no length is refused), and
  its size and sha256 are recorded beside it (``<file>.sha256.json``). Every later fetch, and
  every load by the trainer, checks the file against that record. ``--sha256 HEX`` pins the hash
  instead (the download, or ``--from FILE``, must match it); ``--from FILE`` without it records
  the file as given. This is a change from the trust-as-given policy asc-dist keeps for files
  without a hash elsewhere: a registry file is trusted once, then held to it.

timm's weights carry no hash in their file names (they are published on the Hugging Face hub by
repository and revision) and asc-dist builds its timm models (``seresnet*``, ``timm:<name>``)
without pretrained weights, so this command does not offer them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path

from asc_dist import atomic
from asc_dist.cli import command
from asc_dist.datasets import NetworkError, Remote, fetch_all, folder_url, mismatch
from asc_dist.errors import ConfigError, FetchError
from asc_dist.models import RESNETS, imagenet_weights, imagenet_weights_file
from asc_dist.models.hub import PUBLISHED, hub_file, read_record, record_path, sha256_of

log = logging.getLogger(__name__)

# torch.hub's HASH_REGEX, asking for at least the 8 digits torchvision uses
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")
NAMES = (*RESNETS, *PUBLISHED)


def source(name: str) -> tuple[str, Path]:
    """The URL of weights ``name`` and where the trainer reads them."""
    if name not in NAMES:
        raise FetchError(f"unknown weights {name!r}; known: {', '.join(NAMES)}")
    if name in PUBLISHED:
        return PUBLISHED[name].url, hub_file(name)
    return imagenet_weights(name).url, imagenet_weights_file(name)


def remote(name: str, mirror: str | None = None) -> Remote:
    """What to download for ResNet ``name``: checked against the sha256 prefix in its file name."""
    url, dest = source(name)
    m = HASH_IN_NAME.search(dest.name)
    if not m:
        raise FetchError(f"{dest.name}: no sha256 prefix in the file name to check it against")
    if mirror:
        url = folder_url(mirror, "--mirror") + dest.name
    return Remote(url, dest, m.group(1), "sha256")


def install_from(r: Remote, src: Path, expected: str) -> None:
    """Copy ``src`` to ``r.dest`` atomically if it passes the check; nothing installed if not."""
    r.dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as f, atomic.writing(r.dest, what="weights") as out:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
        why = mismatch(r, h.hexdigest(), size)
        if why is not None:  # raised inside the block: the temporary goes, the target stays
            raise FetchError(f"{src}: {why} ({expected}): nothing installed")


def fetch_published(name: str, *, src: Path | None = None, mirror: str | None = None,
                    sha256: str | None = None) -> Path:
    """Install registry entry ``name`` checked against --sha256, else its record, else (the
    first time) the server's length; then (re)write its record. See the module doc."""
    url, dest = source(name)
    if mirror:
        url = folder_url(mirror, "--mirror") + dest.name
    try:
        record = read_record(dest)
    except ConfigError as e:
        raise FetchError(str(e)) from None
    pin = sha256.lower() if sha256 else None
    if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise FetchError(f"--sha256 {sha256}: not a sha256 (64 hex digits)")
    if pin and record and record["sha256"] != pin and dest.is_file():
        raise FetchError(f"{dest} is recorded with sha256 {record['sha256']}, not --sha256 {pin}: "
                         f"delete it and {record_path(dest).name} to fetch the pinned file")
    expected = pin or (record["sha256"] if record else "")
    size = record["bytes"] if record and record["sha256"] == expected else None
    r = Remote(url, dest, expected, "sha256", size, require_length=not expected)
    if src is not None:
        install_from(r, src, "--sha256" if pin else f"the record {record_path(dest).name}"
                     if record else "")
        how = "--sha256" if pin else "recorded" if record else "--from FILE, as given"
    else:
        if not expected and dest.is_file():
            raise FetchError(f"{dest} is there without a record of its sha256 (not installed by "
                             f"this command): give --sha256 HEX to check it, install it with "
                             f"--from {dest} to take it as it is, or delete it to download")
        fetch_all([r])
        how = "--sha256" if pin else "recorded" if record else "first download, length checked"
    digest, nbytes = sha256_of(dest)
    new = {"sha256": digest, "bytes": nbytes, "url": url, "how": how}
    if record is None or (record["sha256"], record["bytes"]) != (digest, nbytes):
        atomic.write_text(record_path(dest), json.dumps(new, indent=1) + "\n")
        log.info("%s: recorded %s bytes, sha256 %s (%s) in %s", name, nbytes, digest, how,
                 record_path(dest).name)
    return dest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asc_dist.weights",
                                description="Install pretrained weights (torchvision's ImageNet "
                                            "ResNets, PaSST's AudioSet model) into torch hub's "
                                            "cache ($TORCH_HOME/hub/checkpoints).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="each weights file and whether it is installed")
    get = sub.add_parser("fetch", help="download (or --from FILE: copy) one, checked")
    get.add_argument("name", help=", ".join(NAMES))
    get.add_argument("--from", dest="src", type=Path, metavar="FILE",
                     help="install this file (obtained elsewhere) instead of downloading")
    get.add_argument("--mirror", metavar="URL", help="download the same file name from URL")
    get.add_argument("--sha256", metavar="HEX",
                     help=f"the file's sha256, when known ({', '.join(PUBLISHED)} only: the "
                          f"ResNets' is in their file names)")
    return p


@command("asc_dist.weights")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        for name in NAMES:
            _, dest = source(name)
            print(f"{name:<14} {dest.name:<36} {'installed' if dest.is_file() else 'missing'}")
        log.info("folder: %s", source(NAMES[0])[1].parent)
        return 0
    try:
        if args.name in PUBLISHED:
            dest = fetch_published(args.name, src=args.src, mirror=args.mirror, sha256=args.sha256)
        else:
            if args.sha256:
                raise FetchError(f"--sha256: {args.name}'s sha256 prefix is in its file name")
            r = remote(args.name, args.mirror)
            dest = r.dest
            if args.src is not None:
                install_from(r, args.src, f"the prefix in {dest.name}; not torchvision's file "
                                          f"for this name")
            else:
                fetch_all([r])
    except NetworkError as e:
        raise NetworkError(f"{e}; offline? copy the file from a machine with network and "
                           f"install it with: python -m asc_dist.weights fetch {args.name} "
                           "--from FILE") from None
    log.info("%s: %s installed and checked", args.name, dest)
    return 0


if __name__ == "__main__":
    # the imported copy, whose logger is asc_dist.weights (under -m this one's is __main__)
    from asc_dist.weights import main as _main

    raise SystemExit(_main())
