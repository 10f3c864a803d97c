import json

import pytest


@pytest.mark.slow
def test_bench_train_runs_the_real_trainer_and_reports_scaling(packed_shards, tmp_path, cli):
    from asc_dist import bench

    out = tmp_path / "bench.json"
    p = cli(bench.main, ["train", "--shards", str(packed_shards), "--nproc", "1,2", "--steps", "4",
                         "--warmup", "2", "--log-every", "2", "--batch-per-rank", "2",
                         "--variants", "cached:data.cache=device", "--json", str(out),
                         "conf/smoke.yaml", "data.backend=torch"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "scaling cached: 2 processes" in p.stdout
    results = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["nproc"]) for r in results] == [("cached", 1), ("cached", 2)]
    for r in results:
        assert r["clips_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["intervals"] == 2
        assert r["wall_s"] > 0


def test_bench_train_rejects_bad_config_naming_the_key(packed_shards, cli):
    from asc_dist import bench

    p = cli(bench.main, ["train", "--shards", packed_shards, "--nproc", "1", "conf/smoke.yaml",
                         "optim.bogus=1"])
    assert p.returncode == 2 and "optim.bogus" in p.stderr


def test_bench_train_defaults_put_the_cache_beside_streaming():
    from asc_dist.bench import build_parser
    from asc_dist.bench.train import parse_variants

    args = build_parser().parse_args(["train", "--shards", "x"])
    assert parse_variants(args.variants) == [("cached", ["data.cache=device"]),
                                             ("streamed", ["data.cache=none"])]
