"""The log-mel front end: torch vs librosa vs DALI parity, fixed shapes, standardisation stats, CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asc_dist import audio, config
from asc_dist import features as cli
from asc_dist import frontend as F
from asc_dist.data import build_source
from asc_dist.data.stats import load_or_compute_stats, stats_path
from asc_dist.errors import DataError

# Small but non-trivial settings (the paper's: 48 kHz, 2048/1500, 10 s -> 320 frames).
SMALL = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
         "features.hop_length=400", "features.n_mels=64", "features.f_min=50", "features.f_max=8000",
         "features.clip_seconds=1.0", "features.frames=40"]
TOL_DB = 0.01


def small_cfg(shards=None, *extra):
    args = list(SMALL) + ([f"data.shards={shards}"] if shards else []) + list(extra)
    return config.load(args, world_size=1)


def librosa_logmel(wave: np.ndarray, f) -> np.ndarray:
    """Independent oracle: librosa with matched settings (reflect padding, Slaney mels and norm)."""
    import librosa

    power = librosa.feature.melspectrogram(
        y=wave.astype(np.float32), sr=f.sample_rate, n_fft=f.n_fft, win_length=f.win_length,
        hop_length=f.hop_length, window="hann", center=True, pad_mode="reflect", power=2.0,
        n_mels=f.n_mels, fmin=f.f_min, fmax=f.f_max, htk=False, norm="slaney")
    db = 10.0 * np.log10(np.maximum(power, 10.0 ** (f.floor_db / 10.0)))
    return db[:, : f.frames]


def test_clip_samples_and_fix_length():
    f = small_cfg().features
    assert F.clip_samples(f) == 16000
    assert F.clip_samples(config.load([]).features) == 480000
    x = torch.arange(10.0).repeat(2, 1)
    assert torch.equal(F.fix_length(x, 4), x[:, :4])
    padded = F.fix_length(x, 13)
    assert padded.shape == (2, 13) and torch.equal(padded[:, :10], x) and padded[:, 10:].abs().sum() == 0
    assert F.fix_length(x, 10) is x


def test_logmel_shape_paper_settings():
    f = config.load([]).features  # 48 kHz, hop 1500: a centred 10 s clip has 321 frames, we keep 320
    out = F.LogMel(f)(torch.zeros(2, 480000))
    assert out.shape == (2, 1, 64, 320) and out.dtype == torch.float32
    assert torch.all(out == f.floor_db)  # silence sits exactly at the floor


def test_logmel_fixed_length_whatever_the_input():
    f = small_cfg().features
    m = F.LogMel(f)
    short, long = torch.randn(3, 9000), torch.randn(3, 23000)
    assert m(short).shape == m(long).shape == (3, 1, 64, 40)
    # a truncated clip equals the zero-padded one
    torch.testing.assert_close(m(short), m(F.fix_length(short, 16000)))


def test_logmel_matches_librosa():
    f = small_cfg().features
    rng = np.random.default_rng(1)
    t = np.arange(16000) / 16000
    waves = np.stack([
        0.1 * rng.standard_normal(16000),
        0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(16000),
        np.concatenate([1e-4 * rng.standard_normal(8000), 0.3 * rng.standard_normal(8000)]),
    ]).astype(np.float32)
    ours = F.LogMel(f)(torch.from_numpy(waves))[:, 0].numpy()
    for w, o in zip(waves, ours):
        ref = librosa_logmel(w, f)
        assert o.shape == ref.shape == (64, 40)
        assert np.abs(o - ref).max() < TOL_DB


@pytest.mark.parametrize("win", [512, 400])
def test_dali_file_matches_torch_and_librosa(tmp_path, win):
    pytest.importorskip("nvidia.dali")
    from asc_dist.data.dali import logmel_for_file

    f = small_cfg(None, f"features.win_length={win}").features
    rng = np.random.default_rng(2)
    x = (0.2 * rng.standard_normal(14000)).astype(np.float32)  # short file: padded to 1 s
    path = tmp_path / "a.wav"
    sf.write(path, x, 16000, subtype="PCM_24")
    dali = logmel_for_file(path, f)
    wave = torch.from_numpy(audio.decode(str(path), 16000))
    ours = F.LogMel(f)(wave)[0].numpy()
    ref = librosa_logmel(F.fix_length(wave, 16000).numpy(), f)
    assert dali.shape == ours.shape == (1, 64, 40)
    assert np.abs(dali - ours).max() < TOL_DB
    assert np.abs(dali[0] - ref).max() < TOL_DB


def test_decode_audio_downmix_and_resample(tmp_path):
    t = np.arange(32000) / 32000
    left, right = np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 300 * t)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1).astype(np.float32), 32000, subtype="FLOAT")
    w = audio.decode(str(tmp_path / "s.wav"), 16000)
    assert w.shape == (16000,) and w.dtype == np.float32
    ref = 0.75 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)
    assert np.abs(w[200:-200] - ref[200:-200]).max() < 1e-2
    with pytest.raises(ValueError, match="cannot decode audio .*junk"):
        audio.decode(b"not a wav at all", 16000, name="junk")


def test_standardize():
    mean, std = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([2.0, 4.0, 0.0])
    s = F.Standardize(mean, std)
    x = torch.randn(4, 1, 3, 7)
    y = s(x)
    torch.testing.assert_close(y[:, :, 0], (x[:, :, 0] - 1) / 2)
    torch.testing.assert_close(y[:, :, 1], (x[:, :, 1] + 2) / 4)
    assert torch.isfinite(y).all()  # zero std is floored, not divided by
    with pytest.raises(ValueError, match="mel bins"):
        s(torch.randn(1, 1, 5, 7))


def test_stats_from_training_split_cached_and_keyed_by_settings(tmp_path, shard_factory):
    shards = shard_factory(clips_per_class=2)
    cfg = small_cfg(shards, "data.backend=torch", "data.num_threads=1")
    mean, std = load_or_compute_stats(cfg, progress=False)
    path = stats_path(cfg)
    assert path.parent == shards / "train" and path.is_file()
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]

    # the numbers are per-mel-bin moments over every frame of every training clip, not test
    def moments(split):
        src = build_source(cfg, split, train=False, rank=0, world_size=1, device=torch.device("cpu"),
                           batch_size=3, cache="none")
        x = torch.cat([b.features[b.valid] for b in src.epoch(0)]).double()
        return x.mean(dim=(0, 1, 3)).float(), x.std(dim=(0, 1, 3), unbiased=False).float()

    m_train, s_train = moments("train")
    m_test, _ = moments("test")
    torch.testing.assert_close(mean, m_train, atol=1e-3, rtol=0)
    torch.testing.assert_close(std, s_train, atol=1e-3, rtol=0)
    assert (mean - m_test).abs().max() > 1e-2
    assert mean.shape == std.shape == (64,)

    # cached: a second call reads the file (edit it to prove it is not recomputed)
    d = json.loads(path.read_text())
    d["mean"] = [float(v) + 1.0 for v in d["mean"]]
    path.write_text(json.dumps(d))
    mean2, _ = load_or_compute_stats(cfg, progress=False)
    torch.testing.assert_close(mean2, mean + 1.0)

    # another feature setting -> another file, recomputed
    cfg2 = small_cfg(shards, "data.backend=torch", "data.num_threads=1", "features.n_mels=32")
    mean3, _ = load_or_compute_stats(cfg2, progress=False)
    assert stats_path(cfg2) != path and stats_path(cfg2).is_file() and mean3.shape == (32,)


def test_stats_missing_shards_named(tmp_path):
    cfg = small_cfg(tmp_path / "nothing")
    with pytest.raises(DataError, match="nothing/train/manifest.json"):
        load_or_compute_stats(cfg, progress=False)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_cli_writes_model_input_and_png(tmp_path, backend, capsys):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    rng = np.random.default_rng(3)
    x = (0.1 * rng.standard_normal((20000, 2))).astype(np.float32)  # stereo, 1.25 s
    wav = tmp_path / "clip.wav"
    sf.write(wav, x, 16000, subtype="PCM_24")
    out, png = tmp_path / "f.npy", tmp_path / "f.png"
    rc = cli.main([str(wav), "--out", str(out), "--png", str(png), "--backend", backend, *SMALL])
    assert rc == 0
    feats = np.load(out)
    assert feats.shape == (1, 64, 40) and feats.dtype == np.float32
    expected = F.LogMel(small_cfg().features)(torch.from_numpy(audio.decode(str(wav), 16000)))[0].numpy()
    assert np.abs(feats - expected).max() < TOL_DB
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "log-mel (1, 64, 40)" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing.wav")]) == 2
    assert "no such audio file" in capsys.readouterr().err
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....junk")
    assert cli.main([str(bad), "--backend", "torch", *SMALL]) == 2
    assert "bad.wav" in capsys.readouterr().err
    assert cli.main([str(bad), "features.nope=1"]) == 2
    assert "features.nope" in capsys.readouterr().err


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_settings_hash_changes_with_any_setting():
    base = small_cfg().features
    h = F.settings_hash(base)
    assert h == F.settings_hash(small_cfg().features) and len(h) == 12
    assert F.settings_hash(small_cfg(None, "features.floor_db=-80").features) != h
    assert F.settings_hash(small_cfg(None, "features.hop_length=320").features) != h


def test_logmel_on_bytes_roundtrip_pcm24():
    """24-bit PCM through soundfile gives the same features as the float source (within dB tol)."""
    f = small_cfg().features
    rng = np.random.default_rng(4)
    x = (0.2 * rng.standard_normal(16000)).astype(np.float32)
    b = io.BytesIO()
    sf.write(b, x, 16000, subtype="PCM_24", format="WAV")
    w = torch.from_numpy(audio.decode(b.getvalue(), 16000))
    m = F.LogMel(f)
    assert np.abs(m(w).numpy() - m(torch.from_numpy(x)).numpy()).max() < TOL_DB


@pytest.mark.gpu
def test_logmel_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    f = small_cfg().features
    x = torch.randn(4, 16000) * 0.1
    cpu = F.LogMel(f)(x)
    gpu = F.LogMel(f).cuda()(x.cuda()).cpu()  # float32 on both devices (cuFFT vs pocketfft)
    assert (cpu - gpu).abs().max() < TOL_DB

