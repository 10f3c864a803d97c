"""One run per run dir: the lock itself (live, dead and requeued holders, contention) and the
trainer refusing a second launch on the same dir while the first runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from asc_dist.errors import RunLockedError
from asc_dist.runlock import Holder, RunLock

ROOT = Path(__file__).resolve().parent.parent


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    me = Holder.me()
    rec = {"host": me.host, "pid": me.pid, "started": time.time(), "token": "t0",
           "proc_start": None, "job_id": None, "restart": None, **fields}
    path = run_dir / ".lock"
    path.write_text(json.dumps(rec))
    return path


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_acquire_release_and_a_live_holder_is_named(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    holder = json.loads(lock.path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    other = RunLock(tmp_path / "run")
    with pytest.raises(RunLockedError) as e:
        other.acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "started" in msg
    lock.release()
    assert not lock.path.exists()
    with RunLock(tmp_path / "run"):
        assert lock.path.exists()
    assert not lock.path.exists() and not list((tmp_path / "run").glob(".lock*"))


def test_dead_holder_on_this_host_is_taken_over(tmp_path, capsys):
    write_lock(tmp_path / "run", pid=dead_pid())
    with RunLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "took over a stale lock" in capsys.readouterr().err


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    write_lock(tmp_path / "run", proc_start="1")  # our pid, but another process start time
    with RunLock(tmp_path / "run"):
        pass


def test_other_host_needs_a_stale_heartbeat(tmp_path, monkeypatch):
    path = write_lock(tmp_path / "run", host="elsewhere", pid=1)
    with pytest.raises(RunLockedError, match="host elsewhere"):
        RunLock(tmp_path / "run").acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))  # no heartbeat for an hour
    monkeypatch.setenv("ASC_LOCK_TIMEOUT", "600")
    with RunLock(tmp_path / "run"):
        pass


def test_earlier_incarnation_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job (same id, next restart count) on another node, seconds after it stopped."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path / "run", host="node7", pid=1, job_id="4242", restart="0")
    with RunLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["restart"] == "1"
    write_lock(tmp_path / "run", host="node7", pid=1, job_id="4242", restart="1")
    with pytest.raises(RunLockedError, match="SLURM job 4242"):  # the same incarnation: live
        RunLock(tmp_path / "run").acquire()


def test_contenders_exactly_one_wins(tmp_path):
    write_lock(tmp_path / "run", pid=dead_pid())  # stale: every contender tries to take it over
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def contend():
        lock = RunLock(tmp_path / "run")
        barrier.wait()
        try:
            lock.acquire()
            wins.append(lock)
        except RunLockedError:
            losses.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    wins[0].release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr("asc_dist.runlock.HEARTBEAT_S", 0.05)
    with RunLock(tmp_path / "run") as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5


def train_cmd(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asc_dist.train", "conf/smoke.yaml", f"data.shards={shards}",
            f"run_dir={run_dir}", "data.backend=torch", "train.device=cpu", *extra]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.mark.slow
def test_second_training_on_the_same_run_dir_is_refused_then_a_killed_run_is_taken_over(
        packed_shards, tmp_path, cli, monkeypatch):
    from asc_dist import torchrun, train

    def no_exec(*a):
        raise AssertionError(f"the launcher started torchrun: {a}")

    monkeypatch.setattr(os, "execv", no_exec)  # were the refusal missing, pytest would be replaced

    run_dir = tmp_path / "run"
    # The holder is a real process: it must die holding the lock (SIGKILL).
    first = subprocess.Popen(train_cmd(packed_shards, run_dir, "train.max_iters=400", "train.log_every=1",
                                       "train.eval_every=1000", "train.ckpt_every=1000"),
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        for line in first.stdout:
            if re.search(r"step\s+2/", line):
                break
        second = cli(train.main, train_cmd(packed_shards, run_dir, "train.max_iters=4")[3:])
        assert second.returncode == 2, second
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        # the same refusal through the launcher, before torchrun starts
        launched = cli(torchrun.main, ["--nproc", "2", "--", *train_cmd(packed_shards, run_dir)[3:]])
        assert launched.returncode == 2 and f"pid {first.pid}" in launched.stderr
        assert "torch.distributed" not in launched.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait()
    assert (run_dir / ".lock").exists()
    third = cli(train.main, train_cmd(packed_shards, run_dir, "train.max_iters=2", "resume=never")[3:])
    assert third.returncode == 0, third
    assert "took over a stale lock" in third.stderr and f"process {first.pid} is gone" in third.stderr
    assert not (run_dir / ".lock").exists()  # released at the end
