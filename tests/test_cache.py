"""The feature cache: equal to streaming, exact global shuffle, persisted, stale/corrupt detection,
the fallback to streaming, the ahead-of-time CLI. (Multi-rank builds: tests/test_data_dist.py.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from asc_dist import config
from asc_dist import features as features_cli
from asc_dist.data import build_source
from asc_dist.data.cache import CachedSource, cache_path
from asc_dist.data.sharding import derive_seed, global_plan, train_steps

SMALL = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
         "features.hop_length=400", "features.n_mels=64", "features.f_min=50", "features.f_max=8000",
         "features.clip_seconds=1.0", "features.frames=40", "data.num_threads=1"]

try:
    import nvidia.dali  # noqa: F401

    BACKENDS = ["torch", "dali"]
except ImportError:
    BACKENDS = ["torch"]


def cfg_for(shards, backend="torch", *extra):
    return config.load([*SMALL, f"data.shards={shards}", f"data.backend={backend}", *extra], world_size=1)


def source(cfg, split="train", *, train=True, cache="device", batch=3, seed=0):
    return build_source(cfg, split, train=train, rank=0, world_size=1, device=torch.device("cpu"),
                        batch_size=batch, seed=seed, cache=cache)


def by_key(batches) -> dict[str, torch.Tensor]:
    return {k: x for b in batches for k, x, ok in zip(b.keys, b.features, b.valid.tolist()) if ok}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_features_equal_the_streamed_ones_exactly(packed_shards, tmp_path, backend):
    shards = tmp_path / "shards"
    shutil.copytree(packed_shards, shards)  # the cache file lands beside the shards
    cfg = cfg_for(shards, backend)
    for split in ("train", "test"):
        with source(cfg, split, train=False, cache="none") as s:
            streamed = by_key(s.epoch(0))
        with source(cfg, split, train=False) as c:
            assert isinstance(c, CachedSource) and c.backend == f"{backend}+cache"
            cached = by_key(c.epoch(0))
            assert c.table.features.shape == (len(streamed), 1, 64, 40)
        assert cached.keys() == streamed.keys()
        for k in streamed:
            assert torch.equal(cached[k], streamed[k]), k
        assert cache_path(cfg, split, backend, torch.device("cpu")).is_file()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_plan_covers_each_sample_once_per_epoch(world):
    n, batch = 47, 4
    steps = train_steps(n, batch, world)
    epochs = []
    for epoch in (0, 1):
        plans = [global_plan(n, seed=3, epoch=epoch, rank=r, world_size=world, batch_size=batch)
                 for r in range(world)]
        assert all(p.shape == (steps, batch) for p in plans)
        flat = np.concatenate([p.reshape(-1) for p in plans])
        assert len(set(flat.tolist())) == len(flat) == steps * batch * world  # nothing twice
        assert set(flat.tolist()) <= set(range(n))
        # rank r takes the r-th slice of every global batch: together, one permutation
        glob = np.stack(plans, axis=1).reshape(-1)
        perm = np.random.default_rng(derive_seed(3, epoch, 0x61_0BA1)).permutation(n)
        assert np.array_equal(glob, perm[: len(glob)])
        epochs.append(glob)
    assert not np.array_equal(epochs[0], epochs[1])  # every epoch is a new global order
    again = global_plan(n, seed=3, epoch=1, rank=0, world_size=world, batch_size=batch)
    assert np.array_equal(again, global_plan(n, seed=3, epoch=1, rank=0, world_size=world,
                                             batch_size=batch))  # a pure function


def test_training_epochs_resume_by_arithmetic(packed_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(packed_shards, shards)
    cfg = cfg_for(shards)
    with source(cfg) as c:
        e1 = list(c.epoch(1))
        assert len(e1) == c.steps_per_epoch == 20 // 3
        tail = list(c.epoch(1, start_step=4))
        labels = dict(zip(c.table.keys, c.table.labels.tolist()))
        assert [b.keys for b in tail] == [b.keys for b in e1[4:]]
        for a, b in zip(tail, e1[4:]):
            assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
        for b in e1:
            assert b.labels.tolist() == [labels[k] for k in b.keys]
        assert [b.keys for b in c.epoch(0)] != [b.keys for b in e1]


def test_persisted_cache_is_reused_and_rebuilt_when_stale_or_corrupt(packed_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(packed_shards, shards)
    cfg = cfg_for(shards)
    path = cache_path(cfg, "test", "torch", torch.device("cpu"))
    with source(cfg, "test", train=False) as c:
        ref = c.table.features.clone()
    built = path.stat().st_mtime_ns

    # a second run loads the file instead of decoding again
    with source(cfg, "test", train=False) as c:
        assert torch.equal(c.table.features, ref)
    assert path.stat().st_mtime_ns == built and "rebuilding" not in capsys.readouterr().err

    # corrupt bytes (a checksum mismatch) and a truncated file are rebuilt, atomically
    state = torch.load(path, weights_only=True)
    state["features"][0, 0, 0, 0] += 1.0
    torch.save(state, path)
    with source(cfg, "test", train=False) as c:
        assert torch.equal(c.table.features, ref)
    assert "stale or damaged" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:1000])
    with source(cfg, "test", train=False) as c:
        assert torch.equal(c.table.features, ref)
    assert "unreadable" in capsys.readouterr().err
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]

    # a re-packed split (another manifest) invalidates it
    manifest = shards / "test" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"sha256": "', '"sha256": "0', 1))
    with source(cfg, "test", train=False) as c:
        assert torch.equal(c.table.features, ref)
    assert "stale" in capsys.readouterr().err

    # other feature settings: another file
    other = cfg_for(shards, "torch", "features.n_mels=32")
    assert cache_path(other, "test", "torch", torch.device("cpu")) != path

    # a cache made before today's feature keys existed (its settings lack them, so its name has
    # another hash): built once more under the new name, and the log says why
    state = torch.load(path, weights_only=True)
    for key in ("preemphasis", "window", "log_offset", "log_divisor"):
        del state["features_settings"][key]
    torch.save(state, path.with_name("features-0123456789ab-torch-cpu.pt"))
    path.unlink()
    with source(cfg, "test", train=False) as c:
        assert torch.equal(c.table.features, ref)
    assert ("features-0123456789ab-torch-cpu.pt was made before the feature keys log_divisor, "
            "log_offset, preemphasis, window existed") in capsys.readouterr().err
    assert path.is_file()


def test_split_that_does_not_fit_falls_back_to_streaming(packed_shards, capsys):
    cfg = cfg_for(packed_shards, "torch", "data.cache=auto", "data.cache_max_gb=0.0001")
    with build_source(cfg, "train", train=True, rank=0, world_size=1, device=torch.device("cpu"),
                      batch_size=3) as s:
        assert not s.cached and s.backend == "torch"
        assert len(list(s.epoch(0))) == s.steps_per_epoch
    err = capsys.readouterr().err
    assert "data.cache_max_gb=0.0001: streaming them" in err and err.count("\n") == 1


def test_cache_cli_builds_ahead_and_training_source_loads_it(packed_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(packed_shards, shards)
    assert features_cli.main(["cache", str(shards), "--device", "cpu", *SMALL, "data.backend=torch"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 clips" in out and "test: 20 clips" in out
    cfg = cfg_for(shards, "torch", "data.cache=auto")
    path = cache_path(cfg, "train", "torch", torch.device("cpu"))
    built = path.stat().st_mtime_ns
    with source(cfg, cache=None) as c:  # data.cache=auto: 0.2 MiB fits
        assert c.cached and len(c.table.keys) == 20
    assert path.stat().st_mtime_ns == built
