"""A dataset read straight from the zip parts it ships as, with nothing extracted to disk.

DCASE datasets come as ``<name>.audio.1.zip`` ... ``<name>.audio.N.zip``, ``<name>.meta.zip`` and
``<name>.doc.zip``, each holding its files under the one top folder ``<name>/``.
:class:`ZipSource` maps every member's path minus that folder to its (zip, member), so the
layouts read ``meta.csv`` and the fold lists as they would from the unpacked folder, and a decode
worker reads a clip's bytes with :func:`read_member` (each process opens every zip once, by path)
and decodes them from memory. The shards are byte-identical to packing the unpacked folder.

Locations in messages read ``<zip>/<member>``, as zipfile.Path and zipimport spell them.
"""

from __future__ import annotations

import logging
import os
import posixpath
import zipfile
import zlib
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from asc_dist.audio import AUDIO_EXTS
from asc_dist.errors import PackError
from asc_dist.pack.layouts import SETUP, DatasetSource, FolderSource, Member

log = logging.getLogger(__name__)

# What reading a damaged or unsupported member raises (zlib/EOF: a corrupt deflate stream).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, NotImplementedError,
                RuntimeError)
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# Folder names that are part of a layout, never a dataset's top folder: a zip holding only
# audio/... has no top folder to strip.
_LAYOUT_FOLDERS = {"audio", SETUP}


# This process's open zips. Spawned decode workers each open their own; pack() closes the
# parent's at the end (close_cached), where workers=1 decodes in-process.
_open: dict[str, zipfile.ZipFile] = {}


def read_member(m: Member) -> bytes:
    """The member's bytes (CRC checked by zipfile); ValueError naming the damage otherwise."""
    try:
        zf = _open.get(m.zip)
        if zf is None:
            zf = _open[m.zip] = zipfile.ZipFile(m.zip)
        return zf.read(m.name)
    except _READ_ERRORS as e:
        raise ValueError(f"unreadable zip member: {type(e).__name__}: {e}") from None


def close_cached() -> None:
    while _open:
        _open.popitem()[1].close()


def _is_zip(p: Path) -> bool:
    return p.suffix.lower() == ".zip"


def _top(infos: list[zipfile.ZipInfo]) -> str:
    """The one folder every member of a zip lies in ("" when there is none)."""
    tops = {i.filename.split("/", 1)[0] if "/" in i.filename else "" for i in infos}
    top = tops.pop() if len(tops) == 1 else ""
    return "" if top in _LAYOUT_FOLDERS else top


class ZipSource(DatasetSource):
    """One dataset's zip parts, indexed once: member path minus the top folder -> (zip, member)."""

    def __init__(self, zips: Sequence[Path], root: str):
        self.root = root
        self._files: dict[str, tuple[Path, zipfile.ZipInfo]] = {}
        self._dirs: set[str] = {""}
        listed = {z: self._members(z) for z in zips}
        tops = {z: _top(infos) for z, infos in listed.items() if infos}
        named = sorted({t for t in tops.values() if t})
        if len(named) > 1:
            which = "; ".join(f"{t}/ (in {', '.join(z.name for z, zt in tops.items() if zt == t)})"
                              for t in named)
            raise PackError(f"{root}: the zips hold more than one dataset: {which}; pack one "
                            "dataset at a time (pass its zip files)")
        self.top = named[0] if named else ""
        for z, infos in listed.items():
            cut = len(tops.get(z, "")) + 1 if tops.get(z) else 0
            for i in infos:
                rel = posixpath.normpath(i.filename[cut:]).lstrip("/")
                rel = "" if rel == "." else rel
                parent = rel if i.is_dir() else posixpath.dirname(rel)
                while parent not in self._dirs:
                    self._dirs.add(parent)
                    parent = posixpath.dirname(parent)
                if i.is_dir():
                    continue
                if rel in self._files:
                    z0, i0 = self._files[rel]
                    if (i0.CRC, i0.file_size) != (i.CRC, i.file_size):
                        raise PackError(f"{rel}: in {z0} and in {z} with different contents "
                                        f"({z0}/{i0.filename}, {z}/{i.filename})")
                    continue  # the same file in two parts: either copy will do
                self._files[rel] = (z, i)
        log.debug(f"{root}: {len(self._files)} files in {len(listed)} zips (top folder "
                  f"{self.top or 'none'})")

    @staticmethod
    def _members(z: Path) -> list[zipfile.ZipInfo]:
        try:
            with zipfile.ZipFile(z) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise PackError(f"{z}: not a readable zip file ({e}): it is damaged or incomplete; "
                            "download it again") from None
        infos = [i for i in infos if not i.filename.startswith("__MACOSX/")]  # macOS zip metadata
        for i in infos:
            if i.flag_bits & 0x1:
                raise PackError(f"{z}/{i.filename}: encrypted; unzip it and pack the folder")
            if i.compress_type not in _METHODS:
                raise PackError(f"{z}/{i.filename}: compression method {i.compress_type}, which "
                                "Python's zipfile cannot read; unzip it and pack the folder")
        return infos

    @staticmethod
    def _key(rel: str) -> str:
        rel = posixpath.normpath(rel)
        return "" if rel == "." else rel

    def is_file(self, rel: str) -> bool:
        return self._key(rel) in self._files

    def is_dir(self, rel: str) -> bool:
        return self._key(rel) in self._dirs

    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)
        if key not in self._files:
            raise FileNotFoundError(f"not in the zips: {self.locate(rel)}")
        z, info = self._files[key]
        try:
            with zipfile.ZipFile(z) as zf:
                return zf.read(info)
        except _READ_ERRORS as e:
            # OSError: what the layouts' readers catch and name the file with.
            raise OSError(f"unreadable zip member: {type(e).__name__}: {e}") from None

    def list(self, prefix: str = "") -> list[str]:
        key = self._key(prefix)
        start = f"{key}/" if key else ""
        return sorted(f for f in self._files if f.startswith(start))

    def glob(self, folder: str, pattern: str) -> list[str]:
        key = self._key(folder)
        return sorted(p for p in (*self._files, *self._dirs)
                      if p and posixpath.dirname(p) == key
                      and fnmatchcase(posixpath.basename(p), pattern))

    def locate(self, rel: str) -> str:
        key = self._key(rel)
        if key in self._files:
            z, info = self._files[key]
            return f"{z}/{info.filename}"
        inside = "/".join(p for p in (self.top, key) if p)
        return f"{inside} in {self.root}" if inside else self.root

    def ref(self, rel: str) -> Member:
        key = self._key(rel)
        if key in self._files:
            z, info = self._files[key]
            return Member(str(z), info.filename)
        return Member(None, "/".join(p for p in (self.top, key) if p))


def _unpacked(folder: Path) -> bool:
    """Does the folder itself hold an unpacked dataset (not just zips)?"""
    if (folder / "audio").is_dir() or (folder / SETUP).is_dir():
        return True
    return any(p.suffix.lower() in (".csv", *AUDIO_EXTS) for p in folder.iterdir())


def _one_dataset(folder: Path, zips: list[Path]) -> None:
    """Refuse a folder holding the zips of several datasets (told apart by the name before the
    first dot: TUT-urban-acoustic-scenes-2018-development.audio.1.zip)."""
    prefixes: dict[str, int] = {}
    for z in zips:
        p = z.name.split(".", 1)[0]
        prefixes[p] = prefixes.get(p, 0) + 1
    if len(prefixes) > 1:
        which = ", ".join(f"{p}.*.zip ({n})" for p, n in sorted(prefixes.items()))
        raise PackError(f"{folder} holds the zips of more than one dataset: {which}; pass one "
                        f"dataset's zip files instead (e.g. {folder}/{min(prefixes)}.*.zip)")


def open_source(dataset: str | os.PathLike | Sequence[str | os.PathLike]) -> DatasetSource:
    """What ``pack`` reads: a dataset folder, a folder holding one dataset's zip parts, or the zip
    files themselves (one path or several)."""
    paths = [Path(dataset)] if isinstance(dataset, (str, os.PathLike)) else [Path(p) for p in dataset]
    if not paths:
        raise PackError("no dataset given: pass a dataset folder or its zip files")
    if len(paths) == 1 and (paths[0].is_dir() or not _is_zip(paths[0])):
        folder = paths[0].resolve()
        if not folder.is_dir():
            raise PackError(f"dataset folder not found: {folder}")
        zips = sorted(p for p in folder.iterdir() if _is_zip(p) and p.is_file())
        if not zips:
            return FolderSource(folder)
        if _unpacked(folder):
            log.info(f"{folder}: packing the unpacked files; its {len(zips)} zip file(s) are not "
                     "read (pass them as paths to pack from them)")
            return FolderSource(folder)
        _one_dataset(folder, zips)
        return ZipSource(zips, str(folder))
    zips = []
    for p in paths:
        if p.is_dir():
            raise PackError(f"{p}: a folder among several dataset paths; pass one dataset folder, "
                            "or only zip files")
        if not _is_zip(p):
            raise PackError(f"{p}: not a .zip file; pass one dataset folder, or its zip files")
        if not p.is_file():
            raise PackError(f"zip file not found: {p}")
        if p.resolve() not in zips:
            zips.append(p.resolve())
    return ZipSource(sorted(zips), " ".join(str(z) for z in sorted(zips)))
