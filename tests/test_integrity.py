"""Shard integrity: per-member digests recorded at pack time, checked by every reader (torch
backend, DALI backend, the feature-cache build) as it reads, the ``data.verify`` switch, splits
packed before digests existed, and ``python -m asc_dist.data verify``."""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
import torch
import xxhash
from test_data import BACKENDS, HAVE_DALI, SMALL, cfg_for, source

from asc_dist.data import DataError, build_source
from asc_dist.data import cli as data_cli
from asc_dist.data import manifest as manifest_mod
from asc_dist.data.cache import cache_path
from asc_dist.data.manifest import load_split


def _copy(packed_shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(packed_shards, out, ignore=shutil.ignore_patterns("features-*", "stats-*"))
    return out


def _member(shards: Path, split: str, shard: int, sample: int, ext: str) -> tuple[Path, str, int, int]:
    """(tar, key, data offset, size) of one member, from the DALI index."""
    idx = shards / split / f"{split}-{shard:06d}.idx"
    f = idx.read_text().splitlines()[1 + sample].split()
    for e, off, size, name in zip(f[0::4], f[1::4], f[2::4], f[3::4]):
        if e == ext:
            return idx.with_suffix(".tar"), name.split(".")[0], int(off), int(size)
    raise AssertionError(ext)


def _corrupt(shards: Path, ext: str = "wav", split: str = "train", shard: int = 2, sample: int = 1) -> tuple[Path, str]:
    """Same-size damage: 64 zero bytes in the middle of an audio member, or the int32 label
    turned into another valid class (a silently wrong label). Returns (tar, key)."""
    tar, key, off, size = _member(shards, split, shard, sample, ext)
    data = bytearray(tar.read_bytes())
    before = len(data)
    if ext == "wav":
        mid = off + size // 2
        assert any(data[mid:mid + 64])  # real audio there, so zeroing it changes the bytes
        data[mid:mid + 64] = bytes(64)
    else:
        (label,) = struct.unpack("<i", data[off:off + 4])
        data[off:off + 4] = struct.pack("<i", (label + 1) % 10)
    tar.write_bytes(bytes(data))
    assert tar.stat().st_size == before  # the size checks cannot see it
    return tar, key


def _drain(shards: Path, backend: str, *extra: str) -> list[str]:
    src = source(shards, backend, "train", train=False, batch=3, extra=extra)
    try:
        return [k for b in src.epoch(0) for k, ok in zip(b.keys, b.valid.tolist()) if ok]
    finally:
        src.close()


def test_pack_records_a_digest_per_member_in_samples_jsonl_only(packed_shards):
    for split in ("train", "test"):
        lines = [json.loads(x) for x in (packed_shards / split / "samples.jsonl").read_text().splitlines()]
        members = {}
        for tar in sorted((packed_shards / split).glob("*.tar")):
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    members[m.name] = t.extractfile(m).read()
        assert len(members) == 4 * len(lines)
        for r in lines:
            assert set(r["xxh3_64"]) == {"wav", "cls", "i32", "json"}
            key = r["key"]
            for ext, hexd in r["xxh3_64"].items():
                assert hexd == f"{xxhash.xxh3_64_intdigest(members[f'{key}.{ext}']):016x}"
            # the tar's own metadata member is as before: the digests live in samples.jsonl only
            assert "xxh3_64" not in json.loads(members[f"{key}.json"])


@pytest.mark.parametrize("ext", ["wav", "i32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_size_corruption_is_named_and_verify_false_reads_through(packed_shards, tmp_path, backend, ext):
    shards = _copy(packed_shards, tmp_path)
    tar, key = _corrupt(shards, ext)
    with pytest.raises(DataError) as e:
        _drain(shards, backend)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{tar} (sample key '{key}'): .{ext} member does not match its xxh3_64 digest" in msg
    assert f"python -m asc_dist.data verify {shards}" in msg and "--overwrite" in msg
    source_dir = json.loads((shards / "train" / "manifest.json").read_text())["settings"]["source"]
    assert f"python -m asc_dist.pack {source_dir} {shards} --splits train --overwrite" in msg
    # data.verify=false (benchmarking only) reads the damaged sample like any other
    keys = _drain(shards, backend, "data.verify=false")
    assert key in keys and len(keys) == load_split(shards, "train").num_samples


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI not installed")
def test_dali_pool_check_of_the_gpu_path(packed_shards, tmp_path):
    """With a GPU, DALI hashes in a thread pool while the features are copied: the same check,
    run here on the CPU pipeline by giving it the pool."""
    from concurrent.futures import ThreadPoolExecutor

    shards = _copy(packed_shards, tmp_path)
    src = source(shards, "dali", "train", train=False, batch=3)
    src._hasher = ThreadPoolExecutor(2)
    try:
        assert sum(int(b.valid.sum()) for b in src.epoch(0)) == 20  # clean: everything passes
        tar, key = _corrupt(shards, sample=3)
        with pytest.raises(DataError, match=rf"{tar} \(sample key '{key}'\): \.wav member does not"):
            list(src.epoch(0))
    finally:
        src.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_build_refuses_corrupt_shard_and_does_not_trust_an_unchecked_table(
        packed_shards, tmp_path, backend):
    shards = _copy(packed_shards, tmp_path)
    tar, key = _corrupt(shards)

    def cached(*extra):
        return build_source(cfg_for(shards, backend, *extra), "train", train=True, rank=0,
                            world_size=1, device=torch.device("cpu"), batch_size=3, seed=0,
                            cache="device")

    path = cache_path(cfg_for(shards, backend), "train", backend, torch.device("cpu"))
    with pytest.raises(DataError, match=rf"{tar} \(sample key '{key}'\): \.wav member does not match"):
        cached()
    assert not path.exists()  # nothing was computed from the damaged bytes
    cached("data.verify=false").close()  # the switch: built from whatever the shards hold
    assert torch.load(path, weights_only=True)["verified"] is False
    with pytest.raises(DataError, match=rf"sample key '{key}'"):  # rebuilt with the check, not loaded
        cached()


def test_shards_packed_before_digests_load_with_one_note(packed_shards, tmp_path, capsys, monkeypatch, cli):
    shards = _copy(packed_shards, tmp_path)
    for split in ("train", "test"):
        p = shards / split / "samples.jsonl"
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        p.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "xxh3_64"}) + "\n"
                             for r in rows))
    _corrupt(shards)  # not detectable while reading without digests: what the note is about
    monkeypatch.setattr(manifest_mod, "_noted", set())
    capsys.readouterr()
    assert not load_split(shards, "train").has_digests
    for backend in ("torch", "dali") if HAVE_DALI else ("torch",):
        assert len(_drain(shards, backend)) == 20
    load_split(shards, "train")
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "per-member digests" in ln]
    assert len(notes) == 1, notes
    assert str(shards / "train") in notes[0] and f"python -m asc_dist.data verify {shards}" in notes[0]
    assert "--overwrite" in notes[0]
    # verify still checks sizes and sha256s, and says the members could not be checked
    r = cli(data_cli.main, ["verify", shards / "test", "--no-progress"])
    assert r.returncode == 0 and "no per-member digests" in r.stdout, r
    r = cli(data_cli.main, ["verify", shards, "--no-progress"])
    assert r.returncode == 2 and "train-000002.tar: sha256" in r.stdout, r


def test_verify_cli_passes_clean_shards_and_names_every_bad_one(packed_shards, tmp_path, cli):
    ok = cli(data_cli.main, ["verify", packed_shards, "--jobs", "2"])
    assert ok.returncode == 0, ok
    assert "2 split(s), 10 shards, 40 samples, 160 members" in ok.stdout
    assert "train: 5 shards, 20 samples: OK" in ok.stdout and "BAD" not in ok.stdout
    assert "verify" in ok.stderr  # the progress bar

    shards = _copy(packed_shards, tmp_path)
    tar, key = _corrupt(shards)
    short = shards / "test" / "test-000001.tar"
    with open(short, "r+b") as f:
        f.truncate(short.stat().st_size - 1024)
    bad = cli(data_cli.main, ["verify", shards, "--jobs", "2", "--no-progress"])
    assert bad.returncode == 2, bad
    lines = [ln for ln in bad.stdout.splitlines() if ln.startswith("BAD ")]
    assert any(ln.startswith(f"BAD {tar} (sample key '{key}'): .wav member does not match its "
                             f"xxh3_64 digest") for ln in lines)
    assert any(ln.startswith(f"BAD {tar}: sha256") for ln in lines)
    assert any(ln.startswith(f"BAD {short}:") and "bytes, manifest.json says" in ln for ln in lines)
    assert "train: 5 shards, 20 samples: 1 bad shard(s)" in bad.stdout
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asc_dist.data: error: ") and "--overwrite" in err[0]
    assert "Traceback" not in bad.stderr
    # one split's folder works too
    assert cli(data_cli.main, ["verify", shards / "train", "--no-progress"]).returncode == 2
    missing = cli(data_cli.main, ["verify", tmp_path / "nowhere"])
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_bench_integrity_smoke(packed_shards, capsys):
    from asc_dist import bench

    rc = bench.main(["integrity", "--shards", str(packed_shards), "--batches", "1", "--batch-size", "2",
                         "--threads", "1", "--repeat", "1", "--backends", "torch", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0 and "hash per clip" in out and "xxh3_64" in out
    assert "torch cache build clips/s" in out and "torch streaming   clips/s" in out
