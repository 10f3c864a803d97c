"""The DCASE 2024 pieces of a run: train.epochs, complexity in the log and report.json with the
challenge's limits, timm:<name> models, and the shipped recipe being the published one."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_shards

from asc_dist import complexity, config, train
from asc_dist.errors import ConfigError
from asc_dist.models import build_model, check_model

RECIPE = ["conf/data/tau2022.yaml", "conf/experiment/dcase2024_baseline.yaml"]


def test_epochs_set_the_run_length_and_complexity_reaches_log_and_report(tmp_path, caplog):
    shards = make_shards(tmp_path)  # 20 training clips: 5 steps of 4 per epoch
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc = train.main(["conf/smoke.yaml", f"data.shards={shards}", f"run_dir={run_dir}",
                         "data.backend=torch", "train.device=cpu", "train.epochs=2",
                         "complexity.limits=dcase2024"])
    assert rc == 0
    assert "train.epochs=2 x 5 steps per epoch (20 clips, global batch 4) = 10 iterations" in caplog.text
    assert (run_dir / "checkpoints" / "step_10.pt").is_file()
    assert not (run_dir / "checkpoints" / "step_12.pt").exists()  # smoke.yaml's max_iters=6 replaced
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["step"] == 10
    cfg = config.load(["conf/smoke.yaml"])
    expected = complexity.count(build_model(cfg.model, 10, load_weights=False), [1, 1, 64, 32])
    c = report["complexity"]
    assert (c["params"], c["macs"], c["input"]) == (expected.params, expected.macs, [1, 1, 64, 32])
    assert c["param_bytes"]["fp16"] == 2 * expected.params and c["within_limits"] is False
    assert f"model dcase_baseline: {expected.params:,} parameters" in caplog.text
    # the 2018 baseline CNN at fp16 is over DCASE 2024's 128 kB: said once, as a warning
    over = [r for r in caplog.records if r.levelno == logging.WARNING and "complexity.limits" in r.message]
    assert len(over) == 1 and "> 128,000 B" in over[0].message


def test_over_limits_counts_bytes_at_the_precision_and_macs_per_second():
    c = complexity.Complexity(input=[1, 1, 256, 65], params=64_001, macs=30_000_001)
    assert complexity.over_limits(c, "none", "fp16", 1.0) == []
    problems = complexity.over_limits(c, "dcase2024", "fp16", 1.0)
    assert len(problems) == 2 and "128,002 B of parameters at fp16" in problems[0]
    assert complexity.over_limits(c, "dcase2024", "int8", 2.0) == []  # 64 kB; 15 M MACs per second


def test_the_shipped_baseline_recipe_is_within_the_limits(cli):
    r = cli(complexity.main, [*RECIPE, "--json"])
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    assert (out["params"], out["macs"], out["input"]) == (61_148, 29_419_156, [1, 1, 256, 65])
    assert out["limits"] == "dcase2024" and out["over_limits"] == []
    r = cli(complexity.main, [*RECIPE, "model.name=resnet18", "--json"])
    assert json.loads(r.stdout)["over_limits"] and "complexity.limits=dcase2024 exceeded" in r.stderr


def test_the_shipped_recipe_states_the_published_settings():
    """CPJKU/dcase2024_task1_baseline run_training.py's defaults, key by key."""
    cfg = config.load([*RECIPE])
    f, a, o, t = cfg.features, cfg.augment, cfg.optim, cfg.train
    assert (f.sample_rate, f.n_fft, f.win_length, f.hop_length, f.n_mels) == (32000, 4096, 3072, 500, 256)
    assert (f.f_min, f.f_max, f.mel_scale, f.mel_norm, f.log, f.log_eps) == (0, 16000, "htk", "none", "ln", 1e-5)
    assert (f.clip_seconds, f.frames, cfg.data.standardize) == (1.0, 65, False)
    assert (cfg.model.name, cfg.model.pretrained, cfg.loss.name) == ("cp_mobile", "none", "ce")
    assert not a.mixup.enabled and (a.mixstyle.p, a.mixstyle.alpha) == (0.4, 0.3)
    assert (a.freq_mask.count, a.freq_mask.width, a.time_mask.count) == (1, 48, 0)
    assert (a.mask_at, a.roll_seconds) == ("mel_power", 0.1)
    assert (o.name, o.lr, o.weight_decay, o.schedule, o.warmup_iters) == ("adamw", 0.005, 1e-4, "cosine", 2000)
    assert (t.epochs, t.global_batch, t.precision) == (150, 256, "fp32")
    kd = config.load([*RECIPE, "conf/experiment/dcase2024_kd.yaml", "distill.teachers=[a,b]"])
    assert (kd.distill.weight, kd.distill.temperature, kd.distill.class_reduction) == (0.98, 2.0, "mean")
    assert list(kd.distill.teachers) == ["a", "b"]
    assert (kd.wandb.group, kd.wandb.job_type) == ("dcase2024-kd", "student")


def test_any_timm_model_by_name_takes_one_channel():
    cfg = config.load(["model.name=timm:mobilenetv3_small_050", "model.pretrained=none"])
    check_model(cfg.model)
    model = build_model(cfg.model, 10)
    assert model(torch.randn(2, 1, 64, 40)).shape == (2, 10)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 1
    with pytest.raises(ConfigError, match=r"timm:mobilenetv9_tiny.*timm [\d.]+ has no model"):
        check_model(config.load(["model.name=timm:mobilenetv9_tiny", "model.pretrained=none"]).model)
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        check_model(config.load(["model.name=timm:mobilenetv3_small_050"]).model)


def test_a_cosine_warmup_as_long_as_the_run_is_refused_for_training_only(tmp_path, cli):
    shards = make_shards(tmp_path)  # 5 steps of 4 per epoch
    base = ["conf/smoke.yaml", f"data.shards={shards}", f"run_dir={tmp_path / 'run'}",
            "data.backend=torch", "train.device=cpu", "optim.schedule=cosine"]
    r = cli(train.main, [*base, "optim.warmup_iters=6", "train.max_iters=6"])
    assert r.returncode == 2 and "optim.warmup_iters=6 is not below the run's 6 iterations" in r.stderr, r
    r = cli(train.main, [*base, "optim.warmup_iters=5", "train.epochs=1"])
    assert r.returncode == 2 and "run's 5 iterations (train.epochs=1)" in r.stderr, r
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a checkpoint trained so (before the check existed) still restores for evaluation
    from asc_dist.restore import checkpoint_config

    saved = config.to_dict(config.load([*base, "optim.warmup_iters=6", "train.max_iters=6"]))
    assert checkpoint_config({"config": saved}).optim.warmup_iters == 6
