"""``python -m asc_dist.data verify SHARDS [--jobs N]``: every shard of every split, end to end.

The readers check each member they read against its digest (``data.verify``), but none of them
sees a whole shard in order, so the sha256 of each shard in ``manifest.json`` is checked here:
for each shard its size and sha256 against manifest.json, its DALI index against the manifest
and ``samples.jsonl``, and every member (audio, labels, metadata) against its digest in
``samples.jsonl``. Each shard is read once (memory-mapped): sha256 and the member digests are
computed from the same pages, shards in parallel (``--jobs``; hashing releases the GIL, so threads
suffice). Splits packed before per-member digests existed get the shard-level checks only, which
the summary says.

The summary goes to stdout; each problem is one line on stdout naming the shard (and the sample
key), and the command then fails with exit status 2 and one error line saying how to repack.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from asc_dist.digest import NAME as DIGEST
from asc_dist.digest import digest
from asc_dist.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    split: str
    path: Path
    bytes: int = 0
    samples: int = 0
    members: int = 0  # members checked against a digest
    problems: list[str] = field(default_factory=list)

    def bad(self, what: str, key: str | None = None) -> None:
        where = f"{self.path} (sample key '{key}')" if key else str(self.path)
        self.problems.append(f"{where}: {what}")


@dataclass
class SplitResult:
    dir: Path
    shards: list[ShardResult] = field(default_factory=list)
    has_digests: bool = True
    problems: list[str] = field(default_factory=list)  # split-level: manifest, samples.jsonl


def split_dirs(root: str | os.PathLike) -> list[Path]:
    """``root`` itself when it is a split (holds manifest.json), else its splits."""
    root = Path(root)
    if (root / "manifest.json").is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (pass a shard root holding <split>/manifest.json, "
                        f"or one split's folder)")
    found = sorted(d for d in root.iterdir() if (d / "manifest.json").is_file())
    if not found:
        raise DataError(f"{root}: no manifest.json in it or in its subfolders (pass a shard root "
                        f"holding <split>/manifest.json, or one split's folder)")
    return found


def _index_lines(idx: Path, res: ShardResult) -> list[tuple[str, list[tuple[str, int, int]]]] | None:
    """(key, [(extension, data offset, size)]) per sample line of a DALI index, or None."""
    try:
        lines = idx.read_text().splitlines()
    except OSError as e:
        res.bad(f"cannot read its index {idx}: {e}")
        return None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[1].isdigit():
        res.bad(f"index {idx} has a bad header {lines[:1]!r}")
        return None
    out = []
    for n, line in enumerate((ln for ln in lines[1:] if ln.strip()), start=2):
        f = line.split()
        if len(f) % 4 or not f:
            res.bad(f"index {idx}:{n}: expected 'ext offset size name' groups")
            return None
        try:
            parts = [(ext, int(off), int(size)) for ext, off, size in zip(f[0::4], f[1::4], f[2::4])]
        except ValueError:
            res.bad(f"index {idx}:{n}: unreadable offsets")
            return None
        out.append((f[3].rsplit("/", 1)[-1].split(".", 1)[0], parts))
    if int(head[1]) != len(out):
        res.bad(f"index {idx} header says {head[1]} samples but lists {len(out)}")
    return out


def check_shard(split: str, path: Path, rec: dict,
                expected: list[tuple[str, dict[str, int] | None]] | None) -> ShardResult:
    """One shard: size and sha256 against its manifest record, index against manifest and
    samples.jsonl, every member against its digest (``expected``: samples.jsonl's (key, digests)
    of this shard in order; None: not listed there)."""
    res = ShardResult(split, path)
    if not path.is_file():
        res.bad("missing (listed in manifest.json)")
        return res
    size = res.bytes = path.stat().st_size
    if rec.get("bytes") is not None and size != int(rec["bytes"]):
        res.bad(f"{size} bytes, manifest.json says {rec['bytes']} (truncated or replaced)")
    lines = _index_lines(path.with_suffix(".idx"), res)
    if lines is not None:
        res.samples = len(lines)
        if rec.get("samples") is not None and len(lines) != int(rec["samples"]):
            res.bad(f"its index lists {len(lines)} samples, manifest.json says {rec['samples']}")
        if expected is not None and [k for k, _ in expected] != [k for k, _ in lines]:
            res.bad("its index and samples.jsonl list different samples (stale index or samples.jsonl)")
            expected = None
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        if size == 0:
            view, mm = memoryview(b""), None
        else:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(mm)
        try:
            pos, ordered = 0, True  # sha256 runs along the file; each member is digested
            # while its pages are hot (an index with overlapping offsets: sha256 separately)
            for n, (key, parts) in enumerate(lines or []):
                want = expected[n][1] if expected is not None else None
                for ext, off, length in sorted(parts, key=lambda p: p[1]):
                    if off + length > size:
                        res.bad(f".{ext} member ends at byte {off + length}, past the end ({size})", key)
                        continue
                    if off >= pos:
                        sha.update(view[pos:off + length])
                        pos = off + length
                    else:
                        ordered = False
                    if want is not None and ext in want:
                        res.members += 1
                        got = digest(view[off:off + length])
                        if got != want[ext]:
                            res.bad(f".{ext} member does not match its {DIGEST} digest "
                                    f"(read {got:016x}, packed {want[ext]:016x})", key)
            sha.update(view[pos:])
            if not ordered:
                sha = hashlib.sha256(view)
        finally:
            view.release()
            if mm is not None:
                mm.close()
    if rec.get("sha256") and sha.hexdigest() != rec["sha256"]:
        res.bad(f"sha256 {sha.hexdigest()} differs from manifest.json's {rec['sha256']}")
    return res


def _digests_by_shard(split_dir: Path, res: SplitResult) -> dict[str, list] | None:
    """samples.jsonl's (key, digests) per shard name, in order; None without digests."""
    from asc_dist.data.manifest import read_digests

    try:
        records = read_digests(split_dir)
    except DataError as e:
        res.problems.append(str(e))
        records = None
    if not records or any(r.digests is None for r in records):
        res.has_digests = False
        return None
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(r.shard, []).append((r.key, r.digests))
    return by


def verify(root: str | os.PathLike, jobs: int = 1, progress: bool = True) -> list[SplitResult]:
    """Check every split under ``root`` (see the module doc); problems are in the results."""
    tasks, results = [], []
    for d in split_dirs(root):
        res = SplitResult(d)
        results.append(res)
        try:
            m = json.loads((d / "manifest.json").read_text())
            recs = list(m["shards"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            res.problems.append(f"{d / 'manifest.json'}: not a shard manifest ({type(e).__name__}: {e})")
            continue
        by = _digests_by_shard(d, res)
        for n, rec in enumerate(recs):
            if not isinstance(rec, dict) or not rec.get("name"):
                res.problems.append(f"{d / 'manifest.json'}: shard entry {n} has no name")
                continue
            tasks.append((res, d.name, d / rec["name"], rec, None if by is None else by.get(rec["name"], [])))
    total = sum(int(t[3].get("bytes") or 0) for t in tasks)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr,
               disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(check_shard, *t[1:]): t[0] for t in tasks}
            for fut in as_completed(futures):
                r = fut.result()
                futures[fut].shards.append(r)
                bar.update(r.bytes)
    finally:
        bar.close()
    for res in results:
        res.shards.sort(key=lambda r: r.path.name)
    return results


def run(args) -> int:
    from asc_dist.data import threads_per_process
    from asc_dist.data.manifest import pack_command

    jobs = threads_per_process(args.jobs)
    t0 = time.perf_counter()
    results = verify(args.shards, jobs=jobs, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    problems = [p for r in results for p in r.problems + [q for s in r.shards for q in s.problems]]
    shards = [s for r in results for s in r.shards]
    size = sum(s.bytes for s in shards)
    print(f"verified {args.shards}: {len(results)} split(s), {len(shards)} shards, "
          f"{sum(s.samples for s in shards)} samples, {sum(s.members for s in shards)} members "
          f"checked against their digests, {size / 1e6:.1f} MB in {dt:.1f} s "
          f"({size / 1e6 / max(dt, 1e-9):.0f} MB/s, {jobs} jobs)")
    for r in results:
        bad = sum(1 for s in r.shards if s.problems)
        state = "OK" if not bad and not r.problems else f"{bad} bad shard(s)"
        note = "" if r.has_digests else (
            " (no per-member digests: packed before they existed; sizes and sha256s checked, "
            "members not; repack with --overwrite to add them)")
        print(f"  {r.dir.name}: {len(r.shards)} shards, {sum(s.samples for s in r.shards)} "
              f"samples: {state}{note}")
    for p in problems:
        print(f"BAD {p}")
    if problems:
        bad_shards = sum(1 for s in shards if s.problems)
        bad_splits = [r.dir for r in results if r.problems or any(s.problems for s in r.shards)]
        raise DataError(
            f"{len(problems)} problem(s) in {bad_shards} shard(s) under {args.shards} (listed "
            f"above): restore those files, or repack with '{pack_command(bad_splits)}' (with the "
            f"options they were packed with)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="check shards against manifest.json (size, sha256) and samples.jsonl (digests)",
        description="Check every shard of every split: size and sha256 against manifest.json, the "
        "DALI index against the manifest and samples.jsonl, every member against its digest. "
        "Exit 0 when clean, 2 (one line per problem, naming shard and sample) otherwise.")
    p.add_argument("shards", metavar="SHARDS",
                   help="a shard root holding <split>/manifest.json, or one split's folder")
    p.add_argument("--jobs", type=int, default=0,
                   help="shards checked in parallel (0: this process's CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
