"""Front-end options (mel_scale, mel_norm, log, PaSST's): torch LogMel vs torchaudio (the DCASE 2024 task 1
baseline's front end) vs DALI's graph, for each combination; defaults unchanged."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from omegaconf import OmegaConf

from asc_dist import config
from asc_dist import frontend as F

# Small settings (as tests/test_features.py): 16 kHz, 512/400, 64 mels 50-8000 Hz, 1 s -> 40 frames.
SMALL = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
         "features.hop_length=400", "features.n_mels=64", "features.f_min=50", "features.f_max=8000",
         "features.clip_seconds=1.0", "features.frames=40"]
# The CPJKU DCASE 2024 task 1 baseline's front end on 1 s clips (32 kHz: 65 centred frames).
DCASE24 = ["features.sample_rate=32000", "features.n_fft=4096", "features.win_length=3072",
           "features.hop_length=500", "features.n_mels=256", "features.f_min=0", "features.f_max=16000",
           "features.clip_seconds=1.0", "features.frames=65", "features.mel_scale=htk",
           "features.mel_norm=none", "features.log=ln", "features.log_eps=1e-5"]


def features(base, *extra):
    return config.load(list(base) + list(extra), world_size=1).features


def waves(sample_rate: int, n: int = 3, seed: int = 0) -> np.ndarray:
    """Noise, a tone in faint noise, and faint noise then silence then a loud half (bins near
    zero power exercise the floor / eps)."""
    rng = np.random.default_rng(seed)
    t = np.arange(sample_rate) / sample_rate
    q = sample_rate // 4
    out = [0.1 * rng.standard_normal(sample_rate),
           0.5 * np.sin(2 * np.pi * 440 * t) + 1e-3 * rng.standard_normal(sample_rate),
           np.concatenate([1e-4 * rng.standard_normal(q), np.zeros(q),
                           0.3 * rng.standard_normal(sample_rate - 2 * q)])]
    return np.stack(out[:n]).astype(np.float32)


def dali_logmel(batch: np.ndarray, f) -> np.ndarray:
    """[B, L] float32 -> what asc_dist.data.dali.logmel_graph gives per clip (CPU; [B, 1, n_mels,
    frames], or the power spectrogram where torch finishes: mel_scale=kaldi), the clips as float
    WAV bytes (decoded exactly)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from asc_dist.data.dali import logmel_graph

    encoded = []
    for w in batch:
        b = io.BytesIO()
        sf.write(b, w, int(f.sample_rate), subtype="FLOAT", format="WAV")
        encoded.append(np.frombuffer(b.getvalue(), dtype=np.uint8))
    pipe = Pipeline(batch_size=len(encoded), num_threads=1, device_id=None, seed=0,
                    prefetch_queue_depth=1)
    with pipe:
        src = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        pipe.set_outputs(logmel_graph(src, f, gpu=False))
    pipe.build()
    pipe.feed_input("encoded", encoded)
    (out,) = pipe.run()
    return np.stack([np.array(x) for x in out])


def dali_filterbank(f) -> np.ndarray:
    """DALI's mel weights [n_mels, n_fft/2+1]: mel_filter_bank applied to an identity "spectrogram"."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    scale, norm, _ = F.options(f)
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
    with pipe:
        x = fn.external_source(name="x", dtype=types.FLOAT, ndim=2, layout="ft")
        pipe.set_outputs(fn.mel_filter_bank(
            x, sample_rate=float(f.sample_rate), nfilter=int(f.n_mels), freq_low=float(f.f_min),
            freq_high=float(f.f_max), mel_formula=scale, normalize=norm == "slaney"))
    pipe.build()
    pipe.feed_input("x", [np.eye(int(f.n_fft) // 2 + 1, dtype=np.float32)])
    (out,) = pipe.run()
    return np.array(out[0])


def baseline_torchaudio(wave: torch.Tensor) -> torch.Tensor:
    """The DCASE 2024 baseline's front end as published: torchaudio defaults + ln(x + 1e-5)."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=32000, n_fft=4096, win_length=3072,
                                               hop_length=500, n_mels=256, f_min=0, f_max=None)
    return (mel(wave) + 1e-5).log()


def test_defaults_reproduce_todays_features_exactly():
    f = features(SMALL)
    assert (f.mel_scale, f.mel_norm, f.log) == ("slaney", "slaney", "db")
    x = torch.from_numpy(waves(16000))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=512, win_length=512, hop_length=400, f_min=50.0, f_max=8000.0,
        n_mels=64, window_fn=torch.hann_window, power=2.0, center=True, pad_mode="reflect",
        norm="slaney", mel_scale="slaney")
    before = (10.0 * torch.log10(torch.clamp(mel(x), min=10.0 ** (-100.0 / 10.0))))[..., :40]
    assert torch.equal(F.LogMel(f)(x)[:, 0], before)
    assert F.log_zero(f) == -100.0


def test_dcase2024_option_equals_torchaudio_baseline():
    f = features(DCASE24)
    x = torch.from_numpy(waves(32000))
    ours = F.LogMel(f)(x)
    ref = baseline_torchaudio(x)
    assert ours.shape == (3, 1, 256, 65) and ref.shape == (3, 256, 65)
    assert (ours[:, 0] - ref).abs().max() <= 1e-6  # measured 0 (the same computation)
    # scripted (as export embeds it) computes the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.11 deprecates jit; export uses it
        scripted = torch.jit.script(F.LogMel(f))
    assert torch.equal(scripted(x), ours)


@pytest.mark.parametrize("scale,norm", [("htk", "none"), ("htk", "slaney"), ("slaney", "none"),
                                        ("slaney", "slaney")])
def test_dali_filterbank_equals_torchaudio(scale, norm):
    # DCASE settings: f_min=0 puts the first htk triangle's lower edge on the DC bin
    f = features(DCASE24, f"features.mel_scale={scale}", f"features.mel_norm={norm}")
    ours = F.LogMel(f).mel.mel_scale.fb.T.numpy()  # [n_mels, n_freqs]
    dali = dali_filterbank(f)
    assert dali.shape == ours.shape == (256, 2049)
    assert np.array_equal(dali > 0, ours > 0)  # the same bins in every triangle (DC in none)
    # same triangles; weights differ by float32 rounding only (measured <= 3.5e-5 relative)
    assert np.abs(dali - ours).max() < 1e-4 * ours.max()


# (base settings, extra overrides): every mel_scale x mel_norm x log combination at the small
# settings, and the DCASE 2024 baseline's at its own.
COMBOS = [pytest.param(SMALL, [f"features.mel_scale={s}", f"features.mel_norm={n}", f"features.log={lg}"],
                       id=f"small-{s}-{n}-{lg}")
          for s in ("slaney", "htk") for n in ("slaney", "none") for lg in ("db", "ln")]
COMBOS.append(pytest.param(DCASE24, [], id="dcase24-htk-none-ln"))
COMBOS.append(pytest.param(DCASE24, ["features.log=db"], id="dcase24-htk-none-db"))
# PaSST's options on a DALI-made mel (its Kaldi mel: tests/test_passt.py): pre-emphasis (16,000
# samples -> 15,999 -> 40 frames), the symmetric window, the affine map after the log
COMBOS.append(pytest.param(SMALL, ["features.preemphasis=0.97", "features.window=symmetric",
                                   "features.log=ln", "features.log_offset=4.5",
                                   "features.log_divisor=5"], id="small-slaney-ln-passt-options"))
# Measured max |DALI - torch| (float32, CPU): db 1.2e-3..1.9e-3 dB, ln 5e-5..4.2e-4, both at bins
# 60-80 dB below a pure tone, where float32 FFT rounding dominates (each backend is as far from a
# float64 computation as from the other); within 40 dB of the peak <= 3.2e-4 dB.
TOL = {"db": 5e-3, "ln": 1e-3}


@pytest.mark.parametrize("base,extra", COMBOS)
def test_dali_graph_equals_torch_logmel(base, extra):
    f = features(base, *extra)
    x = waves(int(f.sample_rate))
    ours = F.LogMel(f)(torch.from_numpy(x)).numpy()
    dali = dali_logmel(x, f)
    assert dali.shape == ours.shape == (3, 1, int(f.n_mels), int(f.frames))
    assert np.abs(dali - ours).max() < TOL[f.log]


@pytest.mark.parametrize("log", ["db", "ln"])
def test_frames_past_the_clip_are_silence(log):
    # 70 frames asked, a 1 s clip at hop 500 gives 65: the last 5 are the log of zero power (the
    # config check refuses this; the modules still handle it)
    f = OmegaConf.create({**OmegaConf.to_container(features(DCASE24, f"features.log={log}")),
                          "frames": 70})
    zero = F.log_zero(f)
    assert zero == (f.floor_db if log == "db" else pytest.approx(np.log(1e-5), rel=1e-6))
    x = waves(32000, n=1)
    ours = F.LogMel(f)(torch.from_numpy(x))
    assert ours.shape == (1, 1, 256, 70) and torch.all(ours[..., 65:] == zero)
    silent = F.LogMel(f)(torch.zeros(1, 32000))
    assert torch.all(silent == zero)  # a silent clip reads as the same value throughout
    dali = dali_logmel(x, f)
    assert np.all(dali[..., 65:] == np.float32(zero))
    assert np.abs(dali - ours.numpy()).max() < TOL[log]


def test_settings_hash_and_bad_option():
    h = F.settings_hash(features(SMALL))
    for extra in ("features.mel_scale=htk", "features.mel_norm=none", "features.log=ln",
                  "features.log_eps=1e-6", "features.preemphasis=0.97", "features.window=symmetric",
                  "features.log_offset=4.5", "features.log_divisor=5"):
        assert F.settings_hash(features(SMALL, extra)) != h
    f_bad = OmegaConf.create({**OmegaConf.to_container(features(SMALL)), "mel_scale": "mel"})
    with pytest.raises(ValueError, match="features.mel_scale='mel'"):
        F.LogMel(f_bad)
