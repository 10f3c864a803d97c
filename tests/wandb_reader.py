"""Read a W&B offline run file back (tests use it to check what the trainer logged).

wandb 0.31 no longer ships a Python reader (wandb.sdk.internal.datastore is gone); the file is
wandb's LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs, decoded here with wandb's
own message classes.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file (header {data[:_HEADER]!r})")
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind == 0 or len(chunk) < length:  # zero fill or a truncated tail: the end
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += _HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end it
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _put(target: dict, item) -> None:
    """Store an item's JSON value under its key path (dict values arrive split per sub-key)."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


def read_wandb_file(path: str | Path, wait_s: float = 60.0) -> dict:
    """``run-<id>.wandb`` -> {"run_id", "project", "group", "job_type", "config", "history": [{...}], "summary"}.

    ``run.finish()`` can return before wandb's separate core process has flushed the file (seen in
    CI under load: only the header on disk), so wait up to ``wait_s`` for the run's exit record.
    """
    deadline = time.monotonic() + wait_s
    while True:
        records = list(_records(Path(path)))
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            return _collect(records)
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {wait_s:.0f} s; records: {kinds}")
        time.sleep(0.2)


def _collect(records) -> dict:
    out: dict[str, Any] = {
        "run_id": None,
        "project": None,
        "config": {},
        "history": [],
        "summary": {},
    }
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run_id"], out["project"] = r.run.run_id, r.run.project
            out["group"], out["job_type"] = r.run.run_group, r.run.job_type
            for item in r.run.config.update:
                _put(out["config"], item)
        elif kind == "config":
            for item in r.config.update:
                _put(out["config"], item)
        elif kind == "history":
            row: dict = {}
            for item in r.history.item:
                _put(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in r.summary.update:
                _put(out["summary"], item)
    return out
