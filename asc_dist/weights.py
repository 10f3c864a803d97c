"""Put torchvision's ImageNet weights for the ResNets where the trainer reads them.

    python -m asc_dist.weights list
    python -m asc_dist.weights fetch NAME [--from FILE] [--mirror URL]

``model.pretrained=imagenet`` reads torchvision's ``IMAGENET1K_V1`` file of the ResNet from torch
hub's cache (:func:`asc_dist.model.imagenet_weights_file`, under ``TORCH_HOME``) and never
downloads it. ``fetch`` puts it there: downloaded from torchvision's URL (or the same file name
under ``--mirror URL``) with the datasets' downloader (resumable, retried, written as ``.part``
and renamed once checked), or, on a machine without network, copied atomically from ``--from
FILE``, a file brought over from elsewhere. Either way the file is checked the way torch hub's
``check_hash`` does: torchvision names each file ``<name>-<first 8 hex digits of its
sha256>.pth``, and the file's sha256 must start with that prefix.

timm's weights carry no hash in their file names (they are published on the Hugging Face hub by
repository and revision), so there would be nothing to check a download against: for them only
``--from FILE`` would apply, with the file trusted as given. asc-dist builds its timm models
(``seresnet*``) without ImageNet weights today, so this command offers the ResNets only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from pathlib import Path

from asc_dist import atomic
from asc_dist.cli import command
from asc_dist.datasets import NetworkError, Remote, fetch_all, folder_url, mismatch
from asc_dist.errors import FetchError
from asc_dist.model import RESNETS, imagenet_weights, imagenet_weights_file

log = logging.getLogger(__name__)

# torch.hub's HASH_REGEX, asking for at least the 8 digits torchvision uses
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")
NAMES = tuple(RESNETS)


def source(name: str) -> tuple[str, Path]:
    """The URL of ResNet ``name``'s ImageNet weights and where the trainer reads them."""
    if name not in NAMES:
        raise FetchError(f"unknown weights {name!r}; known: {', '.join(NAMES)}")
    return imagenet_weights(name).url, imagenet_weights_file(name)


def remote(name: str, mirror: str | None = None) -> Remote:
    """What to download for ``name``: checked against the sha256 prefix in its file name."""
    url, dest = source(name)
    m = HASH_IN_NAME.search(dest.name)
    if not m:
        raise FetchError(f"{dest.name}: no sha256 prefix in the file name to check it against")
    if mirror:
        url = folder_url(mirror, "--mirror") + dest.name
    return Remote(url, dest, m.group(1), "sha256")


def install_from(r: Remote, src: Path) -> None:
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
            raise FetchError(f"{src}: {why} (the prefix in {r.dest.name}): not torchvision's "
                             f"file for this name; nothing installed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asc_dist.weights",
                                description="Install torchvision's ImageNet ResNet weights into "
                                            "torch hub's cache ($TORCH_HOME/hub/checkpoints).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="each ResNet's weights file and whether it is installed")
    get = sub.add_parser("fetch", help="download (or --from FILE: copy) one, checked")
    get.add_argument("name", help=", ".join(NAMES))
    get.add_argument("--from", dest="src", type=Path, metavar="FILE",
                     help="install this file (obtained elsewhere) instead of downloading")
    get.add_argument("--mirror", metavar="URL", help="download the same file name from URL")
    return p


@command("asc_dist.weights")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        for name in NAMES:
            _, dest = source(name)
            print(f"{name:<10} {dest.name:<26} {'installed' if dest.is_file() else 'missing'}")
        log.info("folder: %s", source(NAMES[0])[1].parent)
        return 0
    r = remote(args.name, args.mirror)
    if args.src is not None:
        install_from(r, args.src)
    else:
        try:
            fetch_all([r])
        except NetworkError as e:
            raise NetworkError(f"{e}; offline? copy the file from a machine with network and "
                               f"install it with: python -m asc_dist.weights fetch {args.name} "
                               "--from FILE") from None
    log.info("%s: %s installed and checked", args.name, r.dest)
    return 0


if __name__ == "__main__":
    # the imported copy, whose logger is asc_dist.weights (under -m this one's is __main__)
    from asc_dist.weights import main as _main

    raise SystemExit(_main())
