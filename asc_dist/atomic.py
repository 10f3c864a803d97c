"""Atomic writes of files and directories: a reader sees the previous complete version or the new
one, never a torn one, and a failed write (a full disk included) leaves the previous one intact.

Files: write a temporary in the same directory, fsync it, ``os.replace`` it over the target,
fsync the directory so the rename itself survives a crash. Directories: build a temporary
sibling, then swap it in (the old one moves aside first and is removed after).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from asc_dist.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(UserError):
    """The file system is full; the message names the path and the space left."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: str | Path) -> int:
    """Bytes free on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def no_space(path: str | Path, what: str = "") -> NoSpaceError:
    """The error to raise when writing ``path`` ran out of space."""
    what = f" {what}" if what else ""
    return NoSpaceError(f"no space left on device writing{what} {path}: "
                        f"{human_bytes(free_space(path))} free there; free some space or write "
                        f"elsewhere (the previous version, if any, is intact)")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


@contextmanager
def writing(path: str | Path, mode: str = "wb", *, what: str = "",
            need_bytes: int = 0) -> Iterator[IO]:
    """``with writing(p) as f: f.write(...)`` -> ``p`` replaced atomically when the block ends.

    On any failure the temporary is removed and ``p`` is untouched. A full disk raises
    :class:`NoSpaceError` naming ``p`` (libraries such as torch report it in their own words,
    so a failure with less than ``need_bytes`` free counts as a full disk too).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, OSError) and e.errno in _FULL
        if not full and need_bytes and isinstance(e, Exception):
            full = free_space(path) < need_bytes
        if full:
            raise no_space(path, what) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with writing(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def replace_dir(staged: Path, target: Path) -> None:
    """Put the complete directory ``staged`` at ``target``; ``target`` always holds the old
    complete version or the new one."""
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """``with staged_dir(out) as tmp: <fill tmp>`` -> ``tmp`` becomes ``out`` when the block ends.

    An existing ``out`` is refused unless ``overwrite``. On failure the temporary is removed and
    ``out`` is untouched. Several of these in one ``ExitStack`` swap in together at its end.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    except OSError as e:
        if e.errno in _FULL:
            raise no_space(target) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
