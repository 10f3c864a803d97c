"""``python -m asc_dist.export``: the TorchScript waveform->logits module, loaded back by torch alone
(no asc_dist, no torchaudio), gives the checkpoint's logits; metadata; refusing to clobber."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluate import SMOKE_STEPS, direct_logits, trained_run

from asc_dist import export
from asc_dist.restore import restore


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, packed_shards) -> Path:
    return trained_run(tmp_path_factory, packed_shards)


@pytest.fixture(scope="session")
def model_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert export.main([str(run_dir), "--out", str(out)]) == 0
    return out


def test_round_trip_with_torch_only_gives_the_same_logits(run_dir, model_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt"
    g = torch.Generator().manual_seed(5)
    # 1 s at 16 kHz is one clip; also a shorter and a longer wave, a batch size never traced.
    waves = [torch.randn(16000, generator=g) * 0.1, torch.randn(7000, generator=g) * 0.3,
             torch.randn(25000, generator=g) * 0.01]
    torch.save({"batch": torch.stack([w[:16000] if w.numel() >= 16000 else
                                      torch.nn.functional.pad(w, (0, 16000 - w.numel())) for w in waves]),
                "short": waves[1]}, tmp_path / "in.pt")
    script = (
        "import sys, torch\n"
        "from load_model import load, classify\n"
        "m, meta = load('.')\n"
        "p, _ = load('.', format='export')\n"
        f"x = torch.load({str(tmp_path / 'in.pt')!r})\n"
        "out = {'batch': m(x['batch']), 'short': m(x['short']), 'feats': m.features(x['batch'])}\n"
        "out['labels'] = classify(m, meta, x['batch'])[0]\n"
        "out['pt2_batch'], out['pt2_short'] = p(x['batch']), p(x['short'])\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "bad = [k for k in sys.modules if k.startswith(('asc_dist', 'torchaudio'))]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", script], cwd=model_dir, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    want, classes = direct_logits(ckpt, [w.numpy() for w in waves])
    assert got["batch"].shape == got["pt2_batch"].shape == (3, len(classes))
    for fmt in ("", "pt2_"):  # TorchScript and torch.export
        torch.testing.assert_close(got[f"{fmt}batch"].double(), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[f"{fmt}short"][0].double(), want[1], atol=1e-4, rtol=1e-4)
    assert got["feats"].shape == (3, 1, 64, 32)  # smoke front end: 64 mels x 32 frames
    assert got["labels"] == [classes[i] for i in want.argmax(1).tolist()]


def test_metadata_describes_the_front_end_classes_and_stats(run_dir, model_dir):
    meta = json.loads((model_dir / "model.json").read_text())
    state = torch.load(run_dir / "checkpoints" / f"step_{SMOKE_STEPS}.pt", weights_only=True)
    assert meta["classes"] == state["classes"]
    assert meta["input"]["sample_rate"] == 16000 and meta["input"]["clip_samples"] == 16000
    fe = meta["front_end"]
    assert (fe["n_fft"], fe["hop_length"], fe["n_mels"], fe["frames"]) == (512, 500, 64, 32)
    assert fe["mel_scale"] == "slaney" and fe["center"] is True
    assert meta["standardization"]["mean"] == pytest.approx(state["feature_stats"]["mean"].tolist())
    assert meta["standardization"]["std"] == pytest.approx(state["feature_stats"]["std"].clamp(min=1e-2).tolist())
    assert meta["files"] == {"torchscript": "model.pt", "export": "model.pt2", "loader": "load_model.py"}
    assert all(d <= meta["check"]["atol"] for d in meta["check"]["max_abs_diff"].values())
    assert meta["source"]["step"] == SMOKE_STEPS and meta["model"] == "resnet18"
    # The TorchScript file carries the same metadata, for when it travels alone.
    extra = {"model.json": ""}
    torch.jit.load(str(model_dir / "model.pt"), _extra_files=extra)
    assert json.loads(extra["model.json"])["classes"] == meta["classes"]


def test_existing_output_needs_overwrite_and_is_replaced_whole(run_dir, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert export.main([str(run_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    assert export.main([str(run_dir), "--out", str(out), "--overwrite", "--format", "torchscript"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["load_model.py", "model.json", "model.pt"]
    assert "export" not in json.loads((out / "model.json").read_text())["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_round_trip_keeps_nothing(run_dir, tmp_path):
    # atol < 0 can never be met: the check must fail and leave no output behind.
    restored = restore(run_dir)
    with pytest.raises(RuntimeError, match="differs from the checkpoint"):
        export.export(restored, tmp_path / "m", formats=("torchscript",), atol=-1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_exported_module_runs_on_cuda(model_dir, monkeypatch):
    """float32 on both sides, TF32 off (it rounds conv/matmul inputs to 10-bit mantissas)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    m = torch.jit.load(str(model_dir / "model.pt"), map_location="cuda").eval()
    x = torch.randn(4, 16000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(m(x.cuda()).cpu(), torch.jit.load(str(model_dir / "model.pt"))(x),
                                   atol=1e-3, rtol=1e-3)
