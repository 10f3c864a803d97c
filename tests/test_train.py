"""The trainer as users run it: real torchrun processes (gloo), real shards, real signals."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from wandb_reader import read_wandb_file

from asc_dist import train
from asc_dist.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SMOKE = ["conf/smoke.yaml"]
TRAIN = ["-m", "asc_dist.train", *SMOKE]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    # train.device=cpu: two ranks on a one-GPU machine would otherwise ask for GPU 1.
    return [f"data.shards={shards}", f"run_dir={run_dir}", "data.backend=torch", "train.device=cpu",
            *extra]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return run(TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}"] + TRAIN + args, timeout)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}"
    return p


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class _StopAt(logging.Handler):
    """Sends this process SIGTERM when the trainer logs ``step N/``: the real signal path."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.pattern, self.sent = re.compile(rf"step\s+{step}/"), False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.sent and self.pattern.search(record.getMessage()):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("cache", ["none", "device"])
def test_sigterm_then_resume_is_bit_identical_to_uninterrupted(packed_shards, tmp_path, cache, cli):
    steps = 16
    # with the cached features, every in-batch augmentation on and a teacher's logits: their
    # per-step draws and the logits file resume too
    aug = []
    if cache == "device":
        teacher = tmp_path / "teacher"
        ok(cli(train.main, SMOKE + overrides(packed_shards, teacher, "train.max_iters=2")))
        aug = ["augment.mixstyle.p=0.5", "augment.freq_mask.count=2", "augment.freq_mask.width=8",
               "augment.time_mask.count=1", "augment.time_mask.width=4", "augment.roll_seconds=0.1",
               "optim.name=adamw", "optim.schedule=cosine", "optim.warmup_iters=3",
               f"distill.teachers=[{teacher}]", "distill.weight=0.5"]
    args = lambda d: SMOKE + overrides(packed_shards, d, f"train.max_iters={steps}", "train.log_every=1",  # noqa: E731
                                       "train.ckpt_every=100", "train.eval_every=100", f"data.cache={cache}",
                                       *aug)
    ok(cli(train.main, args(tmp_path / "straight")))

    interrupted = tmp_path / "interrupted"
    stop = _StopAt(3)
    logging.getLogger("asc_dist").addHandler(stop)
    try:
        p = cli(train.main, args(interrupted))
    finally:
        logging.getLogger("asc_dist").removeHandler(stop)
    assert p.returncode == 3, p  # stopped early, checkpoint written
    stopped_at = model_state(interrupted / "checkpoints" / "step_{}.pt".format(
        (interrupted / "checkpoints" / "latest").read_text().strip()[5:-3]))["step"]
    assert 3 <= stopped_at < steps
    resumed = ok(cli(train.main, args(interrupted)))
    assert "resumed from" in resumed.stderr and f"at step {stopped_at}" in resumed.stderr

    a = model_state(tmp_path / "straight" / "checkpoints" / f"step_{steps}.pt")
    b = model_state(interrupted / "checkpoints" / f"step_{steps}.pt")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert a["scheduler"] == b["scheduler"]
    # metrics.jsonl: no step trained twice
    logged = [r["step"] for r in read_metrics(interrupted / "metrics.jsonl") if "train/loss" in r]
    assert len(logged) == len(set(logged)) == steps


@pytest.mark.slow
def test_two_ranks_a_killed_rank_fails_loudly_and_the_rerun_resumes_to_the_end(packed_shards, tmp_path):
    """Two gloo ranks under torchrun, gradients all-reduced in bf16 (train.grad_compress): one
    rank killed -> the run fails, it does not hang; the rerun, finding a damaged ``latest``
    pointer, says so once (not once per rank), resumes from the newest complete checkpoint and
    ends as a run does: replicas in sync, every test clip scored once, curves, lock released."""
    run_dir = tmp_path / "run"
    args = overrides(packed_shards, run_dir, "train.max_iters=30", "train.ckpt_every=2",
                     "train.eval_every=1000", "train.log_every=2", "train.grad_compress=bf16")
    p = subprocess.Popen(TORCHRUN + ["--standalone", "--nproc_per_node=2"] + TRAIN + args, cwd=ROOT,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (run_dir / "checkpoints" / "step_4.pt").exists(), what="step_4.pt")
    os.kill(children(p.pid)[1], signal.SIGKILL)
    out = p.communicate(timeout=120)[0]  # fails, does not hang
    assert p.returncode != 0, out
    last = int((run_dir / "checkpoints" / "latest").read_text().strip()[5:-3])
    (run_dir / "checkpoints" / "latest").write_text("garbage.pt\n")
    rerun = ok(torchrun(2, args))
    assert rerun.stderr.count("checkpoint pointer") == 1, rerun.stderr
    assert f"step_{last}.pt at step {last}" in rerun.stderr
    assert "replicas in sync: parameters identical on all 2 ranks" in rerun.stderr
    assert "class-wise accuracy" in rerun.stderr.lower()
    assert "[rank 1]" not in rerun.stderr  # rank 1 logs warnings only, and there were none
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records if "train/loss" in r]
    assert set(steps) == set(range(2, 31, 2)) and steps[-1] == 30
    assert all(r["train/clips_per_s"] > 0 for r in records if "train/loss" in r)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"), key=lambda c: int(c.stem[5:]))
    assert [c.name for c in ckpts] == ["step_26.pt", "step_28.pt", "step_30.pt"]  # keep_last 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_30.pt"
    state = model_state(ckpts[-1])
    assert state["step"] == 30 and state["model_name"] == "dcase_baseline"
    manifest = json.loads((packed_shards / "test" / "manifest.json").read_text())
    assert state["classes"] == manifest["classes"]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["count"] == manifest["num_samples"]  # every test clip scored exactly once
    assert sum(report["class_counts"].values()) == manifest["num_samples"]
    assert set(report["breakdowns"]) == {"city", "device"}
    assert (run_dir / "eval" / "confusion.png").stat().st_size > 0
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # offline-readable curves
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert not (run_dir / ".lock").exists()  # released
    assert (run_dir / "config.yaml").read_text().count("dcase_baseline") == 1


def test_truncated_latest_checkpoint_falls_back_to_previous(packed_shards, tmp_path, cli):
    run_dir = tmp_path / "run"
    ok(cli(train.main, SMOKE + overrides(packed_shards, run_dir, "train.global_batch=2")))
    newest = run_dir / "checkpoints" / "step_6.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    p = ok(cli(train.main, SMOKE + overrides(packed_shards, run_dir, "train.global_batch=2",
                                             "train.max_iters=9")))
    assert "step_6.pt" in p.stderr  # the warning names the broken file
    assert "resumed from" in p.stderr and "step_3.pt at step 3" in p.stderr
    assert model_state(run_dir / "checkpoints" / "step_9.pt")["step"] == 9


def test_paper_protocol_trains_on_every_clip_without_a_test_split(synth_dataset, tmp_path, cli):
    """pack --fold all + conf/experiment/paper_protocol.yaml: no test split, so no evaluation
    (said once), the checkpoints kept, a clean finish; evaluate then asks for a split."""
    from conftest import make_shards

    from asc_dist import evaluate

    shards = make_shards(tmp_path, dataset=synth_dataset, fold="all")
    assert [p.name for p in shards.iterdir()] == ["train"]
    run_dir = tmp_path / "run"
    p = ok(cli(train.main, SMOKE + ["conf/experiment/paper_protocol.yaml",
                                    *overrides(shards, run_dir, "wandb.mode=offline")]))
    assert p.stderr.count("no evaluation") == 1 and "class-wise accuracy" not in p.stderr
    ckpts = run_dir / "checkpoints"
    assert sorted(f.name for f in ckpts.glob("step_*.pt")) == ["step_3.pt", "step_6.pt"]
    assert (ckpts / "latest").read_text().strip() == "step_6.pt"
    assert not (ckpts / "best.pt").exists()
    assert not (run_dir / "eval").exists() and (run_dir / "curves.png").is_file()
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if any("eval" in k for k in r)]
    state = model_state(ckpts / "step_6.pt")
    assert state["config"]["data"]["test_split"] is None
    assert state["config"]["name"] == "paper-protocol"
    (wandb_file,) = run_dir.rglob(f"run-{state['wandb_id']}.wandb")
    summary = read_wandb_file(wandb_file)["summary"]  # no "best accuracy" of a run that scored none
    assert summary["step"] == 6 and "best_classwise_accuracy" not in summary
    r = cli(evaluate.main, [run_dir])
    assert r.returncode == 2 and "trained without a test split (data.test_split=null" in r.stderr


def test_wandb_offline_history_and_run_id_survive_resume(packed_shards, tmp_path, cli):
    run_dir = tmp_path / "run"
    common = ["wandb.mode=offline", "train.global_batch=2", "train.eval_every=4"]
    ok(cli(train.main, SMOKE + overrides(packed_shards, run_dir, "train.max_iters=4", *common)))
    first_id = model_state(run_dir / "checkpoints" / "step_4.pt")["wandb_id"]
    assert first_id
    ok(cli(train.main, SMOKE + overrides(packed_shards, run_dir, "train.max_iters=6", *common)))
    assert model_state(run_dir / "checkpoints" / "step_6.pt")["wandb_id"] == first_id
    files = sorted(run_dir.rglob(f"run-{first_id}.wandb"))
    assert files, list(run_dir.rglob("*.wandb"))
    history = [h for f in files for h in read_wandb_file(f)["history"]]
    steps = {h["_step"] for h in history if "train/loss" in h}
    assert {2, 4, 6} <= steps
    config = read_wandb_file(files[0])["config"]
    assert config["model"]["name"] == "dcase_baseline"


def test_config_errors_fail_before_any_process_group(packed_shards, tmp_path, cli, monkeypatch):
    # As rank 0 of 2 under torchrun: were a process group started, it would wait for rank 1.
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        m.setenv("RANK", "0")
        p = cli(train.main, SMOKE + overrides(packed_shards, tmp_path / "run", "train.global_batch=3"))
    assert p.returncode == 2
    assert "train.global_batch=3 is not divisible by the world size 2" in p.stderr
    p = cli(train.main, SMOKE + overrides(packed_shards, tmp_path / "run", "optim.learning_rate=1"))
    assert p.returncode == 2 and "optim.learning_rate" in p.stderr
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_the_step(packed_shards, tmp_path, cli):
    p = cli(train.main, SMOKE + overrides(packed_shards, tmp_path / "run", "optim.name=sgd",
                                          "optim.lr=1e30", "train.max_iters=20",
                                          "augment.mixup.enabled=false", "loss.name=ce"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert re.search(r"non-finite loss \(\w+\) in steps? \d+(-\d+)?", p.stderr), p.stderr[-3000:]


def test_demo_config_runs_at_reduced_size(tmp_path, cli):
    from conftest import make_shards

    shards = make_shards(tmp_path, clips_per_class=3, duration=2.0, sample_rate=48000,
                         shard_max_samples=8)
    p = ok(cli(train.main, ["conf/demo.yaml"] + overrides(
        shards, tmp_path / "run", "train.max_iters=2", "train.global_batch=4",
        "train.eval_every=2", "data.backend=auto")))
    assert "class-wise accuracy" in p.stderr.lower()
    assert model_state(tmp_path / "run" / "checkpoints" / "step_2.pt")["model_name"] == "resnet18"


def test_resume_with_another_batch_size_warns_that_the_data_order_changes(packed_shards, tmp_path, cli):
    run_dir = tmp_path / "run"
    ok(cli(train.main, SMOKE + overrides(packed_shards, run_dir, "train.global_batch=2",
                                         "train.max_iters=2")))
    p = ok(cli(train.main, SMOKE + overrides(packed_shards, run_dir, "train.global_batch=4",
                                             "train.max_iters=3")))
    assert "10 steps per epoch, this run has 5" in p.stderr
    assert "at step 2" in p.stderr


def test_pretrained_weights_are_loaded_and_said_so(packed_shards, tmp_path, cli):
    """model.pretrained=<file>: the INFO line names the file and what was loaded."""
    from asc_dist import config as config_lib
    from asc_dist.models import build_model

    weights = tmp_path / "weights.pt"
    cfg = config_lib.load(["conf/smoke.yaml"])
    torch.save(build_model(cfg.model, 1000).state_dict(), weights)  # an ImageNet-shaped head
    p = ok(cli(train.main, SMOKE + overrides(packed_shards, tmp_path / "run", f"model.pretrained={weights}",
                                             "train.max_iters=1", "train.eval_every=1")))
    assert re.search(rf"loaded \d+ tensors from {re.escape(str(weights))}", p.stderr), p.stderr
    assert "(new head, expected)" in p.stderr and "warning" not in p.stderr


@pytest.mark.parametrize("recipe", ["plain", "augmented_and_distilled"])
def test_a_training_step_never_waits_for_the_device(packed_shards, tmp_path, monkeypatch, recipe):
    """train_step reads nothing back (no .item(), .tolist(), bool(), .numpy()): on a GPU each
    would drain the queue. The loss is read once per log window by mean_loss. Also with every
    in-batch augmentation on and a teacher's logits looked up per batch."""
    from asc_dist import config as config_lib
    from asc_dist import dist
    from asc_dist.train import build, mean_loss, train_step

    extra = []
    if recipe != "plain":
        teacher = tmp_path / "teacher"
        assert train.main(["conf/smoke.yaml", *overrides(packed_shards, teacher, "train.max_iters=2")]) == 0
        extra = [f"distill.teachers=[{teacher}]", "distill.weight=0.5", "augment.mixstyle.p=1",
                 "augment.freq_mask.count=1", "augment.freq_mask.width=8", "augment.time_mask.count=1",
                 "augment.time_mask.width=4", "augment.roll_seconds=0.1"]
    cfg = config_lib.load(["conf/smoke.yaml", *overrides(packed_shards, tmp_path / "run", "train.grad_clip=1.0",
                                                          *extra)], world_size=1)
    env = dist.init("cpu")
    p = build(cfg, env)
    try:
        batch = next(iter(p.train_src.epoch(0)))
        gen = torch.Generator().manual_seed(0)

        def sync(*a, **k):
            raise AssertionError("host synchronisation inside train_step")

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "__bool__", "__float__"):
                m.setattr(torch.Tensor, name, sync)
            losses = [train_step(p, batch, gen, torch.Generator().manual_seed(1), cfg) for _ in range(3)]
        total = sum(losses, torch.zeros(()))
        assert mean_loss(total, 1, 3) == pytest.approx(sum(x.item() for x in losses) / 3)
        from asc_dist.errors import TrainingDiverged

        with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) in steps 4-6"):
            mean_loss(torch.tensor(float("nan")), 4, 6)
    finally:
        p.train_src.close()
        p.test_src.close()


def test_one_process_per_gpu_is_enforced_with_a_clear_message(monkeypatch):
    from asc_dist import dist
    from asc_dist.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 but this node has 1 visible GPU"):
        dist.init("cuda")


def test_compile_comes_after_the_ddp_wrap_with_the_configured_mode(packed_shards, tmp_path, monkeypatch):
    """PyTorch's order for overlapping communication: DDP first, then compile (here one process,
    so the wrap is a no-op; the order of the calls is what is checked). Compiling itself is a GPU
    check (launch/gpu_check.sh); here the call is recorded instead of run."""
    from asc_dist import config as config_lib
    from asc_dist import dist
    from asc_dist import train as train_mod

    calls = []
    wrap = dist.wrap_model
    monkeypatch.setattr(dist, "wrap_model", lambda m, *a, **k: calls.append("ddp") or wrap(m, *a, **k))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(("compile", kw)))
    cfg = config_lib.load(["conf/smoke.yaml", *overrides(packed_shards, tmp_path / "run"),
                           "model.compile=true", "model.compile_mode=reduce-overhead"], world_size=1)
    p = train_mod.build(cfg, dist.init("cpu"))
    p.train_src.close()
    p.test_src.close()
    assert calls == ["ddp", ("compile", {"mode": "reduce-overhead"})]


# Runs as each rank's main module under torchrun: rank 1's loss at step 2 (the end of the first
# log window with train.log_every=2) reads as NaN; its gradients and every other rank stay finite.
_NAN_ON_RANK_1 = '''
import os, sys
from pathlib import Path
from asc_dist import train

rank = int(os.environ["RANK"])
if rank == 1:
    real, calls = train.train_step, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss + float("nan") if calls[0] == 2 else loss

    train.train_step = poisoned
rc = train.main(sys.argv[1:])
Path(__file__).with_name(f"rc{rank}").write_text(str(rc))
sys.exit(rc)
'''


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(packed_shards, tmp_path):
    """The ranks agree on the loss at the log step they all read: both stop there with exit 2
    and one message, instead of one rank stopping and the other waiting in its next collective."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_RANK_1)
    args = SMOKE + overrides(packed_shards, tmp_path / "run", "train.max_iters=20", "train.log_every=2",
                             "train.eval_every=100", "train.ckpt_every=100")
    start = time.monotonic()
    p = run(TORCHRUN + ["--standalone", "--nproc_per_node=2", str(script)] + args, timeout=120)
    elapsed = time.monotonic() - start
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    # Each rank returned 2 from main itself: none was killed by torchrun or by a collective's timeout.
    assert [(tmp_path / f"rc{r}").read_text() for r in (0, 1)] == ["2", "2"], out[-4000:]
    assert out.count("non-finite loss") == 1, out[-4000:]
    assert "[rank 0] asc_dist.train: error: non-finite loss (nan) in steps 1-2" in out, out[-4000:]
    # The one traceback is torchrun's own (it raises ChildFailedError for any non-zero exit).
    assert out.count("Traceback") == 1 and "ChildFailedError" in out, out[-4000:]
    assert not re.search(r'File ".*(asc_dist|nan_on_rank_1)', out), out[-4000:]
    assert elapsed < 100, elapsed  # far below the 600 s collective timeout
    # torchrun's summary of the failed ranks: both with their own code, none "-15" (SIGTERM) from
    # torchrun stopping a rank that was still finishing its exit (train.leave_together)
    assert re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", out, re.MULTILINE) == ["2", "2"], out[-4000:]
