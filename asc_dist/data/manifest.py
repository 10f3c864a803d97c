"""A packed split as the readers see it: manifest + DALI index files, checked before any read.

Opening a split costs one ``stat`` per tar and a parse of the (small) text indexes, and catches
most bad data with a message naming the shard and key: a missing or truncated tar (size differs
from the manifest), an index that disagrees with the manifest, a sample missing a component.
What only shows while reading (a corrupt tar header, non-WAV bytes) is found by
:func:`diagnose`, which the backends call to turn a bare library error into one naming the
shard and key.

Integrity: ``samples.jsonl`` holds one digest per tar member (asc_dist.digest); ``load_split``
attaches them to the samples, and :func:`read_member` / :func:`check_member` compare the bytes a
reader has just read against them (``data.verify``), so a shard corrupted without changing its
size (which the size checks above cannot see) fails naming the shard and key. Splits packed
before the digests existed still load, with one note. Whole shards (size + sha256) and every
member: ``python -m asc_dist.data verify`` (asc_dist.data.verify).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from asc_dist.digest import NAME as DIGEST
from asc_dist.digest import digest
from asc_dist.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    index_path: Path
    samples: int
    bytes: int
    sha256: str | None


@dataclass(frozen=True)
class Sample:
    key: str
    shard: int  # position in SplitIndex.shards
    audio: tuple[int, int]  # (data offset, size) of <key>.wav inside the tar
    label: tuple[int, int]  # (data offset, size) of <key>.i32
    # {extension: digest} of its members from samples.jsonl; None: packed before digests existed
    digests: dict[str, int] | None = field(default=None, compare=False, repr=False)
    device: str | None = None  # the recording device samples.jsonl names (meta.csv's source_label)


@dataclass
class SplitIndex:
    split: str
    dir: Path
    classes: list[str]
    labelled: bool
    sample_rate: int
    shards: list[Shard]
    samples: list[Sample]  # stored order: shard by shard, as DALI enumerates them
    audio_ext: str = "wav"
    label_ext: str = "i32"
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def where(self, i: int) -> str:
        s = self.samples[i]
        return f"shard {self.shards[s.shard].path} (sample key '{s.key}')"

    @property
    def has_digests(self) -> bool:
        """True when samples.jsonl carries per-member digests (packs since they exist)."""
        return bool(self.samples) and self.samples[0].digests is not None

    @property
    def resampler(self) -> str:
        """The resampler the split was packed with (asc_dist.audio.RESAMPLERS; older packs: soxr)."""
        from asc_dist.audio import RESAMPLER

        return (self.manifest.get("settings") or {}).get("resampler") or RESAMPLER

    def device_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            counts[str(s.device)] = counts.get(str(s.device), 0) + 1
        return dict(sorted(counts.items()))

    def device_ids(self, devices) -> np.ndarray | None:
        """Stored-order ids of the clips recorded by ``devices`` (``data.devices``), or None for
        every clip (an empty list). A device the split lacks is refused, naming what it has."""
        want = [str(d) for d in devices or ()]
        if not want:
            return None
        have = self.device_counts()
        unknown = [d for d in want if d not in have]
        if unknown:
            listed = ", ".join(f"{d} ({n})" for d, n in have.items())
            raise DataError(f"data.devices={want}: split '{self.split}' in {self.dir.parent} has no "
                            f"clip of device {', '.join(unknown)}; its devices (clips): {listed}")
        chosen = set(want)
        return np.array([i for i, s in enumerate(self.samples) if s.device in chosen], dtype=np.int64)


def _parse_index(shard: Shard, audio_ext: str, label_ext: str, shard_pos: int) -> list[Sample]:
    try:
        lines = shard.index_path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read index {shard.index_path} of shard {shard.path}: {e}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise DataError(f"index {shard.index_path} of shard {shard.path}: bad header {lines[:1]!r}")
    count = int(head[1])
    body = [line for line in lines[1:] if line.strip()]
    if count != len(body) or count != shard.samples:
        raise DataError(
            f"index {shard.index_path} lists {len(body)} samples (header {count}) but the manifest "
            f"says shard {shard.path} has {shard.samples}: stale index or manifest; re-pack"
        )
    out = []
    for n, line in enumerate(body, start=2):
        f = line.split()
        if len(f) % 4:
            raise DataError(f"index {shard.index_path}:{n}: expected 'ext offset size name' groups")
        parts, key = {}, None
        for ext, off, size, name in zip(f[0::4], f[1::4], f[2::4], f[3::4]):
            parts[ext] = (int(off), int(size))
            base = name.rsplit("/", 1)[-1]
            key = key or base.split(".", 1)[0]
        for ext in (audio_ext, label_ext):
            if ext not in parts:
                raise DataError(
                    f"shard {shard.path}: sample '{key}' has no .{ext} component "
                    f"(index line {n}; components: {sorted(parts)})"
                )
        a_off, a_size = parts[audio_ext]
        l_off, l_size = parts[label_ext]
        if l_size != 4:
            raise DataError(f"shard {shard.path}: sample '{key}' .{label_ext} is {l_size} bytes, not 4")
        end = max(o + s for o, s in parts.values())
        if end > shard.bytes:
            raise DataError(
                f"shard {shard.path}: sample '{key}' ends at byte {end} past the tar's end "
                f"({shard.bytes}); truncated or stale index"
            )
        out.append(Sample(key=key, shard=shard_pos, audio=(a_off, a_size), label=(l_off, l_size)))
    return out


def require_split(root: str | os.PathLike, split: str) -> Path:
    """``<root>/<split>``, or a DataError saying how to make it."""
    split_dir = Path(root) / split
    if not (split_dir / "manifest.json").is_file():
        raise DataError(
            f"no manifest at {split_dir / 'manifest.json'} (data.shards={root}, split '{split}'): "
            f"pack the dataset with 'python -m asc_dist.pack DATASET {root}'"
        )
    return split_dir


def manifest_digest(split_dir: Path) -> str:
    """Identity of a packed split: re-packing into the same folder changes it."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    ids = [(s.get("name"), s.get("sha256"), s.get("samples")) for s in manifest.get("shards", [])]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def load_split(root: str | os.PathLike, split: str) -> SplitIndex:
    """Read and cross-check ``<root>/<split>/manifest.json``, its tars and index files."""
    split_dir = require_split(root, split)
    mpath = split_dir / "manifest.json"
    try:
        m = json.loads(mpath.read_text())
        classes = list(m["classes"])
        shard_recs = m["shards"]
        num = int(m["num_samples"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{mpath}: not a shard manifest ({type(e).__name__}: {e})") from None
    comps = m.get("components") or {}
    audio_ext = comps.get("audio", "wav")
    label_ext = comps.get("label_int", "i32")
    shards = []
    for rec in shard_recs:
        path = split_dir / rec["name"]
        index_path = path.with_suffix(".idx")
        if not path.is_file():
            raise DataError(f"shard {path} listed in {mpath} is missing")
        if not index_path.is_file():
            raise DataError(f"index {index_path} for shard {path} is missing (re-pack, or run wds2idx)")
        size = path.stat().st_size
        if rec.get("bytes") is not None and size != int(rec["bytes"]):
            raise DataError(
                f"shard {path} is {size} bytes but {mpath} says {rec['bytes']}: truncated or "
                f"replaced since packing; re-pack or restore it"
            )
        shards.append(Shard(rec["name"], path, index_path, int(rec["samples"]), size, rec.get("sha256")))
    if not shards:
        raise DataError(f"{mpath} lists no shards")
    samples: list[Sample] = []
    for i, sh in enumerate(shards):
        samples.extend(_parse_index(sh, audio_ext, label_ext, i))
    if len(samples) != num:
        raise DataError(f"{mpath}: num_samples={num} but its shards hold {len(samples)} samples")
    samples = _with_digests(split_dir, shards, samples)
    sr = int((m.get("audio") or {}).get("sample_rate") or 0)
    return SplitIndex(split=split, dir=split_dir, classes=classes, labelled=bool(m.get("labelled", True)),
                      sample_rate=sr, shards=shards, samples=samples, audio_ext=audio_ext,
                      label_ext=label_ext, manifest=m)


# --------------------------------------------------------------------------- digests

_noted: set[Path] = set()  # split dirs already reported as carrying no digests (one note each)


def pack_command(split_dirs: list[Path]) -> str:
    """The ``pack`` command that rewrites these splits (of one root), with the dataset path their
    manifest recorded (``DATASET`` when it has none) and the split lists they were selected by
    (``--train-list``: without it a repack would hold the whole fold, not the subset)."""
    source, lists, fold = "DATASET", [], ""
    for i, d in enumerate(split_dirs):
        try:
            settings = json.loads((d / "manifest.json").read_text()).get("settings") or {}
            if i == 0:
                source = settings.get("source") or source
                # --fold all: without it a repack would hold fold 1's train list, not every clip
                fold = f" --fold {settings['fold']}" if settings.get("fold", 1) != 1 else ""
            chosen = settings.get("split_list")
            if chosen:
                lists.append(f" {chosen['option']} {shlex.quote(chosen['path'])}")
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            pass
    return (f"python -m asc_dist.pack {source} {split_dirs[0].parent}{fold} --splits "
            f"{','.join(d.name for d in split_dirs)}{''.join(lists)} --overwrite")


def repack_hint(split_dir: Path) -> str:
    """How to check and repack the split in ``split_dir`` (for the end of an error message)."""
    return (f"check it with 'python -m asc_dist.data verify {split_dir.parent}' and repack with "
            f"'{pack_command([split_dir])}' (with the options it was packed with), or restore "
            f"the file")


class Record(NamedTuple):
    """One line of ``samples.jsonl`` as the readers use it."""

    key: str
    shard: str | None
    digests: dict[str, int] | None  # None on a line of an older pack
    device: str | None


def read_digests(split_dir: Path) -> list[Record] | None:
    """A :class:`Record` per line of ``samples.jsonl``; None when the file is missing."""
    path = split_dir / "samples.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            d = r.get(DIGEST)
            out.append(Record(r["key"], r.get("shard"),
                              None if d is None else {ext: int(h, 16) for ext, h in d.items()},
                              r.get("device")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}:{n}: not a sample record ({type(e).__name__}: {e}); "
                            f"repack the split") from None
    return out


def _with_digests(split_dir: Path, shards: list[Shard], samples: list[Sample]) -> list[Sample]:
    """``samples`` with their digests from samples.jsonl (cross-checked against the indexes), or
    as they are, with one note per split and process, for a split packed before digests."""
    records = read_digests(split_dir)
    if records and all(r.digests is not None for r in records):
        if len(records) != len(samples):
            raise DataError(f"{split_dir / 'samples.jsonl'} lists {len(records)} samples but the "
                            f"index files {len(samples)}: stale samples.jsonl or index; repack the split")
        out = []
        for n, (s, r) in enumerate(zip(samples, records), start=1):
            if r.key != s.key or (r.shard is not None and r.shard != shards[s.shard].name):
                raise DataError(
                    f"{split_dir / 'samples.jsonl'}:{n} lists sample '{r.key}' of {r.shard} where "
                    f"the index has '{s.key}' of {shards[s.shard].name}: stale samples.jsonl or "
                    f"index; repack the split")
            out.append(replace(s, digests=r.digests, device=r.device))
        return out
    if records and len(records) == len(samples):  # an older pack still names its devices
        samples = [replace(s, device=r.device) if r.key == s.key else s
                   for s, r in zip(samples, records)]
    if split_dir.resolve() not in _noted:
        _noted.add(split_dir.resolve())
        log.warning(f"shards in {split_dir} carry no per-member digests (packed before asc_dist "
                    f"recorded them), so reads cannot be checked for corruption: check the "
                    f"shards with 'python -m asc_dist.data verify {split_dir.parent}', or repack "
                    f"them ('{pack_command([split_dir])}') to add the digests")
    return samples


def check_member(index: SplitIndex, i: int, ext: str, data) -> None:
    """Raise DataError unless ``data`` (bytes or any buffer) matches the digest samples.jsonl
    records for sample ``i``'s ``.ext`` member (nothing to check on older packs)."""
    want = index.samples[i].digests
    if want is None or ext not in want:
        return
    got = digest(data)
    if got != want[ext]:
        raise DataError(
            f"{index.where(i)}: .{ext} member does not match its {DIGEST} digest in samples.jsonl "
            f"(read {got:016x}, packed {want[ext]:016x}): the shard was damaged or changed after "
            f"packing; {repack_hint(index.dir)}")


# --------------------------------------------------------------------------- member reads


def _header_problem(header: bytes, name: str, size: int) -> str | None:
    """Why the 512-byte tar header in front of a member is not the one the index promises."""
    if len(header) < 512:
        return "tar header cut short (truncated shard)"
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        want = int(stored or b"0", 8)
    except ValueError:
        return "corrupt tar header (unreadable checksum)"
    if sum(header[:148]) + 8 * 32 + sum(header[156:512]) != want:
        return "corrupt tar header (checksum mismatch)"
    hname = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if len(name) < 100 and hname != name:
        return f"tar header names '{hname}', the index expects '{name}' (stale index?)"
    field = header[124:136]
    if not field[0] & 0x80:  # base-256 sizes (huge members) are not ours to check
        try:
            hsize = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return "corrupt tar header (unreadable size)"
        if hsize != size:
            return f"tar header size {hsize} != index size {size} (stale index?)"
    return None


def read_member(fd: int, index: SplitIndex, i: int, which: str = "audio", check_header: bool = True,
                limit: int | None = None, verify: bool = False) -> bytes:
    """Bytes of sample ``i``'s audio or label component via ``os.pread`` (no shared file offset);
    with ``limit``, only its first ``limit`` bytes. ``verify``: check the whole member against
    its digest (:func:`check_member`)."""
    s = index.samples[i]
    off, size = s.audio if which == "audio" else s.label
    ext = index.audio_ext if which == "audio" else index.label_ext
    start = off - 512 if check_header else off
    end = off + (size if limit is None else min(size, limit))
    blob = os.pread(fd, end - start, start)
    if len(blob) != end - start:
        raise DataError(f"{index.where(i)}: .{ext} cut short at the tar's end (truncated shard)")
    if check_header:
        problem = _header_problem(blob[:512], f"{s.key}.{ext}", size)
        if problem:
            raise DataError(f"{index.where(i)}: {problem}")
        blob = blob[512:]
    if verify and limit is None:
        check_member(index, i, ext, blob)
    return blob


def diagnose(index: SplitIndex, sample_ids=None, deep: bool = False) -> str | None:
    """First problem found in ``sample_ids`` (default all): 'shard X (sample key K): why'.

    Checks what can be checked without decoding: both members' tar headers against the index
    and the WAV magic, one small read per member. ``deep`` also parses each audio header
    (soundfile on its first 4 KiB), which finds what makes a decoder give up.
    """
    ids = range(index.num_samples) if sample_ids is None else sample_ids
    fds: dict[int, int] = {}
    try:
        for i in ids:
            sh = index.samples[i].shard
            if sh not in fds:
                try:
                    fds[sh] = os.open(index.shards[sh].path, os.O_RDONLY)
                except OSError as e:
                    return f"shard {index.shards[sh].path}: cannot open: {e}"
            s = index.samples[i]
            if os.fstat(fds[sh]).st_size < max(s.audio[0] + s.audio[1], s.label[0] + s.label[1]):
                return f"{index.where(i)}: the tar ends before this sample does (truncated shard)"
            try:
                read_member(fds[sh], index, i, "label")
                head = read_member(fds[sh], index, i, "audio", limit=4096 if deep else 12)
            except DataError as e:
                return str(e)
            if index.audio_ext == "wav" and not (head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE"):
                return f"{index.where(i)}: .wav component is not a WAV file (starts {head[:12]!r})"
            if deep:
                import soundfile as sf

                try:
                    sf.info(io.BytesIO(head))
                except Exception as e:  # noqa: BLE001 - libsndfile's errors vary by format
                    msg = str(e).split(": ", 1)[-1]
                    return f"{index.where(i)}: unreadable .{index.audio_ext} header ({msg})"
    finally:
        for fd in fds.values():
            os.close(fd)
    return None
