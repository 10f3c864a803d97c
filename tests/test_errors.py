"""Every expected failure of every command: exit status 2, one line naming the file, key or value
at fault and what to do, no traceback (ASC_DEBUG=1 shows it). Also a full disk at a checkpoint.

The commands' ``main`` run in this process (``python -m`` only adds ``raise SystemExit(main())``,
which the last two tests exercise for real), so each case costs milliseconds, not a start-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asc_dist.checkpoint import Checkpointer, CheckpointError

ROOT = Path(__file__).resolve().parent.parent


MAINS = {"asc_dist.train": "asc_dist.train", "asc_dist.evaluate": "asc_dist.evaluate",
         "asc_dist.predict": "asc_dist.predict", "asc_dist.features": "asc_dist.features",
         "asc_dist.pack": "asc_dist.pack.cli"}


@pytest.fixture
def run(monkeypatch, capsys):
    """``run(module, *args, **env)`` -> (returncode, stdout, stderr) of the module's main."""
    import importlib

    def call(module: str, *args: str, **env) -> subprocess.CompletedProcess:
        monkeypatch.chdir(ROOT)
        for k in [k for k in os.environ if k.startswith(("WANDB_", "ASC_DEBUG"))]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        rc = importlib.import_module(MAINS[module]).main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(module, rc, out.out, out.err)

    return call


def assert_clean_error(p: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, a single 'error:' line naming every one of ``names``, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, p.stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture
def train(run):
    def call(shards, run_dir, *extra, **env):
        return run("asc_dist.train", "conf/smoke.yaml", f"data.shards={shards}", f"run_dir={run_dir}",
                   "data.backend=torch", "train.device=cpu", *extra, **env)

    return call


def test_config_key_and_value(train, packed_shards, tmp_path):
    assert_clean_error(train(packed_shards, tmp_path / "r", "optim.lrr=1"), "optim.lrr")
    assert_clean_error(train(packed_shards, tmp_path / "r", "model.name=resnet51"),
                       "model.name='resnet51'", "resnet50")  # the choices are listed
    assert not (tmp_path / "r").exists()  # nothing started


def test_missing_and_stale_shards(train, packed_shards, tmp_path):
    line = assert_clean_error(train(tmp_path / "nowhere", tmp_path / "r"), "nowhere/train/manifest.json")
    assert "asc_dist.pack" in line  # what to do
    copy = tmp_path / "shards"
    shutil.copytree(packed_shards, copy)
    tar = sorted((copy / "test").glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-2048])
    assert_clean_error(train(copy, tmp_path / "r"), tar.name, "re-pack")


def test_missing_pretrained_weights(train, packed_shards, tmp_path):
    p = train(packed_shards, tmp_path / "r", "model.name=resnet18", "model.pretrained=imagenet",
              TORCH_HOME=str(tmp_path / "torch_home"))
    assert_clean_error(p, "resnet18-f37072fd.pth", str(tmp_path / "torch_home"))


def test_wandb_online_without_credentials(train, packed_shards, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    p = train(packed_shards, tmp_path / "r", "wandb.mode=online", HOME=str(home),
              NETRC=str(home / ".netrc"))
    assert_clean_error(p, "wandb.mode=online", "wandb login", "wandb.mode=offline")


def test_bad_checkpoint_and_unreadable_audio(run, tmp_path, packed_shards):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert_clean_error(run("asc_dist.evaluate", str(junk)), "junk.pt")
    bad = tmp_path / "clip.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    assert_clean_error(run("asc_dist.predict", str(tmp_path / "none.pt"), str(bad)), "none.pt")
    assert_clean_error(run("asc_dist.features", str(bad)), "clip.wav")
    # a dataset with an unreadable clip: the packer names the file, and writes nothing
    ds = tmp_path / "ds"
    (ds / "audio").mkdir(parents=True)
    sf.write(ds / "audio" / "a.wav", np.zeros(16000, np.float32), 16000)
    shutil.copy(bad, ds / "audio" / "b.wav")
    (ds / "list.csv").write_text("filename,label\naudio/a.wav,x\naudio/b.wav,y\n")
    assert_clean_error(run("asc_dist.pack", str(ds), str(tmp_path / "out"), "--layout", "csv",
                           "--workers", "1", "--no-progress"), "audio/b.wav")
    assert not (tmp_path / "out" / "train").exists()


def python_m(*args: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ASC_DEBUG"))}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
def test_a_real_process_exits_2_and_debug_shows_the_traceback(tmp_path):
    assert_clean_error(python_m("asc_dist.train", "optim.lrr=1"), "optim.lrr")
    p = python_m("asc_dist.train", "optim.lrr=1", ASC_DEBUG="1")
    assert p.returncode != 0 and "Traceback" in p.stderr and "optim.lrr" in p.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_and_names_the_path(small_disk):
    ckpt = Checkpointer(small_disk / "run")
    state = {"model": {"w": torch.zeros(500_000)}, "step": 1}  # 2 MB: two do not fit in 3 MiB
    first = ckpt.save(1, state)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, {**state, "step": 2})
    msg = str(e.value)
    assert "no space left on device" in msg and str(small_disk / "run" / "checkpoints" / "step_2.pt") in msg
    assert "free there" in msg and "step_1.pt" in msg
    assert "unexpected pos" not in msg  # not torch's words
    assert ckpt.latest() == first and torch.load(first, weights_only=True)["step"] == 1
    assert not [p for p in first.parent.iterdir() if ".tmp" in p.name]


def test_full_disk_during_training_exits_2_naming_the_path(train, packed_shards, small_disk):
    # dcase_baseline: checkpoints of ~1.3 MB; the second (step 4) does not fit next to the first
    p = train(packed_shards, small_disk / "run", "model.name=dcase_baseline", "train.max_iters=6",
              "train.ckpt_every=2", "train.eval_every=100")
    line = assert_clean_error(p, "no space left on device", str(small_disk / "run" / "checkpoints"))
    assert "free there" in line
    latest = (small_disk / "run" / "checkpoints" / "latest").read_text().strip()
    assert torch.load(small_disk / "run" / "checkpoints" / latest, weights_only=True)["step"] >= 2
