"""The GPU check's plan, validated before anything runs (no GPU needed), and its bounded steps."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from asc_dist import bench
from asc_dist.bench import gpu
from asc_dist.bench import plan as planning
from asc_dist.errors import ConfigError


def test_default_full_size_gpu_plan_is_valid_and_streams_at_every_batch(cli):
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda"])
    assert p.returncode == 0, p
    plan = json.loads(p.stdout)
    assert set(plan) >= {"steps", "throughput", "budget_s"}
    assert plan["budget_s"] <= 420 and plan["budget_s"] == pytest.approx(
        sum(s["budget_s"] for s in plan["steps"]), abs=0.2)
    assert all({"name", "budget_s"} <= set(s) and s["budget_s"] > 0 for s in plan["steps"])
    rows = plan["throughput"]
    assert {r["batch"] for r in rows} == {64, 256}
    for r in rows:
        assert {"variant", "batch", "train_clips", "steps_per_epoch", "timed_steps"} <= set(r)
        assert r["timed_steps"] >= 20
        if r["kind"] == "trainer":
            need = 10 if r["cache"] == "none" else 3
            assert r["steps_per_epoch"] == r["train_clips"] // r["batch"] >= need, r
        else:
            assert r["steps_per_epoch"] is None and r["train_clips"] is None
    assert any(r["kind"] == "trainer" and r["cache"] == "none" and r["batch"] == 256 for r in rows)


def test_budgets_follow_from_the_work():
    small = planning.make_plan(device="cuda", quick=False, clips_per_class=400, budget=1e9)
    big = planning.make_plan(device="cuda", quick=False, clips_per_class=800, budget=1e9)
    assert big.step("data").budget_s > small.step("data").budget_s  # more clips to pack
    cached = big.step("trainer-dali-cached-b64").budget_s - small.step("trainer-dali-cached-b64").budget_s
    assert cached > 0  # a larger cache to build
    assert big.step("loops-b64").budget_s == small.step("loops-b64").budget_s  # no data involved


@pytest.mark.parametrize("args, message", [
    # the landed check's fault: 32 clips per class leave 240 training clips, < one batch of 256
    (["--clips-per-class", "32"], r"trainer-dali-cached-b256 .*batch 256.*0 steps per epoch, need >= 3"),
    (["--clips-per-class", "150"], r"trainer-dali-streamed-b64 .*steps per epoch, need >= 10|"
                                   r"trainer-dali-streamed-b256 .*need >= 10"),
    (["--budget", "200"], r"add up to \d+ s, over --budget 200 s \(largest: gpu-tests"),
    (["--only", "nosuch"], r"no step named 'nosuch'; steps: gpu-tests, data"),
    (["--only", "data", "--skip", "data"], r"leave no step to run; steps: gpu-tests, data"),
])
def test_a_plan_not_worth_a_lease_is_refused_in_one_line(cli, args, message):
    p = cli(bench.main, ["gpu", "--plan", "--device", "cuda", *args])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    import re

    assert re.search(message, p.stderr), p.stderr


def test_only_and_skip_split_the_check_and_quick_has_its_own_thresholds(cli):
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda", "--only", "data,trainer-*"])
    names = [s["name"] for s in json.loads(p.stdout)["steps"]]
    assert names[0] == "data" and all(n.startswith("trainer-") for n in names[1:]) and len(names) == 6
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda", "--skip", "gpu-tests,loops-"])
    names = [s["name"] for s in json.loads(p.stdout)["steps"]]
    assert "gpu-tests" not in names and not any(n.startswith("loops") for n in names)
    quick = planning.make_plan(device="cpu", quick=True)
    planning.validate(quick)  # 2 steps per epoch is enough for a plumbing check
    assert {v.batch for s in quick.steps for v in s.variants} == {4}
    quick.quick = False  # the same toy steps judged by the full-size thresholds
    with pytest.raises(ConfigError, match="3 timed steps, need >= 20"):
        planning.validate(quick)


def test_a_step_past_its_budget_is_killed_with_its_children_and_its_log_kept(tmp_path):
    child = ("import subprocess, sys, time; "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print('working', flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    rec = gpu.run_bounded("slow", 2.0, [sys.executable, "-c", child], tmp_path)
    assert time.perf_counter() - t0 < 20
    assert rec["status"] == "timed_out" and "budget of 2 s" in rec["why"]
    assert "working" in rec["log_tail"]
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a grandchild outlived its step"


def test_a_failed_step_is_recorded_with_its_log_tail(tmp_path):
    rec = gpu.run_bounded("bad", 30.0, [sys.executable, "-c", "print('oops'); raise SystemExit(3)"],
                          tmp_path)
    assert rec["status"] == "failed" and "exited 3" in rec["why"] and "oops" in rec["log_tail"]


def test_a_check_stopped_from_outside_kills_the_running_step(tmp_path):
    """The device tool's command limit stops the check: the step's tree must not outlive it."""
    script = tmp_path / "check.py"
    script.write_text(
        "import signal, sys\n"
        "from pathlib import Path\n"
        "from asc_dist.bench.gpu import run_bounded\n"
        "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))\n"
        "run_bounded('step', 120, [sys.executable, '-c', 'import time; print(\"up\", flush=True); "
        "time.sleep(61)'], Path(sys.argv[1]))\n")
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "work")])
    log = tmp_path / "work" / "logs" / "step.log"
    end = time.monotonic() + 30
    while not (log.is_file() and "up" in log.read_text()):
        assert time.monotonic() < end and p.poll() is None
        time.sleep(0.05)
    p.terminate()
    assert p.wait(timeout=20) == 143
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(61\\)"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the step outlived the check"


def test_a_reused_work_folder_with_data_for_another_plan_is_not_used(tmp_path):
    """--work is reused across calls: data made for another size must not be measured as this
    plan's (the rows would report the plan's clips and steps per epoch, not the data's)."""
    plan = planning.make_plan(device="cpu", quick=True)
    (tmp_path / "shards" / "test").mkdir(parents=True)
    (tmp_path / "shards" / "test" / "manifest.json").write_text("{}")
    (tmp_path / "data.json").write_text(json.dumps({"clips_per_class": 99, "quick": False}))
    ctx = gpu.Ctx("cpu", True, tmp_path, plan)
    with pytest.raises(gpu.Skip, match="made for .*clips_per_class.*99.*run the data step again"):
        gpu._do(ctx, plan.step("parity"))
