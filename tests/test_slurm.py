"""The SLURM jobs on a real SLURM (tests/slurm_cluster.py: slurmctld + two slurmd "nodes" on this
host), submitted unmodified (options and environment only), plus the shell logic behind them
(nodelist -> rendezvous endpoint, ports, ranks per node) with fake SLURM variables.

The cluster tests skip, with the reason, where SLURM cannot run (not root, no apt-get); with
ASC_REQUIRE_SLURM=1 (set by .ci/run) they fail instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, SlurmUnavailable

from asc_dist.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "launch" / "lib.sh"
SMOKE = ["conf/smoke.yaml", "train.log_every=1"]


# -- the shell logic, with fake SLURM variables (no cluster needed) --------------------------------


def lib(call: str, env: dict | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    """Run `source launch/lib.sh; <call>` in a clean environment (no inherited SLURM_*)."""
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "ASC_", "CUDA_", "NCCL_", "GLOO_"))
    }
    if path is not None:
        e["PATH"] = path
    e.update(env or {})
    return subprocess.run(
        ["/bin/bash", "-c", f'source "{LIB}"; {call}'],
        env=e,
        capture_output=True,
        text=True,
        timeout=30,
    )


NODELISTS = {
    "gpu[01-03]": "gpu01",
    "gpu[01-03,07],cpu5": "gpu01",
    "node7": "node7",
    "n[1-2],m3": "n1",
    "rack[1-2]-gpu[08-09]": "rack1-gpu08",
    "gpu-[001-004]": "gpu-001",
    "cn[0005-0010,0012]": "cn0005",
    "a1,b[2-3]": "a1",
}


def test_head_host_without_scontrol_fails_clearly():
    p = lib('asc_head_host "gpu[01-03]"', path="/nonexistent")
    assert p.returncode != 0 and p.stdout == ""
    assert "scontrol not found" in p.stderr and "slurm-client" in p.stderr
    assert "gpu[01-03]" in p.stderr


def test_head_host_is_the_first_host_scontrol_expands(tmp_path):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (package slurm-client)")
    # `scontrol show hostnames` needs a parsable slurm.conf but no running controller.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=expand\nSlurmctldHost=nowhere\n")
    for nodelist, head in NODELISTS.items():
        p = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            env=dict(os.environ, SLURM_CONF=str(conf)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[0] == head, nodelist
        q = lib(f'asc_head_host "{nodelist}"', {"SLURM_CONF": str(conf)})
        assert q.stdout == head + "\n", q.stderr


def test_rendezvous_endpoint_from_fake_job_variables(tmp_path):
    fake = tmp_path / "scontrol"  # no slurm.conf needed: only the expansion of gpu[01-03]
    fake.write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu[01-03]" ] || exit 1\n'
                    "printf 'gpu01\\ngpu02\\n'\n")
    fake.chmod(0o755)
    p = lib(
        "asc_rdzv_endpoint",
        {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_ID": "4242"},
        path=str(tmp_path),
    )
    assert (p.returncode, p.stdout) == (0, "gpu01:24242\n"), p.stderr
    # The port depends on the job id only: a requeued job (same id) gets the same one.
    ports = {lib("asc_rdzv_port", {"SLURM_JOB_ID": str(j)}).stdout.strip() for j in (7, 10007, 7)}
    assert ports == {"20007"}
    assert lib("asc_rdzv_port", {"SLURM_JOB_ID": "1234567"}).stdout.strip() == "24567"
    assert (
        lib("asc_rdzv_port", {"SLURM_JOB_ID": "12", "ASC_RDZV_PORT": "31000"}).stdout.strip()
        == "31000"
    )
    bad = lib("asc_rdzv_port", {"SLURM_JOB_ID": "12", "ASC_RDZV_PORT": "70000"})
    assert bad.returncode != 0 and "ASC_RDZV_PORT='70000'" in bad.stderr


def test_no_nodelist_fails_clearly_instead_of_using_localhost():
    for call in ("asc_head_host", "asc_rdzv_endpoint"):
        p = lib(call, {"SLURM_JOB_ID": "5"})
        assert p.returncode != 0 and p.stdout == ""
        assert "SLURM_JOB_NODELIST is empty" in p.stderr
    p = lib('asc_head_host "gpu[01-03"', path="/nonexistent")  # unbalanced: not a hostlist
    assert p.returncode != 0 and p.stdout == "" and "gpu[01-03" in p.stderr
    # The batch script itself stops before launching anything.
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e["ASC_PYTHON"] = sys.executable
    p = subprocess.run(
        ["bash", "slurm/train.sbatch", "conf/smoke.yaml"],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and "SLURM_JOB_NODELIST is empty" in p.stderr
    assert "torch.distributed.run" not in p.stdout + p.stderr


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "2"}, "2"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,3"}, "3"),
        ({"ASC_NPROC_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
        ({}, "1"),
    ],
)
def test_ranks_per_node(env, expected):
    p = lib("asc_nproc_per_node", env, path="/nonexistent")  # no nvidia-smi either
    assert (p.returncode, p.stdout.strip()) == (0, expected), p.stderr


def test_ranks_per_node_rejects_garbage_and_network_env_is_set_in_one_place():
    p = lib("asc_nproc_per_node", {"ASC_NPROC_PER_NODE": "four"})
    assert p.returncode != 0 and "'four'" in p.stderr
    p = lib(
        'asc_network_env; echo "$NCCL_SOCKET_IFNAME $GLOO_SOCKET_IFNAME"', {"ASC_NET_IFNAME": "ib0"}
    )
    assert p.stdout.strip() == "ib0 ib0"
    p = lib(
        'asc_network_env; echo "$NCCL_SOCKET_IFNAME $GLOO_SOCKET_IFNAME"',
        {"ASC_NET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "=mlx5_0"},
    )
    assert p.stdout.strip() == "=mlx5_0 ib0"  # what the user exported wins


def test_batch_scripts_declare_requeue_and_the_preemption_signal():
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert "--ntasks-per-node=1" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    for f in ("train.sbatch", "pack.sbatch"):
        p = subprocess.run(["bash", "-n", str(ROOT / "slurm" / f)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def test_table1_dry_run_prints_one_training_per_row_and_seed_and_a_collect_after_them():
    p = subprocess.run(
        ["bash", "slurm/table1.sh", "--dry-run", "--after-pack", "77", "--seeds", "3,4", "--only",
         "baseline,focal_mixup", "conf/smoke.yaml", "data.shards=/data/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 5
    jobs = [(row, seed) for row in ("baseline", "focal_mixup") for seed in (3, 4)]
    for line, (row, seed) in zip(lines, jobs, strict=False):
        name = f"table1-{row.replace('_', '-')}-seed{seed}"
        assert line.startswith(
            f"sbatch --job-name={name} --dependency=afterok:77 slurm/train.sbatch "
        )
        assert line.endswith(
            f"conf/smoke.yaml conf/experiment/{row}.yaml name={name} run_dir=runs/{name} "
            f"train.seed={seed} wandb.group=table1-{row} wandb.job_type=row data.shards=/data/x"
        )
    names = ":".join(f"\\<table1-{r.replace('_', '-')}-seed{s}\\>" for r, s in jobs)
    assert f"--dependency=afterok:{names}" in lines[4]
    assert "asc_dist.table1\\ collect" in lines[4]
    bad = subprocess.run(
        ["bash", "slurm/table1.sh", "--dry-run", "--after-pack", "x1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--after-pack 'x1'" in bad.stderr


# -- the real cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster():
    try:
        c = SlurmCluster.start(["asc-n1", "asc-n2"])
    except (SlurmUnavailable, OSError) as e:
        if os.environ.get("ASC_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM required (ASC_REQUIRE_SLURM=1) but unavailable: {e}")
        pytest.skip(f"no local SLURM: {e}")
    yield c
    c.stop()
    shutil.rmtree(c.root, ignore_errors=True)


@pytest.fixture
def slurm(cluster):
    """The cluster, emptied after the test: a failed test's jobs must not block the next ones."""
    yield cluster
    cluster.cancel_all()


def job_env(cluster: SlurmCluster, tmp_path: Path, **extra: str) -> dict:
    # W&B files go to the run dir (the trainer points WANDB_DIR there when it is unset).
    e = cluster.env(
        ASC_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        WANDB_SILENT="true",
        **extra,
    )
    for k in [k for k in e if k.startswith("WANDB_") and k != "WANDB_SILENT"]:
        del e[k]
    return e


def finished(cluster: SlurmCluster, job: int, log: Path, timeout: float = 240) -> dict:
    """Wait for the job; fail with its log, the queue and the daemons' logs unless it succeeded."""
    try:
        info = cluster.wait(job, timeout=timeout)
    except TimeoutError as e:
        info = {"JobState": f"not finished: {e}"}
        status = cluster.status()  # before the cancel: what it was waiting for
        # Cancelled, so that it does not hold back later tests' jobs (the scheduler is FIFO).
        subprocess.run(["scancel", str(job)], env=cluster.env(), check=False, timeout=30)
        time.sleep(2)  # let the job's log get the last lines
    else:
        status = cluster.status()
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')}\n{text[-6000:]}\n"
        f"{status}\n{cluster.logs()}"
    )
    return info


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def ckpt(run_dir: Path, name: str | None = None) -> dict:
    name = name or (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, packed_shards, tmp_path):
    """USR1 to the batch shell (as --signal=B:USR1@300 sends before the time limit) mid-run."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    steps = 40  # long enough that the signal lands mid-run on a busy machine (two test workers)
    # data.backend=dali: its readers are threads; see the report about the torch backend's
    # DataLoader workers, which die of the SIGTERM torchrun sends to each rank's process group.
    job = slurm.sbatch(
        [
            f"--output={log}",
            "--cpus-per-task=2",
            "slurm/train.sbatch",
            *SMOKE,
            f"data.shards={packed_shards}",
            f"run_dir={run_dir}",
            "data.backend=dali",
            f"train.max_iters={steps}",
            "train.ckpt_every=1000",
            "train.eval_every=1000",
            "wandb.mode=offline",
        ],
        cwd=ROOT,
        env=job_env(slurm, tmp_path, ASC_NPROC_PER_NODE="2"),
    )
    end = time.monotonic() + 180
    while not (log.exists() and re.search(r"step +3/", log.read_text(errors="replace"))):
        assert time.monotonic() < end and slurm.state(job) in (
            "PENDING",
            "RUNNING",
            "CONFIGURING",
        ), log.read_text(errors="replace") if log.exists() else slurm.job(job)
        time.sleep(0.1)
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", str(job)], env=slurm.env(), check=True, timeout=30
    )
    info = finished(slurm, job, log)
    text = log.read_text()

    assert info["Restarts"] == "1"
    assert text.count("1 node(s) x 2 rank(s)") == 2  # both runs: sbatch -> torchrun, two ranks
    assert "replicas in sync: parameters identical on all 2 ranks" in text
    m = re.search(r"stop signal received: checkpointed at step (\d+)", text)
    assert m, text[-4000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < steps
    assert f"requeueing job {job}" in text
    assert f"resumed from {run_dir}/checkpoints/step_{stopped}.pt at step {stopped}" in text
    assert text.count("[train.sbatch] job") == 2  # one log (--open-mode=append), two runs
    # the run-dir lock: released by the preempted run, taken by the requeued one, released at the end
    assert "is in use by another run" not in text and not (run_dir / ".lock").exists()
    logged = train_steps(run_dir)
    assert logged == list(range(1, steps + 1))  # every step once: none lost, none trained twice
    first, last = ckpt(run_dir, f"step_{stopped}.pt"), ckpt(run_dir)
    assert last["step"] == steps
    assert first["wandb_id"] and last["wandb_id"] == first["wandb_id"]  # same W&B run continues
    segments = sorted(run_dir.rglob(f"run-{first['wandb_id']}.wandb"))
    assert len(segments) == 2, list(run_dir.rglob("*.wandb"))  # before and after the requeue
    assert json.loads((run_dir / "eval" / "report.json").read_text())["count"] == 20


@pytest.mark.slow
def test_two_nodes_one_rendezvous(slurm, packed_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = slurm.sbatch(
        [
            f"--output={log}",
            "--nodes=2",
            "--cpus-per-task=1",
            "slurm/train.sbatch",
            *SMOKE,
            f"data.shards={packed_shards}",
            f"run_dir={run_dir}",
            "data.backend=torch",
            "train.device=cpu",
            "train.max_iters=4",
        ],
        cwd=ROOT,
        env=job_env(slurm, tmp_path, ASC_NPROC_PER_NODE="1"),
    )
    info = finished(slurm, job, log)
    text = log.read_text()
    assert info["NodeList"] == "asc-n[1-2]" and info["NumNodes"] == "2"
    port = 20000 + job % 10000
    assert f"2 node(s) x 1 rank(s), rendezvous asc-n1:{port}" in text
    # Two torchrun agents, one per node; the first node hosts the c10d store.
    agents = re.findall(
        r"\[asc_node_agent\] node (\S+) \(node id (\d)\): torchrun agent pid \d+, "
        r"rendezvous host: (\w+)",
        text,
    )
    assert sorted(agents) == [("asc-n1", "0", "true"), ("asc-n2", "1", "false")]
    # One training run across both: world size 2, identical parameters, one metrics stream.
    assert "replicas in sync: parameters identical on all 2 ranks" in text
    assert train_steps(run_dir) == [1, 2, 3, 4]


def manifests(out: Path) -> dict:
    res = {}
    for split in ("train", "test"):
        m = json.loads((out / split / "manifest.json").read_text())
        res[split] = {
            "shards": m["shards"],
            "num_samples": m["num_samples"],
            "classes": m["classes"],
            "class_counts": m["class_counts"],
        }
    return res


@pytest.mark.slow
def test_pack_job_then_table1_jobs_after_it(slurm, synth_dataset, packed_shards, tmp_path):
    """pack.sbatch -> four training jobs (afterok on the pack) -> collect (afterok on all four)."""
    env = job_env(
        slurm,
        tmp_path,
        ASC_NPROC_PER_NODE="1",
        ASC_SBATCH_ARGS=f"--output={tmp_path}/%x-%j.out",
        ASC_TRAIN_SBATCH_ARGS="--cpus-per-task=1",
    )
    shards, runs = tmp_path / "shards", tmp_path / "runs"
    pack_log = tmp_path / "pack.out"
    # The same packing options as the packed_shards fixture (tests/conftest.py). Held until the
    # training jobs are submitted, so their dependency is seen unfulfilled first.
    pack = slurm.sbatch(
        [
            f"--output={pack_log}",
            "--hold",
            "--cpus-per-task=2",
            "slurm/pack.sbatch",
            synth_dataset,
            shards,
            "--sample-rate",
            "16000",
            "--shard-max-samples",
            "4",
            "--seed",
            "0",
        ],
        cwd=ROOT,
        env=env,
    )
    p = subprocess.run(
        [
            "bash",
            "slurm/table1.sh",
            "--after-pack",
            str(pack),
            "--runs-root",
            str(runs),
            "--only",
            "nll,focal",
            "--seeds",
            "0,1",
            *SMOKE,
            "model.name=resnet18",  # the rows nll and focal are ResNets (the smoke CNN is the baseline's)
            f"data.shards={shards}",
            "train.max_iters=2",
            "train.eval_every=2",
            "data.backend=torch",
            "train.device=cpu",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    *trains, collect = map(int, p.stdout.split())
    assert len(trains) == 4
    assert all(slurm.job(j)["Dependency"] == f"afterok:{pack}(unfulfilled)" for j in trains)
    assert slurm.job(collect)["Dependency"] == ",".join(f"afterok:{j}(unfulfilled)" for j in trains)
    subprocess.run(["scontrol", "release", str(pack)], env=slurm.env(), check=True, timeout=30)

    finished(slurm, pack, pack_log, timeout=120)
    assert manifests(shards) == manifests(
        packed_shards
    )  # byte-identical shards (sha256 in manifests)
    assert sorted(x.name for x in shards.iterdir()) == ["test", "train"]  # no temporary output left
    names = ["table1-nll-seed0", "table1-nll-seed1", "table1-focal-seed0", "table1-focal-seed1"]
    for j, name in zip(trains, names, strict=True):
        finished(slurm, j, tmp_path / f"{name}-{j}.out")
        assert ckpt(runs / name)["config"]["train"]["seed"] == int(name[-1])
    finished(slurm, collect, tmp_path / f"table1-collect-{collect}.out", timeout=120)
    table = (runs / "table1.md").read_text()
    for name in names:
        assert f"`{runs / name}`" in table
    summary = json.loads((runs / "table1.json").read_text())  # the statistics over the jobs' runs
    (step,) = [c for c in summary["comparisons"] if c["from"] == "ResNet-50 + NLL"]
    assert step["n_seeds"] == 2 and step["ci95"][0] <= step["mean_diff"] <= step["ci95"][1]


@pytest.mark.slow
def test_pack_array_job_packs_one_split_per_task(slurm, synth_dataset, packed_shards, tmp_path):
    log = tmp_path / "pack-%a.out"
    job = slurm.sbatch(
        [f"--output={log}", "--array=0-1", "--cpus-per-task=1", "slurm/pack.sbatch", synth_dataset,
         tmp_path / "out", "--sample-rate", "16000", "--shard-max-samples", "4"],
        cwd=ROOT,
        env=job_env(slurm, tmp_path),
    )
    for task in (0, 1):
        finished(slurm, f"{job}_{task}", tmp_path / f"pack-{task}.out", timeout=120)
    assert "--splits train" in (tmp_path / "pack-0.out").read_text()
    assert "--splits test" in (tmp_path / "pack-1.out").read_text()
    assert manifests(tmp_path / "out") == manifests(packed_shards)  # same bytes as a local pack


@pytest.mark.slow
def test_device_array_tasks_then_the_assembly_after_them(slurm, tmp_path):
    """slurm/devices.sh: one array task per training device (finetune --array-task under
    train.sbatch), then the assembly (afterok on the whole array) writes devices.json."""
    from conftest import make_shards

    from asc_dist import synth, train

    data = synth.generate(tmp_path / "tau", clips_per_class=4, duration=1.0, sample_rate=16000,
                          channels=1, devices=["a", "b"], progress=False)
    shards = make_shards(tmp_path, dataset=data)
    general = tmp_path / "general"
    common = [f"data.shards={shards}", "data.backend=torch", "train.device=cpu", "train.eval_every=2"]
    assert train.main([*SMOKE, *common, f"run_dir={general}", "train.max_iters=2"]) == 0
    env = job_env(slurm, tmp_path, ASC_NPROC_PER_NODE="1",
                  ASC_SBATCH_ARGS=f"--output={tmp_path}/%x-%A_%a.out",
                  ASC_TRAIN_SBATCH_ARGS="--cpus-per-task=1")
    devset = tmp_path / "devset"
    p = subprocess.run(["bash", "slurm/devices.sh", str(general), "--out", str(devset),
                        "--devices", "a,b", *SMOKE, *common, "train.max_iters=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    array, assemble = map(int, p.stdout.split())
    assert slurm.job(assemble)["Dependency"].startswith(f"afterok:{array}")
    for task, device in enumerate(("a", "b")):
        finished(slurm, f"{array}_{task}", tmp_path / f"devset-devices-{array}_{task}.out")
        assert ckpt(devset / device)["config"]["data"]["devices"] == [device]
    finished(slurm, assemble, tmp_path / f"devset-assemble-{assemble}_4294967294.out", timeout=120)
    record = json.loads((devset / "devices.json").read_text())
    assert list(record["members"]) == ["a", "b"] and record["general"]["checkpoint"] == "general.pt"
