"""The GPU check's plan, validated before anything runs (no GPU needed), and its bounded steps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from asc_dist import bench
from asc_dist.bench import gpu, gpu_steps, procs, throughput
from asc_dist.bench import plan as planning
from asc_dist.errors import ConfigError


def test_default_full_size_gpu_plan_is_valid_and_fits_360_s_by_priority(cli):
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda"])
    assert p.returncode == 0, p
    plan = json.loads(p.stdout)
    steps = {s["name"]: s for s in plan["steps"]}
    run = [s for s in plan["steps"] if s["status"] == "run"]
    assert plan["budget_s"] <= 360 and plan["budget_s"] == pytest.approx(
        sum(s["budget_s"] for s in run), abs=0.3)
    for s in plan["steps"]:  # a budget is the processes' fixed costs + 1.5 x the work
        assert s["budget_s"] == pytest.approx(s["fixed_s"] + 1.5 * s["work_s"], abs=0.2), s
        assert s["fixed_s"] == pytest.approx(sum(s["fixed"].values()), abs=0.1)
        assert s["status"] == "run" or s["status"].startswith("not run: "), s
    trainer = steps["trainer-dali-cached-b256"]["fixed"]  # a trainer pays what its process pays
    assert {"trainer.cuda_init", "trainer.autotune", "trainer.final_eval", "trainer.checkpoint",
            "trainer.report", "step.python_torch"} <= set(trainer)
    assert "trainer.compile" in steps["trainer-dali-cached-b256-compiled"]["fixed"]
    # the priority: what runs is the most important; the compiled row and the tests come last
    order = [s["name"] for s in plan["steps"]]
    assert order[:4] == ["data", "trainer-dali-cached-b256", "trainer-dali-streamed-b256",
                         "trainer-torch-streamed-b256"] and order[-1] == "gpu-tests"
    assert all(steps[n]["status"] == "run" for n in order[:7])
    assert steps["gpu-tests"]["status"] == steps["trainer-dali-cached-b256-compiled"]["status"] \
        == "not run: budget"
    rows = plan["throughput"]
    assert {r["batch"] for r in rows} == {64, 256}
    for r in rows:
        assert r["timed_steps"] >= 20
        if r["kind"] != "trainer":
            assert r["steps_per_epoch"] is None and r["train_clips"] is None
            continue
        assert r["steps_per_epoch"] == r["train_clips"] // r["batch"] >= 3, r
        if r["cache"] == "none":  # the loader, not its buffer: few workers, timed in one epoch
            assert r["workers"] * r["prefetch"] * 5 <= r["timed_steps"]
            assert r["warmup_steps"] + r["timed_steps"] <= r["steps_per_epoch"]
            assert r["steps_per_epoch"] >= 10 and r["workers"] <= 4
    assert {(r["backend"], r["batch"]) for r in rows if r["cache"] == "none"} == {
        ("dali", 256), ("torch", 256), ("dali", 64)}


def test_the_plan_table_shows_both_parts_and_the_missing_line_first(cli):
    p = cli(bench.main, ["gpu", "--plan", "--device", "cuda"])
    lines = p.stdout.splitlines()
    assert lines[0].startswith("missing here: ")
    assert "| step | fixed s | work s | budget s | status | what |" in lines
    data = next(ln for ln in lines if ln.startswith("| data |"))
    assert re.match(r"\| data \| [\d.]+ \| 1\.5 x [\d.]+ \| \d+ \| run \|", data), data
    assert "autotune 6 (estimate)" in p.stdout and "not run for the budget: " in p.stdout


def test_budgets_follow_from_the_work_and_the_measured_costs():
    small = planning.make_plan(device="cuda", quick=False, clips_per_class=900, budget=1e9)
    big = planning.make_plan(device="cuda", quick=False, clips_per_class=1800, budget=1e9)
    assert big.step("data").budget_s > small.step("data").budget_s  # more clips to pack
    name = "trainer-dali-cached-b64"
    assert big.step(name).work_s > small.step(name).work_s  # a larger cache to build
    assert big.step("loops-b64").budget_s == small.step("loops-b64").budget_s  # no data involved
    # --costs: what a check measured replaces what the plan states
    measured = planning.make_plan(device="cuda", quick=False, budget=1e9,
                                  costs={"autotune": 1.0, "compile": 40.0, "unknown": 3.0})
    default = planning.make_plan(device="cuda", quick=False, budget=1e9)
    assert measured.step(name).fixed["trainer.autotune"] == 1.0
    assert measured.step(name).budget_s == pytest.approx(default.step(name).budget_s - 5.0)
    assert measured.measured_costs == ("autotune", "compile")
    assert "autotune 1 (measured)" in planning.describe(measured)


def test_costs_come_from_a_matching_results_file(tmp_path):
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"device": "cpu", "quick": True,
                             "fixed_costs": {"measured": {"autotune": 0.5}}}))
    assert gpu._costs(str(f), "cpu", True) == {"autotune": 0.5}
    with pytest.raises(ConfigError, match=r"measured with --device cpu --quick, not this plan"):
        gpu._costs(str(f), "cuda", False)


def test_a_smaller_budget_does_less_in_priority_order():
    plan = planning.make_plan(device="cuda", quick=False, budget=150)
    status = {s.name: s.status for s in plan.steps}
    assert [s.status for s in plan.steps[:4]] == ["run", "run", "run", "not run: budget"]
    used = 0.0
    for s in plan.steps:  # in priority order, each step runs if it still fits, else waits
        if s.runs:
            used += s.budget_s
        elif s.why_not == "budget":
            assert used + s.budget_s > 150, s.name
    assert plan.budget_s == pytest.approx(used) and used <= 150
    # inference reads stop-resume's checkpoint: without it, it cannot run whatever it costs
    assert status["stop-resume"] == "not run: budget"
    assert status["inference"] == "not run: needs stop-resume, not run"
    everything = planning.make_plan(device="cuda", quick=False, budget=2000)
    assert all(s.runs for s in everything.steps)
    with pytest.raises(ConfigError, match=r"--budget 10 s leaves no step to run \(data alone"):
        planning.validate(planning.make_plan(device="cuda", quick=False, budget=10))


def test_missing_packages_are_named_with_the_bundle_that_fetches_exactly_them():
    deps = ["torch", "torchvision", "torchaudio", "nvidia-dali-cuda130", "webdataset", "numpy",
            "omegaconf"]
    here = {"torch", "torchvision", "torchaudio", "numpy", "omegaconf", "pytest"}
    missing = planning.missing_packages(deps, find=lambda m: object() if m in here else None)
    assert missing == ("nvidia-dali-cuda130", "webdataset")
    no_pytest = planning.missing_packages(deps, find=lambda m: m in here - {"pytest"} or None)
    assert no_pytest == (*missing, "pytest")
    assert " --dev " in planning.bundle_command(no_pytest, deps)
    plan = planning.make_plan(device="cuda", quick=False, missing=no_pytest, budget=1e9)
    assert plan.step("gpu-tests").status == "not run: pytest missing"
    cmd = planning.bundle_command(missing, deps)
    skip = cmd.split("--skip ")[1].split(",")
    assert skip[:3] == ["torch", "torchvision", "torchaudio"]
    assert set(skip) == set(deps) - set(missing)
    assert cmd.startswith(f"python -m asc_dist.bundle BUNDLE_DIR --python {sys.version_info[0]}.")
    plan = planning.make_plan(device="cuda", quick=False, missing=missing, budget=1e9)
    status = {s.name: s.status for s in plan.steps}
    # the DALI rows are planned, not dropped; the cached rows move to the torch backend
    assert status["trainer-dali-streamed-b256"] == "not run: nvidia-dali-cuda130 missing"
    assert status["trainer-torch-cached-b256"] == status["trainer-torch-streamed-b256"] == "run"
    line = planning.describe(plan).splitlines()[0]
    assert line.startswith("missing here: nvidia-dali-cuda130, webdataset; ")
    assert line.endswith(planning.bundle_command(missing))  # with the project's dependencies
    core = planning.make_plan(device="cuda", quick=False, missing=("omegaconf",), budget=1e9)
    assert {s.status for s in core.steps} == {"not run: omegaconf missing"}


@pytest.mark.parametrize("args, message", [
    # 20 clips per class leave 160 training clips, < one batch of 256
    (["--clips-per-class", "20"],
     r"trainer-dali-cached-b256 .*batch 256.*0 steps per epoch, need >= 3"),
    # streamed rows time their steps within one epoch
    (["--clips-per-class", "700"],
     r"trainer-(dali|torch)-streamed-b256 .*steps per epoch, need >= 30"),
    (["--only", "nosuch"], r"no step named 'nosuch'; steps: data, trainer-dali-cached-b256"),
    (["--only", "data", "--skip", "data"], r"leave no step to run; steps: data, "),
])
def test_a_plan_not_worth_a_lease_is_refused_in_one_line(cli, args, message):
    p = cli(bench.main, ["gpu", "--plan", "--device", "cuda", *args])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert re.search(message, p.stderr), p.stderr


def test_only_and_skip_split_the_check_and_quick_has_its_own_thresholds(cli):
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda", "--only", "data,trainer-*"])
    steps = json.loads(p.stdout)["steps"]
    names = [s["name"] for s in steps]
    assert names[0] == "data" and all(n.startswith("trainer-") for n in names[1:])
    assert len(names) == 7
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda", "--only", "inference"])
    (only,) = json.loads(p.stdout)["steps"]  # stop-resume ran in an earlier call (same --work)
    assert only["status"] == "run"
    p = cli(bench.main, ["gpu", "--plan", "--json", "--device", "cuda", "--skip",
                         "gpu-tests,loops-"])
    names = [s["name"] for s in json.loads(p.stdout)["steps"]]
    assert "gpu-tests" not in names and not any(n.startswith("loops") for n in names)
    quick = planning.make_plan(device="cpu", quick=True)
    planning.validate(quick)  # 2 steps per epoch is enough for a plumbing check
    assert {v.batch for s in quick.steps for v in s.variants} == {4}
    assert quick.step("inference").status.startswith("not run: GPU-only")
    quick.quick = False  # the same toy steps judged by the full-size thresholds
    with pytest.raises(ConfigError, match="timed steps, need >= 20"):
        planning.validate(quick)


def test_a_step_past_its_budget_is_killed_with_its_children_and_keeps_what_it_wrote(tmp_path):
    """A step saves each result as it has it (the loops step: each row): a kill loses only the
    one in progress, and nothing it started outlives it."""
    child = ("import json, subprocess, sys, time; from pathlib import Path; "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "p = Path(sys.argv[1]) / 'records' / 'slow.json'; "
             "p.write_text(json.dumps({'status': 'running', 'rows': [{'variant': 'first'}]})); "
             "print('working', flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    rec = procs.run_bounded("slow", 2.0, [sys.executable, "-c", child, str(tmp_path)], tmp_path)
    assert time.perf_counter() - t0 < 20
    assert rec["status"] == "timed_out" and "budget of 2 s" in rec["why"]
    assert "working" in rec["log_tail"] and rec["rows"] == [{"variant": "first"}]
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True,
                          check=False)
    assert left.stdout.strip() == "", "a grandchild outlived its step"


def test_a_failed_step_is_recorded_with_its_log_tail(tmp_path):
    rec = procs.run_bounded("bad", 30.0,
                            [sys.executable, "-c", "print('oops'); raise SystemExit(3)"], tmp_path)
    assert rec["status"] == "failed" and "exited 3" in rec["why"] and "oops" in rec["log_tail"]


def test_a_child_output_is_streamed_as_produced_and_it_is_killed_at_its_timeout(capsys):
    seen = []
    child = "import time; print('up', flush=True); time.sleep(61)"
    t0 = time.perf_counter()
    rc, tail = procs.run_child([sys.executable, "-c", child], 1.5,
                               on_line=lambda line, p: seen.append(time.perf_counter() - t0))
    assert rc is None and tail == ["up\n"] and "up" in capsys.readouterr().out
    assert seen and seen[0] < 1.4  # copied while the child ran, not when it ended
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(61\\)"], capture_output=True, text=True,
                          check=False)
    assert left.stdout.strip() == ""


def test_a_check_stopped_from_outside_kills_the_running_step(tmp_path):
    """The device tool's command limit stops the check: the step's tree must not outlive it."""
    script = tmp_path / "check.py"
    script.write_text(
        "import signal, sys\n"
        "from pathlib import Path\n"
        "from asc_dist.bench.procs import run_bounded\n"
        "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))\n"
        "run_bounded('step', 120, [sys.executable, '-c', 'import time; print(\"up\", flush=True); "
        "time.sleep(62)'], Path(sys.argv[1]))\n")
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "work")])
    log = tmp_path / "work" / "logs" / "step.log"
    end = time.monotonic() + 30
    while not (log.is_file() and "up" in log.read_text()):
        assert time.monotonic() < end and p.poll() is None
        time.sleep(0.05)
    p.terminate()
    assert p.wait(timeout=20) == 143
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(62\\)"], capture_output=True, text=True,
                          check=False)
    assert left.stdout.strip() == "", "the step outlived the check"


def _trainer_row(monkeypatch, tmp_path, windows: int, rc):
    """throughput.trainer with its child replaced: it 'logged' ``windows`` windows after the
    warm-up and ended with ``rc`` (None: killed at its timeout)."""
    plan = planning.make_plan(device="cpu", quick=True)
    ctx = gpu_steps.Ctx("cpu", True, tmp_path, plan, deadline=time.time() + 60, name="t")
    v = plan.step("trainer-torch-streamed-b4").variants[0]

    def child(cmd, timeout, **kw):
        assert 55 < timeout <= 58  # the step's deadline minus the margin (2 s at toy size)
        run_dir = tmp_path / "runs" / "trainer-torch-streamed-b4"
        run_dir.mkdir(parents=True)
        lines = [{"step": v.warmup_steps + i + 1, "train/clips_per_s": 10.0 * (i + 1),
                  "train/data_wait_frac": 0.5, "train/step_time": 0.1} for i in range(windows)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return rc, ["last line\n"]

    monkeypatch.setattr(throughput, "run_child", child)
    return throughput.trainer(ctx, v, ctx.child_timeout())


def test_a_trainer_cut_short_is_summarised_from_the_windows_it_logged(monkeypatch, tmp_path):
    row = _trainer_row(monkeypatch, tmp_path, windows=2, rc=None)
    assert row["status"] == "partial" and row["windows"] == 2 and "2 windows" in row["why"]
    assert row["clips_per_s"] == 15.0 and row["data_wait_pct"] == 50.0
    assert row["workers"] == 1 and row["prefetch"] == 2


def test_a_trainer_cut_short_before_two_windows_times_out(monkeypatch, tmp_path):
    with pytest.raises(TimeoutError, match=r"1 logged window\(s\) after the warm-up"):
        _trainer_row(monkeypatch, tmp_path, windows=1, rc=None)
    with pytest.raises(RuntimeError, match="the trainer exited 1: last line"):
        _trainer_row(monkeypatch, tmp_path / "again", windows=3, rc=1)


def test_a_reused_work_folder_with_data_for_another_plan_is_not_used(tmp_path):
    """--work is reused across calls: data made for another size must not be measured as this
    plan's (the rows would report the plan's clips and steps per epoch, not the data's)."""
    plan = planning.make_plan(device="cpu", quick=True)
    (tmp_path / "shards" / "test").mkdir(parents=True)
    (tmp_path / "shards" / "test" / "manifest.json").write_text("{}")
    (tmp_path / "data.json").write_text(json.dumps({"clips_per_class": 99, "quick": False}))
    ctx = gpu_steps.Ctx("cpu", True, tmp_path, plan)
    with pytest.raises(gpu_steps.Skip,
                       match="made for .*clips_per_class.*99.*run the data step again"):
        gpu_steps._do(ctx, plan.step("parity"))
