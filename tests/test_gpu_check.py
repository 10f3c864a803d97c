"""launch/gpu_check.sh at toy size on the CPU (``--device cpu --quick``): every step runs bounded
and is recorded, so the one-command GPU check cannot rot while no GPU is around."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST = "gpu-tests,data,parity,stop-resume,inference"  # run in priority order, not this one


def _check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ASC_PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return subprocess.run(["bash", "launch/gpu_check.sh", str(out), "--device", "cpu", "--quick", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_split_over_two_calls_runs_every_step(tmp_path):
    out, work = tmp_path / "check", tmp_path / "work"
    first = _check(out, "--only", FIRST, "--work", str(work))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert re.match(r"(warning: )?missing here: ", first.stderr)  # said first, in one line
    # the second call reuses the first's data (same --work) and merges into the same results;
    # one trainer variant of the four (the others differ only in the trainer's arguments)
    second = _check(out, "--only", "data,loops-b4,trainer-torch-streamed-b4", "--work", str(work))
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    # each call runs its steps in the plan's priority order
    assert list(steps) == ["data", "stop-resume", "inference", "parity", "gpu-tests",
                           "trainer-torch-streamed-b4", "loops-b4"]
    assert [s["name"] for s in results["plan"]["steps"]] == ["data", "trainer-torch-streamed-b4",
                                                             "loops-b4"]
    for name, rec in steps.items():
        assert rec["status"] == ("not run" if name == "inference" else "ok"), (name, rec)
        assert rec["seconds"] <= rec["budget_s"] and ("log_tail" in rec) == (name != "inference")
    assert steps["gpu-tests"].get("skipped", 0) > 0  # a CPU: the gpu tests skip, cleanly
    assert "slowest durations" in steps["gpu-tests"]["log_tail"]  # pytest's, as it ran
    assert "reused" in steps["data"]
    if "dali_vs_torch_cpu_max_db" in steps["parity"]:
        assert steps["parity"]["dali_vs_torch_cpu_max_db"] < 0.01
    assert 0 < steps["stop-resume"]["stopped_at"] < steps["stop-resume"]["finished_at"]
    assert steps["stop-resume"]["phases"]["resumed"]["checkpoint_s"] > 0
    assert "GPU-only" in steps["inference"]["why"]
    rows = [r for rec in steps.values() for r in rec.get("rows", [])]
    assert [r["variant"] for r in rows] == ["trainer torch, streamed",
                                            "model only (resident batch)",
                                            "plain PyTorch loop (resnet18)"]
    for r in rows:
        assert r["clips_per_s"] > 0 and r["step_ms"] > 0 and 0 <= r["data_wait_pct"] <= 100
        assert (r["steps_per_epoch"] is None) == (not r["variant"].startswith("trainer"))
    streamed = rows[0]
    assert (streamed["workers"], streamed["prefetch"], streamed["settings_differ"]) == (1, 2, [])
    assert streamed["phases"]["first_step_s"] > 0 and streamed["eval_clips_per_s"] > 0
    # the GPU-user numbers: every field present, the CUDA ones null and said to be GPU-only
    user = results["gpu_user"]
    assert user["gpu_idle"] == {"trainer-torch-streamed-b4": None} and user["compile"] is None
    assert results["fixed_costs"]["measured"]["python_torch"] > 0
    md = (out / "summary.md").read_text()
    assert "| trainer-torch-streamed-b4 | ok |" in md and "trainer_vs_plain_loop_batch4" in md
    assert "GPU idle between steps: GPU only (CUDA events): null on a CPU" in md


def test_gpu_check_help_plan_and_no_cuda(tmp_path):
    p = subprocess.run(["bash", "launch/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "results.json" in p.stdout and "--plan" in p.stdout
    env = dict(os.environ, ASC_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(["bash", "launch/gpu_check.sh", str(tmp_path / "x"), "--device", "cuda"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "CUDA is not available" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was made
