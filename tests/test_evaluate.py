"""``python -m asc_dist.evaluate`` on a checkpoint trained here: the report against a direct
computation from the model's own outputs, images, 1 vs 2 processes, errors that name the cause."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asc_dist import evaluate as ev
from asc_dist.restore import restore

ROOT = Path(__file__).resolve().parent.parent
SMOKE_STEPS = 6  # conf/smoke.yaml's train.max_iters


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kw.pop("cwd", ROOT), env=kw.pop("env", env()), capture_output=True,
                          text=True, timeout=timeout, check=False, **kw)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}"
    return p


def trained_run(tmp_path_factory, shards: Path) -> Path:
    """A smoke-size run (resnet18, 6 steps) trained once per test session and shared read-only."""
    from asc_dist import train

    run_dir = tmp_path_factory.getbasetemp() / "evaluate-smoke-run"
    if not (run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt").is_file():
        # resnet18 (not smoke's small CNN): evaluate, predict and export are checked on a ResNet
        assert train.main(["conf/smoke.yaml", "model.name=resnet18", f"data.shards={shards}",
                           f"run_dir={run_dir}", "data.backend=torch", "train.device=cpu"]) == 0
    return run_dir


def split_clips(split_dir: Path) -> list[dict]:
    """Every sample of a packed split straight from its tars: key, label, city, waveform."""
    out = []
    for tar in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name in sorted(n for n in members if n.endswith(".wav")):
            key = name[:-4]
            wave, _ = sf.read(io.BytesIO(members[name]), dtype="float32")
            meta = json.loads(members[f"{key}.json"])
            out.append({"key": key, "label": int(np.frombuffer(members[f"{key}.i32"], "<i4")[0]),
                        "city": meta["city"], "wave": wave, "wav_bytes": members[name]})
    return out


def direct_logits(checkpoint: Path, waves: list[np.ndarray]) -> tuple[torch.Tensor, list[str]]:
    """The checkpoint's model applied clip by clip, without the evaluation code (CPU, float32)."""
    from asc_dist.config import from_dict
    from asc_dist.frontend import LogMel, Standardize, fix_length
    from asc_dist.models import build_model

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = from_dict(state["config"])
    model = build_model(cfg.model, len(state["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    logmel = LogMel(cfg.features)
    std = Standardize(state["feature_stats"]["mean"], state["feature_stats"]["std"])
    n = round(cfg.features.clip_seconds * cfg.features.sample_rate)
    with torch.no_grad():
        rows = [model(std(logmel(fix_length(torch.from_numpy(w), n))))[0] for w in waves]
    return torch.stack(rows).double(), list(state["classes"])


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, packed_shards) -> Path:
    return trained_run(tmp_path_factory, packed_shards)


@pytest.fixture(scope="session")
def single_report(run_dir, packed_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-single")
    assert ev.main([str(run_dir), "--split", str(packed_shards / "test"), "--out", str(out),
                    "--backend", "torch", "--quiet"]) == 0
    return out


def test_report_equals_direct_computation_from_the_models_outputs(run_dir, packed_shards, single_report):
    report = json.loads((single_report / "report.json").read_text())
    clips = split_clips(packed_shards / "test")
    logits, classes = direct_logits(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt",
                                     [c["wave"] for c in clips])
    labels = np.array([c["label"] for c in clips])
    preds = logits.argmax(1).numpy()
    c = len(classes)
    confusion = np.zeros((c, c), dtype=int)
    np.add.at(confusion, (labels, preds), 1)
    per_class = {cls: float(np.mean(preds[labels == i] == i)) for i, cls in enumerate(classes)
                 if (labels == i).any()}
    nll = float(-logits.log_softmax(1)[torch.arange(len(labels)), torch.from_numpy(labels)].mean())

    assert report["count"] == len(clips) == 20
    assert report["confusion"] == confusion.tolist()
    assert report["accuracy"] == pytest.approx(float(np.mean(preds == labels)), abs=1e-12)
    assert report["classwise_accuracy"] == pytest.approx(float(np.mean(list(per_class.values()))), abs=1e-12)
    assert {k: v for k, v in report["per_class"].items() if v is not None} == pytest.approx(per_class)
    assert report["log_loss"] == pytest.approx(nll, rel=1e-5)
    for city in {x["city"] for x in clips}:
        mask = np.array([x["city"] == city for x in clips])
        got = report["breakdowns"]["city"][city]
        assert got["count"] == mask.sum()
        assert got["accuracy"] == pytest.approx(float(np.mean(preds[mask] == labels[mask])))
    assert report["step"] == SMOKE_STEPS and report["processes"] == 1
    assert report["checkpoint"].endswith(f"step_{SMOKE_STEPS}.pt")
    # predictions.tsv: every clip once, its true class and the model's probabilities
    from asc_dist.validate import read_predictions

    classes, table = read_predictions(single_report / "predictions.tsv")
    assert sorted(table) == sorted(x["key"] for x in clips)
    for i, x in enumerate(clips):
        label, probs = table[x["key"]]
        assert label == labels[i] and classes[int(probs.argmax())] == classes[int(preds[i])]
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_report_files_are_written_and_readable(single_report, run_dir, packed_shards):
    # curves.png: the run's training curves (this checkpoint is a run's), for offline runs
    for name in ("confusion.png", "per_class.png", "curves.png"):
        data = (single_report / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (single_report / "report.md").read_text()
    report = json.loads((single_report / "report.json").read_text())
    assert f"class-wise accuracy: {report['classwise_accuracy']:.4f}" in md
    assert "| city |" in md and "step 6" in md
    assert not list(single_report.glob("*.tmp*"))
    # Both reports name the split they were measured on, as its manifest tells how it was packed
    # (fold 1 here; a number on another protocol compares with other published values).
    test = packed_shards.resolve() / "test"
    assert f"measured on `{test}` (20 clips, packed from `" in md and "fold 1)" in md
    trainer = run_dir / "eval"
    measured = (trainer / "report.md").read_text()
    assert f"Measured on `{packed_shards / 'test'}` (20 clips," in measured
    assert json.loads((trainer / "report.json").read_text())["split"] == str(packed_shards / "test")


@pytest.mark.slow
def test_two_processes_give_the_single_process_report(run_dir, packed_shards, single_report, tmp_path):
    out = tmp_path / "dist"
    # Batch 3 per rank: 20 clips over 2 ranks leaves padding rows that must not be counted.
    ok(run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "asc_dist.evaluate", str(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt"),
            "--split", str(packed_shards / "test"), "--out", str(out), "--backend", "torch",
            "--batch-size", "3", "--quiet"]))
    dist_report = json.loads((out / "report.json").read_text())
    single = json.loads((single_report / "report.json").read_text())
    assert dist_report["processes"] == 2
    for key in ("count", "confusion", "class_counts", "per_class", "classwise_accuracy", "accuracy"):
        assert dist_report[key] == single[key], key
    assert dist_report["log_loss"] == pytest.approx(single["log_loss"], rel=1e-6)
    for name, table in single["breakdowns"].items():  # the log losses summed in another order
        for value, want in table.items():
            got = dist_report["breakdowns"][name][value]
            assert got["log_loss"] == pytest.approx(want["log_loss"], rel=1e-6)
            assert {**got, "log_loss": 0} == {**want, "log_loss": 0}, (name, value)


def test_default_split_and_out_come_from_the_run(run_dir, single_report, capsys):
    # A run dir resolves to its newest checkpoint; the split is the run's test split.
    assert ev.main([str(run_dir), "--backend", "torch", "--quiet"]) == 0
    out = run_dir / "eval" / f"test-step{SMOKE_STEPS}"
    assert json.loads((out / "report.json").read_text())["confusion"] == \
        json.loads((single_report / "report.json").read_text())["confusion"]
    assert "class-wise accuracy" in capsys.readouterr().out


def test_bad_inputs_fail_with_a_message_naming_the_cause(run_dir, tmp_path, capsys):
    assert ev.main([str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert ev.main([str(run_dir), "features.n_mels=32"]) == 2
    assert "features.n_mels is fixed by the checkpoint" in capsys.readouterr().err
    assert ev.main([str(run_dir), "data.no_such_key=1"]) == 2
    assert "data.no_such_key" in capsys.readouterr().err
    (tmp_path / "notasplit").mkdir()
    assert ev.main([str(run_dir), "--split", str(tmp_path / "notasplit"), "--quiet"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_feature_stats_from_checkpoint_or_training_shards(run_dir, packed_shards, tmp_path):
    state = torch.load(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt", weights_only=True)
    kept = state.pop("feature_stats")
    old = tmp_path / "old.pt"
    torch.save(state, old)
    # Without stored stats: recomputed from (cached beside) the training shards, the same numbers.
    r = restore(old)
    assert torch.allclose(r.standardize.mean.flatten(), kept["mean"])
    # ... and without the shards either, the error says what is missing and how to fix it.
    from asc_dist.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="feature_stats.*data.shards="):
        restore(old, overrides=[f"data.shards={tmp_path / 'nowhere'}"])


@pytest.mark.gpu
def test_cuda_evaluation_matches_cpu(run_dir, packed_shards, single_report, tmp_path, monkeypatch):
    """The reference report is CPU float32; the CUDA run is float32 too, with TF32 off (cuDNN and
    matmuls would otherwise round inputs to 10-bit mantissas, ~1e-3 relative)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    out = tmp_path / "gpu"
    assert ev.main([str(run_dir), "--split", str(packed_shards / "test"), "--out", str(out),
                    "--backend", "torch", "--device", "cuda", "train.precision=fp32", "--quiet"]) == 0
    gpu = json.loads((out / "report.json").read_text())
    cpu = json.loads((single_report / "report.json").read_text())
    assert gpu["device"] == "cuda" and gpu["count"] == cpu["count"]
    assert gpu["log_loss"] == pytest.approx(cpu["log_loss"], rel=1e-4)
