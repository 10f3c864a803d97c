"""What a packed split says about itself: per-sample records, ``samples.jsonl``, ``manifest.json``.

The manifest lists the classes in order, counts per class, every shard with its sample count,
size and sha256, the audio format and the pack settings; readers (asc_dist.data.manifest) check
the shards against it before any read.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from pathlib import Path

from asc_dist import __version__
from asc_dist.digest import NAME as DIGEST
from asc_dist.pack.layouts import Entry, parse_name, sample_key

FORMAT = "asc-dist-shards/1"
COMPONENTS = {"audio": "wav", "label": "cls", "label_int": "i32", "meta": "json"}
# The per-sample fields samples.jsonl keeps (the .json member holds them all), plus the shard and
# one digest per member (asc_dist.digest), which only samples.jsonl holds: the tars are unchanged.
LISTED = ("key", "label", "scene", "city", "location", "device", "filename")


def sample_record(e: Entry, classes: list[str], meta_row: dict, stored: dict, sample_rate: int) -> dict:
    """Metadata of one packed clip; meta.csv's identifier (e.g. barcelona-0) wins over the name,
    and the device a list names (an evaluation set's device_id) over meta.csv and the name.

    ``stored``: frames and channels as packed, and the ``source`` file's format.
    """
    names = parse_name(e.filename)
    source = stored["source"]
    return {
        "key": sample_key(e.filename),
        "filename": e.filename,
        "scene": e.label,
        "label": classes.index(e.label) if e.label is not None else -1,
        "city": meta_row["identifier"].rsplit("-", 1)[0] if meta_row.get("identifier") else names["city"],
        "location": meta_row.get("identifier") or names["location"],
        "device": e.device or meta_row.get("source_label") or names["device"],
        "duration": stored["frames"] / sample_rate,
        "source_sample_rate": source["sample_rate"],
        "source_channels": source["channels"],
        "source_subtype": source["subtype"],
    }


def components(rec: dict, wav: bytes) -> list[tuple[str, bytes]]:
    """The tar members of one sample: audio, ASCII label, int32 label (for DALI), metadata."""
    return [
        ("wav", wav),
        ("cls", str(rec["label"]).encode("ascii")),
        ("i32", struct.pack("<i", rec["label"])),
        ("json", json.dumps(rec, sort_keys=True).encode("utf-8")),
    ]


def build(split: str, labelled: bool, classes: list[str], records: list[dict], shards: list[dict],
          channels: set[int], audio: dict, settings: dict, skipped: list[dict]) -> dict:
    counts = {c: 0 for c in classes}
    for r in records:
        if r["scene"] is not None:
            counts[r["scene"]] += 1
    return {
        "format": FORMAT,
        "split": split,
        "labelled": labelled,
        "classes": classes,
        "num_samples": len(records),
        "class_counts": counts if labelled else {},
        "shards": shards,
        "audio": {**audio, "format": "wav",
                  "channels": next(iter(channels)) if len(channels) == 1 else None},
        "components": dict(COMPONENTS),
        "settings": dict(settings),
        "skipped": skipped,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packer": f"asc_dist {__version__}",
    }


def write(split_dir: Path, records: list[dict], manifest: dict) -> None:
    """samples.jsonl (shard order) and manifest.json into a split being staged."""
    with open(split_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({k: rec[k] for k in LISTED} | {"shard": rec["shard"], DIGEST: rec[DIGEST]},
                               sort_keys=True) + "\n")
    (split_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
