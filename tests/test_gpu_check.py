"""launch/gpu_check.sh at toy size on the CPU (``--device cpu --quick``): every step runs and is
recorded, so the one-command GPU check cannot rot while no GPU is around."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_runs_every_step_and_writes_results(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, ASC_PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    p = subprocess.run(["bash", "launch/gpu_check.sh", str(out), "--device", "cpu", "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["gpu tests", "synthetic data", "front-end parity",
                           "bf16 training stop/resume", "evaluate/predict device vs cpu", "throughput"]
    assert steps["gpu tests"]["status"] == "ok" and steps["gpu tests"].get("skipped", 0) > 0
    assert steps["front-end parity"]["status"] == "ok"
    if "dali_vs_torch_cpu_max_db" in steps["front-end parity"]:
        assert steps["front-end parity"]["dali_vs_torch_cpu_max_db"] < 0.01
    resumed = steps["bf16 training stop/resume"]
    assert resumed["status"] == "ok" and 0 < resumed["stopped_at"] < resumed["finished_at"]
    assert steps["evaluate/predict device vs cpu"]["status"] == "not run"  # no accelerator here
    rows = results["throughput"]
    variants = {(r["variant"], r["batch"]) for r in rows}
    assert ("model only (resident batch)", 4) in variants and ("plain PyTorch loop (resnet18)", 4) in variants
    trainers = [v for v, _ in variants if v.startswith("trainer")]
    assert any(v.endswith("cached") for v in trainers) and any(v.endswith("streamed") for v in trainers)
    for r in rows:
        assert "error" not in r, r
        assert r["clips_per_s"] > 0 and r["step_ms"] > 0 and 0 <= r["data_wait_pct"] <= 100
    assert "trainer_vs_plain_loop_batch4" in steps["throughput"]
    md = (out / "summary.md").read_text()
    assert "| throughput | ok |" in md and f"| {trainers[0]} | 4 |" in md


def test_gpu_check_help_and_no_cuda(tmp_path):
    p = subprocess.run(["bash", "launch/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "results.json" in p.stdout and "--quick" in p.stdout
    env = dict(os.environ, ASC_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(["bash", "launch/gpu_check.sh", str(tmp_path / "x"), "--device", "cuda"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "CUDA is not available" in p.stderr and "Traceback" not in p.stderr
