import json
import logging

import pytest
import torch
from wandb_reader import read_wandb_file

from asc_dist import config
from asc_dist.metrics import ClassificationMeter
from asc_dist.progress import Progress
from asc_dist.tracking import Tracker, read_metrics

FAKE_KEY = "fakesecret0123456789abcdef0123456789abcd"  # 40 chars, the shape of a real key
CLASSES = ["airport", "bus", "park"]


@pytest.fixture(autouse=True)
def wandb_env(monkeypatch):
    for var in (
        "WANDB_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
        "WANDB_DATA_DIR",
        "WANDB_MODE",
        "WANDB_BASE_URL",
        "WANDB_INIT_TIMEOUT",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")


def make_cfg(run_dir, *overrides):
    return config.load([f"run_dir={run_dir}", "name=unit", *overrides])


def eval_report():
    meter = ClassificationMeter(CLASSES)
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0], [0, 0, 3.0]])
    meter.update(logits, torch.tensor([0, 1, 1, 2]))
    return meter.compute()


def run_file(run_dir, run_id):
    files = sorted(run_dir.glob(f"wandb/*run-*-{run_id}*/run-{run_id}.wandb"))
    assert files, f"no W&B run file for {run_id} under {run_dir}"
    return files


def assert_no_secret(run_dir):
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert FAKE_KEY.encode() not in p.read_bytes(), f"API key written to {p}"


def test_offline_run_holds_config_history_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(
        make_cfg(run_dir, "wandb.mode=offline", "wandb.tags=[unit,test]", "wandb.group=kd-sweep",
                 "wandb.job_type=student"), run_dir, enabled=True
    )
    run_id = tracker.run_id
    assert run_id
    tracker.log_images(1, torch.randn(2, 1, 8, 12), ["airport", "bus"])
    for step in (1, 2, 3):
        tracker.log(step, {"train/loss": 1.0 / step, "train/lr": torch.tensor(1e-3)})
    tracker.log_eval(3, eval_report(), CLASSES)
    tracker.summary({"best_classwise_accuracy": 0.75})
    tracker.close()
    tracker.close()  # idempotent

    run = read_wandb_file(run_file(run_dir, run_id)[0])
    assert run["run_id"] == run_id
    assert run["project"] == "asc-dist"
    assert (run["group"], run["job_type"]) == ("kd-sweep", "student")  # W&B groups a sweep's seeds
    assert run["config"]["train"]["max_iters"] == 5000 and run["config"]["name"] == "unit"
    by_step = {}
    for row in run["history"]:
        by_step.setdefault(row["_step"], {}).update(row)
    assert [by_step[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert by_step[3]["eval/classwise_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert by_step[3]["eval/per_class/bus"] == pytest.approx(0.5)
    assert by_step[3]["eval/confusion"]["_type"] == "image-file"
    assert by_step[3]["eval/per_class_table"]["_type"] == "table-file"
    assert by_step[1]["train/logmel"]["_type"] == "images/separated"
    assert by_step[1]["train/logmel"]["count"] == 2
    assert run["summary"]["best_classwise_accuracy"] == 0.75

    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[1]["train/loss"] == 0.5 and records[0]["train/lr"] == pytest.approx(1e-3)
    assert records[3]["eval/accuracy"] == 0.75 and records[3]["eval/per_class/airport"] == 1.0
    assert (run_dir / "plots" / "confusion_step3.png").stat().st_size > 0
    assert_no_secret(run_dir)


def test_resume_keeps_run_id_and_appends(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, "wandb.mode=offline")
    first = Tracker(cfg, run_dir, enabled=True)
    run_id = first.run_id
    first.log(1, {"train/loss": 2.0})
    first.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # killed mid-write

    second = Tracker(cfg, run_dir, enabled=True, resume_id=run_id)
    assert second.run_id == run_id
    second.log(2, {"train/loss": 1.5})
    second.close()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["train/loss"] for line in lines] == [2.0, 1.5]
    files = run_file(run_dir, run_id)
    assert len(files) == 2  # one offline run dir per process lifetime, both for the same run id
    resumed = read_wandb_file(files[-1])
    assert resumed["run_id"] == run_id
    assert [h["train/loss"] for h in resumed["history"] if "train/loss" in h] == [1.5]


def test_unreachable_online_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="asc_dist.tracking"):
        tracker = Tracker(make_cfg(run_dir, "wandb.mode=online", "wandb.init_timeout=1"), run_dir,
                          enabled=True)
        assert tracker.run_id is None
        tracker.log(1, {"train/loss": 1.0})
        tracker.log_eval(1, eval_report(), CLASSES)
        tracker.log_images(1, torch.randn(1, 1, 8, 8), ["bus"])
        tracker.summary({"x": 1})
        tracker.close(exit_code=0)
    warnings = [r for r in caplog.records if r.name == "asc_dist.tracking"]
    assert len(warnings) == 1 and "W&B init failed" in warnings[0].getMessage()
    assert FAKE_KEY not in caplog.text
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 1]
    assert_no_secret(run_dir)


def test_disabled_and_non_main_rank(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir)  # wandb.mode=disabled by default
    tracker = Tracker(cfg, run_dir, enabled=True)
    tracker.log(1, {"train/loss": 1.0})
    tracker.close()
    assert tracker.run_id is None and not (run_dir / "wandb").exists()
    assert read_metrics(run_dir / "metrics.jsonl")[0]["train/loss"] == 1.0

    other = tmp_path / "rank1"
    quiet = Tracker(make_cfg(other, "wandb.mode=offline"), other, enabled=False)
    quiet.log(1, {"train/loss": 1.0})
    quiet.log_eval(1, eval_report(), CLASSES)
    quiet.close()
    assert quiet.run_id is None and not other.exists()


def test_progress_windows_print_every_n_and_aggregate(capsys, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("asc_dist.progress.time.perf_counter", lambda: now[0])

    def batches():
        for _ in range(8):
            now[0] += 0.1  # the loop waits 0.1 s for each batch
            yield "batch"

    progress = Progress(100, every=4, clips_per_step=64, enabled=True)
    windows = []
    for step, _ in progress.iterate(batches(), start=92):
        now[0] += 0.4  # the step itself
        if step == 95:
            with progress.paused():  # an evaluation: not training time
                now[0] += 30.0
        if progress.due(step):
            windows.append(progress.window(step, loss=float(step), lr=1e-3))
    assert [progress.due(s) for s in (95, 96, 99, 100)] == [False, True, False, True]
    assert len(windows) == 2
    # 4 steps of 0.5 s (0.1 s of it waiting) per window; the paused 30 s does not count
    assert windows[0] == pytest.approx(
        {"loss": 96.0, "lr": 1e-3, "clips_per_s": 128.0, "data_wait_frac": 0.2, "step_time": 0.5})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step  96/100 | loss 96.0000 | lr 1.00e-03 | 128.0 clips/s")
    assert "data wait 20.0%" in lines[0] and lines[0].endswith("eta 0:00:02")
    assert lines[1].endswith("eta 0:00:00")

    silent = Progress(10, every=1, clips_per_step=8, enabled=False)
    (step, _), = list(silent.iterate(["b"], start=0))
    now[0] += 1.0
    assert silent.window(step, loss=1.0, lr=1e-3)["clips_per_s"] == 8.0
    assert capsys.readouterr().out == ""
