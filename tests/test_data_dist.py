"""Real 2- and 3-process gloo runs (torchrun) over the batch sources: both streaming backends,
the feature cache and the waveform cache (both built collectively by the ranks).

Each rank reads its training share for two epochs and the test split once, running one
all_reduce per batch (a rank with fewer batches would hang, caught by the process-group
timeout), then the keys are gathered and checked on rank 0. Run as a script by torchrun.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
         "features.hop_length=400", "features.n_mels=64", "features.f_min=50", "features.f_max=8000",
         "features.clip_seconds=1.0", "features.frames=40", "data.num_threads=1",
         "train.global_batch=6"]  # divisible by 2 and 3 ranks


def _worker(shards: str, out: str, variants: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from asc_dist import config
    from asc_dist.data import build_source

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    try:
        for variant in variants:
            backend, cache = variant.split(":")
            cfg = config.load([*SMALL, f"data.shards={shards}", f"data.backend={backend}",
                               f"data.cache={cache}"], world_size=world)
            res = {}
            train = build_source(cfg, "train", train=True, rank=rank, world_size=world,
                                 device=torch.device("cpu"), batch_size=3, seed=7)
            for epoch in (0, 1):
                keys, labels, sums = [], [], []
                for batch in train.epoch(epoch):
                    n = torch.tensor([batch.valid.sum().item()])
                    dist.all_reduce(n)  # lock-step: every rank must reach every batch
                    keys += batch.keys
                    labels += batch.labels.tolist()
                    sums += batch.features.double().sum(dim=(1, 2, 3)).tolist()
                gathered = [None] * world
                dist.all_gather_object(gathered, {"keys": keys, "steps": train.steps_per_epoch,
                                                  "labels": labels, "sums": sums})
                res[f"train{epoch}"] = gathered
            train.close()
            test = build_source(cfg, "test", train=False, rank=rank, world_size=world,
                                device=torch.device("cpu"), batch_size=3, seed=7)
            keys, total = [], torch.zeros(1)
            for batch in test.epoch(0):
                keys += [k for k, v in zip(batch.keys, batch.valid.tolist()) if v]
                n = batch.valid.sum().float().reshape(1)
                dist.all_reduce(n)
                total += n
            test.close()
            gathered = [None] * world
            dist.all_gather_object(gathered, keys)
            res["test"] = {"keys": gathered, "reduced_count": int(total.item())}
            result[variant] = res
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _variants(world: int) -> list[str]:
    """backend:cache pairs; the cache on the torch backend (its build is backend-independent)."""
    try:
        import nvidia.dali  # noqa: F401

        streams = ["torch:none", "dali:none"]
    except ImportError:
        streams = ["torch:none"]
    # the waveform cache with 3 ranks: shares of unequal size gathered (2 ranks: test_passt.py)
    return streams + ["torch:device"] if world == 2 else ["torch:device", "torch:waveform"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_multi_process_gloo_shares(packed_shards, tmp_path, world):
    out = tmp_path / "result.json"
    variants = _variants(world)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), str(packed_shards), str(out), ",".join(variants)]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    def keys(split):
        lines = (packed_shards / split / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["key"] for line in lines]

    train_keys, test_keys = set(keys("train")), keys("test")
    label_of = {json.loads(line)["key"]: json.loads(line)["label"]
                for line in (packed_shards / "train" / "samples.jsonl").read_text().splitlines()}
    features_of = {}
    n = len(train_keys)
    steps = n // (3 * world)  # batch 3 per rank
    for variant in variants:
        res = result[variant]
        orders = []
        for epoch in (0, 1):
            ranks = res[f"train{epoch}"]
            assert {g["steps"] for g in ranks} == {steps}, variant
            assert all(len(g["keys"]) == 3 * steps for g in ranks)
            flat = [k for g in ranks for k in g["keys"]]
            assert len(set(flat)) == len(flat) == 3 * world * steps  # disjoint, every step full
            assert set(flat) <= train_keys
            assert [label_of[k] for k in flat] == [y for g in ranks for y in g["labels"]]
            if variant in ("torch:device", "torch:waveform"):
                # the waveform cache's rows were gathered in order: each key's features are the
                # feature cache's (bit-identical on the CPU)
                for k, v in zip(flat, [v for g in ranks for v in g["sums"]]):
                    assert features_of.setdefault(k, v) == v, (variant, k)
            orders.append(flat)
        assert orders[0] != orders[1]
        flat = [k for ks in res["test"]["keys"] for k in ks]
        assert sorted(flat) == sorted(test_keys), variant  # every test sample once across ranks
        assert res["test"]["reduced_count"] == len(test_keys)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
