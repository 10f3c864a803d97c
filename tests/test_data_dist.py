"""A real 2-process gloo run (torchrun) over the batch sources of both backends.

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
         "features.clip_seconds=1.0", "features.frames=40", "data.num_threads=1"]


def _worker(shards: str, out: str, backends: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from asc_dist import config
    from asc_dist.data import build_source

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    try:
        for backend in backends:
            cfg = config.load([*SMALL, f"data.shards={shards}", f"data.backend={backend}"], world_size=world)
            res = {}
            train = build_source(cfg, "train", train=True, rank=rank, world_size=world,
                                 device=torch.device("cpu"), batch_size=3, seed=7)
            for epoch in (0, 1):
                keys = []
                for batch in train.epoch(epoch):
                    n = torch.tensor([batch.valid.sum().item()])
                    dist.all_reduce(n)  # lock-step: every rank must reach every batch
                    keys += batch.keys
                gathered = [None] * world
                dist.all_gather_object(gathered, {"keys": keys, "steps": train.steps_per_epoch})
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
            result[backend] = res
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _backends() -> list[str]:
    try:
        import nvidia.dali  # noqa: F401

        return ["torch", "dali"]
    except ImportError:
        return ["torch"]


@pytest.mark.slow
def test_two_process_gloo_shares(packed_shards, tmp_path):
    out = tmp_path / "result.json"
    backends = _backends()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(packed_shards), str(out), ",".join(backends)]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    def keys(split):
        lines = (packed_shards / split / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["key"] for line in lines]

    train_keys, test_keys = set(keys("train")), keys("test")
    n = len(train_keys)
    for backend in backends:
        res = result[backend]
        orders = []
        for epoch in (0, 1):
            ranks = res[f"train{epoch}"]
            steps = {g["steps"] for g in ranks}
            assert steps == {n // 6}
            assert all(len(g["keys"]) == 3 * (n // 6) for g in ranks)
            flat = [k for g in ranks for k in g["keys"]]
            assert len(set(flat)) == len(flat) == 6 * (n // 6)  # disjoint
            assert set(flat) <= train_keys
            orders.append(flat)
        assert orders[0] != orders[1]
        flat = [k for ks in res["test"]["keys"] for k in ks]
        assert sorted(flat) == sorted(test_keys)  # every test sample once across both ranks
        assert res["test"]["reduced_count"] == len(test_keys)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
