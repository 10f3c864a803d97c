"""Batch sources: sharding, evaluation counts, determinism/resume, backend parity, bad shards,
and the DALI-less fallback. Ranks are simulated here; tests/test_data_dist.py runs real ones."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asc_dist import config
from asc_dist.data import Batch, DataError, build_source
from asc_dist.data.manifest import load_split

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
         "features.hop_length=400", "features.n_mels=64", "features.f_min=50", "features.f_max=8000",
         "features.clip_seconds=1.0", "features.frames=40", "data.num_threads=1",
         "data.cache=none"]  # the streaming sources; the feature cache: tests/test_cache.py
TOL_DB = 0.01

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI not installed")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]


def cfg_for(shards, backend="torch", *extra):
    return config.load([*SMALL, f"data.shards={shards}", f"data.backend={backend}", *extra], world_size=1)


def source(shards, backend, split="train", *, train=True, rank=0, world=1, batch=2, seed=0,
           device="cpu", extra=()):
    return build_source(cfg_for(shards, backend, *extra), split, train=train, rank=rank,
                        world_size=world, device=torch.device(device), batch_size=batch, seed=seed)


def manifest_labels(shards: Path, split: str) -> dict[str, int]:
    with open(shards / split / "samples.jsonl") as f:
        return {r["key"]: r["label"] for r in map(json.loads, f)}


def keys_of(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.keys]


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,batch", [(1, 3), (2, 3), (3, 2)])
def test_train_shares_disjoint_equal_and_complete(packed_shards, backend, world, batch):
    labels = manifest_labels(packed_shards, "train")
    n = len(labels)
    steps = n // (batch * world)
    epochs = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            src = source(packed_shards, backend, rank=rank, world=world, batch=batch)
            assert src.backend == backend and src.num_samples == n and src.steps_per_epoch == steps
            batches = list(src.epoch(epoch))
            src.close()
            assert len(batches) == steps  # equal step counts: no DDP hang at the epoch's end
            for b in batches:
                assert b.features.shape == (batch, 1, 64, 40) and b.features.dtype == torch.float32
                assert b.labels.dtype == torch.int64 and b.valid.dtype == torch.bool and b.valid.all()
                assert b.labels.tolist() == [labels[k] for k in b.keys]
                assert torch.isfinite(b.features).all()
            per_rank.append(keys_of(batches))
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat)) == steps * batch * world  # disjoint, no repeats
        assert set(flat) <= set(labels)  # the manifest minus this epoch's dropped remainder
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,batch", [(1, 3), (2, 3), (3, 4), (4, 6)])
def test_eval_scores_every_sample_exactly_once(packed_shards, backend, world, batch):
    labels = manifest_labels(packed_shards, "test")
    n = len(labels)
    assert n % (world * batch) != 0  # the interesting case: ranks need padding
    seen, step_counts = [], set()
    for rank in range(world):
        src = source(packed_shards, backend, "test", train=False, rank=rank, world=world, batch=batch)
        batches = list(src.epoch(0))
        step_counts.add(len(batches))
        assert len(batches) == src.steps_per_epoch
        for b in batches:
            assert b.features.shape[0] == batch
            for k, lab, v in zip(b.keys, b.labels.tolist(), b.valid.tolist()):
                if v:
                    seen.append(k)
                    assert lab == labels[k]
                else:
                    assert k == "" and lab == -1
        src.close()
    assert len(step_counts) == 1  # every rank runs the same number of eval batches
    assert sorted(seen) == sorted(labels)  # each sample once, none twice


def test_plans_are_pure_functions():
    from asc_dist.data.sharding import eval_plan, shard_range, train_plan

    sizes = [4, 4, 3, 5]
    a = train_plan(sizes, seed=1, epoch=2, rank=1, world_size=3, batch_size=2, buffer=3)
    assert a == train_plan(sizes, seed=1, epoch=2, rank=1, world_size=3, batch_size=2, buffer=3)
    assert len(a) == 16 // 6 and all(len(b) == 2 for b in a)
    assert a != train_plan(sizes, seed=1, epoch=3, rank=1, world_size=3, batch_size=2, buffer=3)
    # a rank's share itself changes between epochs, even with tars of a multiple of world samples
    shares = [{i for b in train_plan([4] * 6, seed=0, epoch=e, rank=0, world_size=2, batch_size=2,
                                     buffer=1) for i in b} for e in range(3)]
    assert shares[0] != shares[1] and shares[1] != shares[2]
    # DALI's shard split: contiguous, covering, sizes differing by at most one
    ranges = [shard_range(16, r, 3) for r in range(3)]
    assert ranges == [(0, 5), (5, 10), (10, 16)]
    plans = [eval_plan(16, rank=r, world_size=3, batch_size=4) for r in range(3)]
    assert {len(p) for p in plans} == {2}
    assert sorted(i for p in plans for b in p for i in b if i >= 0) == list(range(16))


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_order_epochs_differ_resume_continues(packed_shards, backend):
    def epoch_keys(epoch, seed=0, start=0):
        src = source(packed_shards, backend, rank=1, world=2, batch=2, seed=seed)
        out = list(src.epoch(epoch, start_step=start))
        src.close()
        return out

    e0, e0_again, e1 = epoch_keys(0), epoch_keys(0), epoch_keys(1)
    assert keys_of(e0) == keys_of(e0_again)
    assert keys_of(e0) != keys_of(e1)
    assert keys_of(epoch_keys(0, seed=5)) != keys_of(e0)
    resumed = epoch_keys(1, start=3)
    assert len(resumed) == len(e1) - 3
    for a, b in zip(resumed, e1[3:]):
        assert a.keys == b.keys
        assert torch.equal(a.features, b.features)  # bit-identical: resumed runs can match exactly
        assert torch.equal(a.labels, b.labels)
    assert epoch_keys(1, start=len(e1)) == []
    src = source(packed_shards, backend, rank=1, world=2, batch=2)
    with pytest.raises(ValueError, match="start_step"):
        src.epoch(0, start_step=len(e1) + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_epoch_then_next(packed_shards, backend):
    """The trainer may stop mid-epoch (max_iters) and close; nothing must hang or leak an error."""
    src = source(packed_shards, backend, batch=2)
    it = iter(src.epoch(0))
    next(it)
    it.close()
    assert len(list(src.epoch(1))) == src.steps_per_epoch
    it = iter(src.epoch(2))
    next(it)
    src.close()


# --------------------------------------------------------------------------- parity


@needs_dali
def test_dali_torch_librosa_parity_on_shards(packed_shards):
    import librosa

    got = {}
    for backend in ("dali", "torch"):
        src = source(packed_shards, backend, "test", train=False, batch=4)
        got[backend] = list(src.epoch(0))
        src.close()
    for a, b in zip(got["dali"], got["torch"]):
        assert a.keys == b.keys
        assert torch.equal(a.labels, b.labels)
        assert (a.features - b.features).abs().max().item() < TOL_DB

    # librosa over WAVs pulled out of the tars with tarfile (independent of our readers)
    feats = {k: x for b in got["dali"] for k, x in zip(b.keys, b.features)}
    checked = 0
    for tar in sorted((packed_shards / "test").glob("*.tar"))[:2]:
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if not m.name.endswith(".wav"):
                    continue
                wave, sr = sf.read(io.BytesIO(t.extractfile(m).read()), dtype="float32")
                assert sr == 16000
                wave = np.pad(wave, (0, max(0, 16000 - len(wave))))[:16000]
                power = librosa.feature.melspectrogram(
                    y=wave, sr=16000, n_fft=512, win_length=512, hop_length=400, window="hann",
                    center=True, pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=8000,
                    htk=False, norm="slaney")
                ref = 10 * np.log10(np.maximum(power, 1e-10))[:, :40]
                ours = feats[m.name[:-4]][0].numpy()
                assert ours.shape == ref.shape == (64, 40)
                assert np.abs(ours - ref).max() < TOL_DB
                checked += 1
    assert checked >= 4


# --------------------------------------------------------------------------- bad data


def _copy(packed_shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(packed_shards, out)
    return out


def _member_offset(shards: Path, split: str, shard: int, sample: int, ext: str = "wav") -> tuple[Path, str, int]:
    idx = shards / split / f"{split}-{shard:06d}.idx"
    fields = idx.read_text().splitlines()[1 + sample].split()
    for e, off, _size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
        if e == ext:
            return idx.with_suffix(".tar"), name.split(".")[0], int(off)
    raise AssertionError(ext)


def _patch(path: Path, at: int, data: bytes) -> None:
    b = bytearray(path.read_bytes())
    b[at:at + len(data)] = data
    path.write_bytes(bytes(b))


def _drain(shards, backend, split="train"):
    src = source(shards, backend, split, train=False, batch=3)
    for _ in src.epoch(0):
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_named(packed_shards, tmp_path, backend):
    shards = _copy(packed_shards, tmp_path)
    tar, key, off = _member_offset(shards, "train", 2, 1)
    with open(tar, "r+b") as f:
        f.truncate(off + 100)
    with pytest.raises(DataError, match=r"train-000002\.tar.*truncated"):
        _drain(shards, backend)
    # also when the manifest was "fixed" to the new size: the index betrays the truncation
    m = json.loads((shards / "train" / "manifest.json").read_text())
    for s in m["shards"]:
        if s["name"] == tar.name:
            s["bytes"] = tar.stat().st_size
    (shards / "train" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"train-000002\.tar.*'{key}'.*past the tar's end"):
        _drain(shards, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tar_header_named(packed_shards, tmp_path, backend):
    shards = _copy(packed_shards, tmp_path)
    tar, key, off = _member_offset(shards, "train", 3, 2)
    _patch(tar, off - 512, b"garbage-name")
    with pytest.raises(DataError, match=rf"train-000003\.tar \(sample key '{key}'\): corrupt tar header"):
        _drain(shards, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_audio_named(packed_shards, tmp_path, backend):
    """Decoder-level failure (valid RIFF/WAVE magic, broken chunks): DALI's error is mapped."""
    shards = _copy(packed_shards, tmp_path)
    tar, key, off = _member_offset(shards, "train", 1, 3)
    _patch(tar, off + 12, b"XXXX")  # the 'fmt ' chunk id
    with pytest.raises(DataError, match=rf"train-000001\.tar \(sample key '{key}'\)") as e:
        _drain(shards, backend)
    assert "Original Traceback" not in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_a_wav_named(packed_shards, tmp_path, backend):
    shards = _copy(packed_shards, tmp_path)
    tar, key, off = _member_offset(shards, "test", 0, 0)
    _patch(tar, off, b"NOTAWAVFILE!")
    with pytest.raises(DataError, match=rf"test-000000\.tar \(sample key '{key}'\)"):
        _drain(shards, backend, "test")


def _drop_component(shards: Path, split: str, shard: int, sample: int, ext: str) -> str:
    """Rewrite one shard without one sample's ``ext`` member, re-indexed and re-listed consistently."""
    from wds2idx import IndexCreator

    tar = shards / split / f"{split}-{shard:06d}.tar"
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    victim = keys[sample]
    tmp = tar.with_suffix(".new")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as t:
        for m, data in members:
            if m.name != f"{victim}.{ext}":
                t.addfile(m, io.BytesIO(data))
    os.replace(tmp, tar)
    with IndexCreator(str(tar), str(tar.with_suffix(".idx")), verbose=False) as ic:
        ic.create_index()
    m = json.loads((shards / split / "manifest.json").read_text())
    for s in m["shards"]:
        if s["name"] == tar.name:
            s["bytes"], s["sha256"] = tar.stat().st_size, None
    (shards / split / "manifest.json").write_text(json.dumps(m))
    return victim


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_component_named(packed_shards, tmp_path, backend):
    shards = _copy(packed_shards, tmp_path)
    victim = _drop_component(shards, "train", 4, 1, "i32")
    with pytest.raises(DataError, match=rf"train-000004\.tar: sample '{victim}' has no \.i32"):
        _drain(shards, backend)


def test_missing_shard_and_manifest_named(packed_shards, tmp_path):
    shards = _copy(packed_shards, tmp_path)
    (shards / "test" / "test-000001.tar").unlink()
    with pytest.raises(DataError, match=r"test-000001\.tar listed in .* is missing"):
        load_split(shards, "test")
    with pytest.raises(DataError, match=r"no manifest at .*nosuchsplit/manifest\.json"):
        load_split(shards, "nosuchsplit")


def test_train_needs_a_full_global_batch(packed_shards):
    with pytest.raises(DataError, match="fewer than one global batch"):
        source(packed_shards, "torch", batch=8, world=3, rank=0)


# --------------------------------------------------------------------------- backend choice

def test_without_dali_auto_falls_back_and_dali_fails_clearly(packed_shards, monkeypatch, capsys):
    import asc_dist.data as data_mod

    # What a machine without DALI looks like to `import`, with the probe not yet made.
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "asc_dist.data.dali", raising=False)
    monkeypatch.setattr(data_mod, "_dali_state", {})

    def build(backend):
        cfg = config.load([*SMALL, f"data.shards={packed_shards}", f"data.backend={backend}"],
                          world_size=1)
        return build_source(cfg, "test", train=False, rank=0, world_size=1,
                            device=torch.device("cpu"), batch_size=4)

    a, b = build("auto"), build("auto")
    assert (a.backend, b.backend, sum(1 for _ in a.epoch(0))) == ("torch", "torch", 5)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "DALI unavailable" in ln]
    assert len(notes) == 1 and "torch backend" in notes[0]  # one clear line, not one per source
    with pytest.raises(DataError) as e:
        build("dali")
    assert "data.backend=dali" in str(e.value) and "cannot be imported" in str(e.value)
    assert "data.backend=torch" in str(e.value)


@needs_dali
def test_auto_picks_dali_when_present(packed_shards):
    assert source(packed_shards, "auto", "test", train=False).backend == "dali"


def test_unlabelled_split_cannot_train(packed_shards, tmp_path):
    shards = _copy(packed_shards, tmp_path)
    m = json.loads((shards / "test" / "manifest.json").read_text())
    m["labelled"] = False
    (shards / "test" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="unlabelled"):
        source(shards, "torch", "test", train=True)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_features_match_cpu(packed_shards, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = {}
    for dev in ("cpu", "cuda"):
        src = source(packed_shards, backend, "test", train=False, batch=4, device=dev)
        out[dev] = list(src.epoch(0))
        src.close()
    for c, g in zip(out["cpu"], out["cuda"]):
        assert g.features.is_cuda and g.labels.is_cuda and g.valid.is_cuda
        assert c.keys == g.keys
        assert (c.features - g.features.cpu()).abs().max().item() < TOL_DB


# --------------------------------------------------------------------------- bench


def test_bench_data_smoke(packed_shards, tmp_path, capsys):
    from asc_dist import bench

    out = tmp_path / "bench.json"
    backends = "dali,torch,librosa" if HAVE_DALI else "torch,librosa"
    rc = bench.main(["data", "--shards", str(packed_shards), "--batches", "2", "--batch-size", "2",
                     "--threads", "1", "--backends", backends, "--json", str(out), *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "clips/s" in text and "torch cpu / librosa cpu" in text
    results = json.loads(out.read_text())["results"]
    assert {r["name"] for r in results} == set(backends.split(","))
    assert all(r["clips_per_s"] > 0 for r in results)
    with pytest.raises(SystemExit):
        bench.main(["data", "--shards", str(packed_shards), "--bogus"])


def test_num_threads_zero_means_this_process_share_of_its_cpus(monkeypatch):
    from asc_dist.data import threads_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))  # e.g. a SLURM task
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks on this node
    assert threads_per_process(0) == 8
    assert threads_per_process(3) == 3  # an explicit data.num_threads wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert threads_per_process(0) == 1


@needs_dali
def test_dali_builds_the_next_epoch_ahead_and_decodes_keys_only_when_read(packed_shards):
    src = source(packed_shards, "dali", batch=2)
    try:
        it = src.epoch(0)
        first = next(it)
        assert "_keys" not in vars(first.keys)  # source_info copied, not decoded
        assert len(first.keys[0]) > 0 and "_keys" in vars(first.keys)
        ahead_epoch, future = src._next
        assert ahead_epoch == 1
        prebuilt = future.result()
        list(it)
        e1 = src.epoch(1)
        next(e1)
        assert src._pipes[-1] is prebuilt  # epoch 1 runs on the pipeline built during epoch 0
        e1.close()
    finally:
        src.close()


def test_torch_training_reads_on_across_epochs_with_one_loader(packed_shards):
    """An epoch shorter than the workers' prefetch must not stall at its end: training reads
    through one loader into the next epoch's plan, and each epoch is still exactly its own."""
    src = source(packed_shards, "torch", batch=2, extra=("data.num_threads=2",))
    starts = []
    real = src._start
    src._start = lambda e, s: starts.append((e, s)) or real(e, s)
    try:
        got = [list(src.epoch(e)) for e in range(3)]
        assert starts == [(0, 0)] and src._ahead[0] == (3, 0)
        for e in range(3):
            with source(packed_shards, "torch", batch=2) as fresh:
                alone = list(fresh.epoch(e))
            assert keys_of(alone) == keys_of(got[e])
            assert all(torch.equal(a.features, b.features) for a, b in zip(alone, got[e]))
        # resuming elsewhere starts anew (the run-ahead is dropped), with the same batches
        assert keys_of(list(src.epoch(1, start_step=1))) == keys_of(got[1][1:])
        assert starts[-1] == (1, 1)
    finally:
        src.close()


@needs_dali
@pytest.mark.parametrize("prefetch, batch", [(2, 2), (3, 8)])
def test_dali_runs_exactly_the_iterations_an_epoch_uses(packed_shards, monkeypatch, prefetch,
                                                        batch):
    """The first schedule_run queues the prefetch depth, each later one one more: an epoch of S
    steps schedules S iterations (not S + 1 that nobody reads), an epoch shorter than the
    prefetch a queue no deeper than the epoch."""
    from nvidia.dali.pipeline import Pipeline

    calls: dict[int, int] = {}
    real = Pipeline.schedule_run

    def counted(pipe):
        calls[id(pipe)] = calls.get(id(pipe), 0) + 1
        return real(pipe)

    monkeypatch.setattr(Pipeline, "schedule_run", counted)
    for split, train in (("train", True), ("test", False)):
        calls.clear()
        with source(packed_shards, "dali", split, train=train, batch=batch,
                    extra=(f"data.prefetch={prefetch}",)) as src:
            assert len(list(src.epoch(0))) == src.steps_per_epoch
        depth = min(prefetch, src.steps_per_epoch)
        epoch0 = next(iter(calls.values()))  # the first pipeline built (then epoch 1's, ahead)
        assert depth + epoch0 - 1 == src.steps_per_epoch, (split, src.steps_per_epoch, calls)
