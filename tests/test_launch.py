"""The launchers without SLURM, run for real: launch/single_node.sh (torchrun --standalone) with a
stop signal and a resume, launch/multi_node.sh as two "nodes" on this host, and every --help."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "ASC_", "MASTER_", "NODE_RANK", "NNODES"))
    }
    e.update(
        ASC_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true"
    )
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "conf/smoke.yaml",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "train.log_every=1",
        "train.device=cpu",  # several ranks on one GPU would be refused
        *extra,
    ]


@pytest.mark.parametrize(
    "script,first_line",
    [
        ("launch/single_node.sh", "usage: bash launch/single_node.sh [--nproc N]"),
        (
            "launch/multi_node.sh",
            "usage: MASTER_ADDR=host0 NNODES=2 NODE_RANK=0 bash launch/multi_node.sh",
        ),
        ("slurm/table1.sh", "usage: bash slurm/table1.sh [--after-pack JOBID]"),
    ],
)
def test_help(script, first_line):
    for flag in ("--help", "-h"):
        p = subprocess.run(
            ["bash", script, flag], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(first_line)
        assert "set -euo" not in p.stdout  # the comment block only


def test_multi_node_names_what_is_missing():
    p = subprocess.run(
        ["bash", "launch/multi_node.sh", "conf/smoke.yaml"],
        cwd=ROOT,
        env=env(NNODES="2"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 2 and "MASTER_ADDR is not set" in p.stderr
    p = subprocess.run(
        ["bash", "launch/multi_node.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env(MASTER_ADDR="127.0.0.1", NNODES="2", NODE_RANK="2"),
    )
    assert p.returncode == 2 and "NODE_RANK='2' must be 0..1" in p.stderr
    p = subprocess.run(
        ["bash", "launch/single_node.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env(ASC_PYTHON="/nonexistent/python"),
    )
    assert p.returncode == 1 and "/nonexistent/python" in p.stderr and "launch/setup.sh" in p.stderr


@pytest.mark.slow
def test_single_node_stop_signal_on_one_rank_then_resume(packed_shards, tmp_path):
    """Two ranks streaming (DALI where installed) through the launcher. Only one rank gets the
    stop signal: both checkpoint at the same step, then the rerun resumes from it."""
    run_dir = tmp_path / "run"

    def launch(max_iters: int) -> list[str]:
        return ["bash", "launch/single_node.sh", "--nproc", "2",
                *smoke(packed_shards, run_dir, "data.backend=auto", "data.cache=none",
                       f"train.max_iters={max_iters}", "train.ckpt_every=1000", "train.eval_every=1000")]

    p = subprocess.Popen(launch(200), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if re.search(r"step +3/", line):
            # the script exec'd torchrun: its children are the ranks
            ranks = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
            ranks = [int(x) for x in ranks.stdout.split()]
            assert len(ranks) == 2, ranks
            os.kill(ranks[1], signal.SIGUSR1)
            break
    out.append(p.communicate(timeout=120)[0])
    text = "".join(out)
    m = re.search(r"stop signal received: checkpointed at step (\d+)", text)
    assert m, text[-4000:]
    assert "replicas in sync" in text  # both ranks stopped at the same step
    assert p.returncode != 0  # torchrun reports the ranks' exit code 3 (stopped early) as a failure
    stopped = int(m.group(1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped}.pt"

    q = subprocess.run(launch(stopped + 2), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=240)
    assert q.returncode == 0, q.stdout[-4000:] + q.stderr[-4000:]
    assert "[single_node] 2 process(es)" in q.stderr
    assert (
        f"at step {stopped}" in q.stderr
        and "replicas in sync: parameters identical on all 2 ranks" in q.stderr
    )
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped + 2}.pt"


@pytest.mark.slow
def test_multi_node_two_nodes_on_this_host(packed_shards, tmp_path):
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                "bash",
                "launch/multi_node.sh",
                "--nproc",
                "1",
                *smoke(packed_shards, tmp_path / "run", "data.backend=torch", "train.max_iters=3"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NNODES="2", NODE_RANK=str(r)),
        )
        for r in (1, 0)
    ]  # the non-host node first: it must wait for node 0's store
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert (
        f"[multi_node] node 1/2, 1 process(es), rendezvous 127.0.0.1:{port} (host: false)"
        in outs[0]
    )
    assert (
        f"[multi_node] node 0/2, 1 process(es), rendezvous 127.0.0.1:{port} (host: true)" in outs[1]
    )
    assert "replicas in sync: parameters identical on all 2 ranks" in "".join(outs)
