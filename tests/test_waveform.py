"""The waveform cache (data.cache=waveform) and the waveform augmentations: features equal to the
feature cache's bit for bit when nothing acts on the waveform (data.devices and the weighted last
batch included), exact resume with impulse responses + roll + band on, the draws per step, the
impulse responses against numpy's convolution, the random band's banks against torchaudio's,
the memory check and the refusals. (Two gloo ranks training and resuming through it:
tests/test_passt.py, the teacher recipe; three ranks building it: tests/test_data_dist.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_shards

from asc_dist import config, synth
from asc_dist import frontend as F
from asc_dist.augment import Augment
from asc_dist.data import build_source
from asc_dist.data.cache import CachedSource
from asc_dist.data.manifest import DataError
from asc_dist.data.waveform import WaveformSource
from asc_dist.errors import ConfigError
from asc_dist.wave_augment import ImpulseResponses, MelBand, fast_length, load_irs

TEACHER = "conf/experiment/passt_teacher.yaml"
SMALL = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
         "features.hop_length=400", "features.n_mels=64", "features.f_min=50",
         "features.f_max=8000", "features.clip_seconds=1.0", "features.frames=40"]
# PaSST's front end at the fixture's 16 kHz: hop 160 keeps 100 frames, f_max = 8000 - 1000 / 2
PASST16 = [TEACHER, "features.sample_rate=16000", "features.hop_length=160", "features.f_max=7500"]
QUIET = ["augment.dir.p=0", "augment.mel_band.fmax_range=0", "augment.roll_seconds=0"]


@pytest.fixture(scope="module")
def tau(tmp_path_factory) -> Path:
    """Shards of synthetic device scenes (devices a, b), 16 kHz mono, 20 training clips."""
    tmp = tmp_path_factory.mktemp("wavecache")
    data = synth.generate(tmp / "tau", clips_per_class=4, duration=1.0, sample_rate=16000,
                          channels=1, devices=["a", "b"], progress=False)
    return make_shards(tmp, dataset=data, shard_max_samples=6)


@pytest.fixture(scope="module")
def irs(tmp_path_factory) -> Path:
    """Made impulse responses: a delta at 16 kHz, a decaying stereo one at 8 kHz (in a
    subfolder)."""
    d = tmp_path_factory.mktemp("irs")
    delta = np.zeros(64)
    delta[0] = 1.0
    sf.write(d / "delta.wav", delta, 16000, subtype="FLOAT")
    rng = np.random.default_rng(0)
    decay = rng.standard_normal((200, 2)) * np.exp(-np.arange(200) / 30)[:, None] * 0.5
    (d / "more").mkdir()
    sf.write(d / "more" / "room.wav", decay, 8000, subtype="FLOAT")
    return d


def cfg_for(shards, *extra):
    return config.load([*extra, f"data.shards={shards}", "data.backend=torch",
                        "data.num_threads=1"], world_size=1)


def source(cfg, cache, batch=4, seed=0):
    return build_source(cfg, "train", train=True, rank=0, world_size=1, device=torch.device("cpu"),
                        batch_size=batch, seed=seed, cache=cache)


@pytest.mark.parametrize("front", ["small", "passt"])
def test_features_equal_the_feature_cache_bit_for_bit(tau, front):
    """Nothing on the waveform: every batch (keys, labels, weight, features) of two epochs is the
    feature cache's, with data.devices' subset and the weighted last batch of drop_last=false."""
    base = SMALL if front == "small" else [*PASST16, *QUIET]
    cfg = cfg_for(tau, *base, "data.devices=[b]", "train.drop_last=false")
    with source(cfg, "device") as c, source(cfg, "waveform") as w:
        assert isinstance(c, CachedSource) and isinstance(w, WaveformSource)
        assert w.steps_per_epoch == c.steps_per_epoch == 3 and w.remainder == 2  # 10 clips of b
        assert w.waves.shape == (10, 16000)  # only the subset is resident
        for epoch in (0, 1):
            for a, b in zip(c.epoch(epoch), w.epoch(epoch), strict=True):
                assert a.keys == b.keys and a.weight == b.weight
                assert torch.equal(a.labels, b.labels) and torch.equal(a.valid, b.valid)
                assert torch.equal(a.features, b.features)
    assert b.weight == 1.0 and len(b.keys) == 2  # the partial last batch: 2 clips


def test_resume_is_exact_with_impulse_responses_roll_and_band_on(tau, irs):
    cfg = cfg_for(tau, *PASST16, f"augment.dir.path={irs}", "augment.dir.p=1.0")
    with source(cfg, "waveform") as w:
        whole, draws = [], []
        for b in w.epoch(1):
            whole.append(b)
            draws.append(dict(w.last))
        tail = list(w.epoch(1, start_step=2))
        assert len(tail) == len(whole) - 2 == 3
        for a, b in zip(whole[2:], tail, strict=True):
            assert a.keys == b.keys and torch.equal(a.features, b.features)
        devices = {s.key: s.device for s in w.index.samples}
        for b, d in zip(whole, draws):
            # p = 1 on device a (the recipe's): exactly the clips of device a are convolved
            assert d["dir_applied"].tolist() == [devices[k] == "a" for k in b.keys]
            assert d["shifts"].abs().max() <= 5000  # 0.3125 s at 16 kHz
            assert 7001 <= float(d["f_max"]) <= 8000 and float(d["f_min"]) == 0
        assert len({float(d["f_max"]) for d in draws}) > 1  # a band per batch
        first = next(iter(w.epoch(0)))
    with source(cfg, "waveform", seed=1) as other:
        assert not torch.equal(next(iter(other.epoch(0))).features, first.features)
    quiet = cfg_for(tau, *PASST16, *QUIET)
    with source(quiet, "waveform") as q:  # the same clips, nothing drawn: other features
        plain = next(iter(q.epoch(0)))
        assert plain.keys == first.keys and not torch.equal(plain.features, first.features)
        assert q.last == {"shifts": None}


def test_a_delta_is_the_identity_and_a_known_response_is_numpys_convolution():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 1000)).astype(np.float32)
    delta = np.zeros(50, dtype=np.float32)
    delta[0] = 1
    h = (rng.standard_normal(300) * np.exp(-np.arange(300) / 40)).astype(np.float32)
    bank = ImpulseResponses([delta, h], 1000, p=1.0, device=torch.device("cpu"))
    assert bank.n_fft == fast_length(1000 + 300 - 1) == 1323  # 3^3 7^2
    xt = torch.from_numpy(x)
    assert torch.equal(bank.convolve(xt, torch.tensor([0, 0, 0])), xt)
    got = bank.convolve(xt, torch.tensor([1, 1, 1])).numpy()
    want = np.stack([np.convolve(r.astype(np.float64), h.astype(np.float64))[:1000] for r in x])
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()  # float32 rounding
    # apply: only eligible clips, and the draws come from the generator
    g = torch.Generator().manual_seed(0)
    out, applied, which = bank.apply(xt, torch.tensor([True, False, True]), g)
    assert applied.tolist() == [True, False, True] and torch.equal(out[1], xt[1])
    assert torch.allclose(out[0], bank.convolve(xt[:1], which[:1])[0])
    assert [fast_length(n) for n in (1, 7, 11, 1025)] == [1, 7, 12, 1029]


def test_impulse_responses_load_resampled_and_mono_and_bad_folders_are_refused(irs, tmp_path):
    names, loaded = load_irs(irs, 16000)
    assert names == ["delta.wav", "more/room.wav"]  # sorted, recursive
    assert len(loaded[0]) == 64 and loaded[0][0] == 1 and not loaded[0][1:].any()
    assert len(loaded[1]) == 400  # 200 samples at 8 kHz, resampled once to 16 kHz
    with pytest.raises(ConfigError, match=r"augment.dir.path=.*nope: no such folder"):
        load_irs(tmp_path / "nope", 16000)
    (tmp_path / "readme.txt").write_text("no responses here")
    with pytest.raises(ConfigError, match=rf"augment.dir.path={tmp_path}: no usable impulse "
                                          r"responses: the folder holds no .wav file"):
        load_irs(tmp_path, 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")
    with pytest.raises(ConfigError, match=r"cannot decode audio .*broken.wav"):
        load_irs(tmp_path, 16000)
    (tmp_path / "broken.wav").unlink()
    sf.write(tmp_path / "silent.wav", np.zeros(32), 16000)
    with pytest.raises(ConfigError, match=r"impulse response .*silent.wav is silent: not usable"):
        load_irs(tmp_path, 16000)


def test_random_band_banks_equal_torchaudios_and_the_draws_stay_in_range():
    from torchaudio.compliance import kaldi

    f = config.load([TEACHER], world_size=1).features
    for lo, hi in ((0.0, 15500.0), (0.0, 15001.0), (3.0, 16000.0), (0.0, 15733.0)):
        ref, _ = kaldi.get_mel_banks(128, 1024, 32000.0, lo, hi, 100.0, -500.0, 1.0)
        got = F.kaldi_mel_banks_between(f, torch.tensor(lo), torch.tensor(hi))
        assert torch.equal(got, torch.nn.functional.pad(ref, (0, 1)).T)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 32000)).astype(np.float32))
    logmel = F.LogMel(f)
    fixed = F.kaldi_mel_banks_between(f, torch.tensor(0.0), torch.tensor(15500.0))
    assert torch.equal(logmel(x, fixed), logmel(x))  # the evaluation band through either path
    band = MelBand(config.load([TEACHER], world_size=1).augment.mel_band, f)
    assert band.limits() == (0.0, 0.0, 15001.0, 16000.0)
    g = torch.Generator().manual_seed(0)
    highs = [float(band.draw(g, torch.device("cpu"))[1]) for _ in range(100)]
    assert min(highs) >= 15001 and max(highs) <= 16000 and len(set(highs)) > 90


def test_a_cache_that_does_not_fit_is_refused_first_with_the_numbers(tau, monkeypatch):
    from asc_dist.data import waveform

    monkeypatch.setattr(waveform, "free_memory", lambda device: (10_000, "free on cpu"))
    monkeypatch.setattr(waveform, "decode", lambda *a, **k: pytest.fail("decoded before the check"))
    cfg = cfg_for(tau, *SMALL)
    with pytest.raises(DataError) as e:
        source(cfg, "waveform")
    msg = str(e.value)
    assert "the 20 training clips need 0.00 GiB (20 x 16,000 samples x 4 B)" in msg
    assert "free on cpu is 0.00 GiB" in msg
    assert "data.cache=device" in msg and "data.devices" in msg


def test_waveform_augmentations_need_the_waveform_cache_and_the_recipes_use_it(irs):
    with pytest.raises(ConfigError, match=r"augment.dir.p=0.6 acts on the waveform.*it needs data."
                                          r"cache=waveform \(data.cache=auto feeds log-mels\)"):
        config.load(["augment.dir.p=0.6", "augment.dir.path=x"])
    with pytest.raises(ConfigError, match=r"augment.mel_band \(1, 1000\) acts on the waveform"):
        config.load([TEACHER, "data.cache=device", "augment.dir.p=0"])
    with pytest.raises(ConfigError, match=r"augment.dir.p=0.6 and augment.mel_band \(1, 1000\) act"
                                          r" on the waveform, before the front end: they need"):
        config.load([TEACHER, "data.cache=none"])
    with pytest.raises(ConfigError, match=r"augment.dir.p=0.6 needs augment.dir.path"):
        config.load(["data.cache=waveform", "augment.dir.p=0.6"])
    with pytest.raises(ConfigError, match=r"needs features.mel_scale=kaldi"):
        config.load(["data.cache=waveform", "augment.mel_band.fmax_range=100"])
    with pytest.raises(ConfigError, match=r"f_max reaches 8250.0 Hz, above Nyquist"):
        config.load([TEACHER, "features.sample_rate=16000", "features.hop_length=160",
                     "features.f_max=7750"])
    # the frames roll is off where the waveform cache rolls samples
    t = config.load([TEACHER])
    assert Augment.from_config(t).max_shift == 0
    assert Augment.from_config(config.load([TEACHER, *QUIET[:2], "data.cache=device"])
                               ).max_shift == round(0.3125 * 32000 / 320)
    # CP-JKU's teacher (run_passt_training.py, datasets/dcase23.py), option by option
    a, o = t.augment, t.optim
    assert (t.data.cache, a.dir.p, list(a.dir.devices), a.dir.path) == (
        "waveform", 0.6, ["a"], "downloads/micirp")
    assert round(a.roll_seconds * t.features.sample_rate) == 10_000
    assert (a.mel_band.fmin_range, a.mel_band.fmax_range, t.features.f_max) == (1, 1000, 15500)
    assert (a.freq_mask.width, a.time_mask.width, a.mask_at) == (48, 20, "log_mel")
    assert (a.mixstyle.p, a.mixstyle.alpha, t.model.passt.s_patchout_f) == (0.4, 0.4, 6)
    assert (o.name, o.lr, o.weight_decay, o.schedule) == ("adam", 1e-5, 1e-3,
                                                          "exp_warmup_linear_down")
    assert (o.ramp.warmup, o.ramp.rampdown_start, o.ramp.rampdown, o.ramp.last_value) == (
        3, 3, 10, 0.01)
    assert (t.train.epochs, t.train.global_batch, t.train.drop_last) == (25, 80, False)
    base = config.load(["conf/data/tau2022.yaml", "conf/experiment/dcase2024_baseline.yaml"])
    assert base.data.cache == "waveform" and round(base.augment.roll_seconds * 32000) == 3200
    assert math.isclose(Augment.from_config(base).max_shift, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_waveform_steps_never_wait_for_the_gpu_and_equal_the_cpu(tau, irs):
    """On CUDA: after a warm-up step, three steps with impulse responses, roll and band run under
    torch.cuda.set_sync_debug_mode('error') (any host synchronisation raises); with nothing on
    the waveform the features are the CPU's within cuFFT's rounding."""
    dev = torch.device("cuda", 0)

    def on(device, cfg):
        return build_source(cfg, "train", train=True, rank=0, world_size=1, device=device,
                            batch_size=4, seed=0, cache="waveform")

    with on(dev, cfg_for(tau, *PASST16, f"augment.dir.path={irs}")) as w:
        it = w.epoch(0)
        next(it)  # the epoch's plan copy and cuFFT's plans
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batches = [next(it) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(b.features.is_cuda and torch.isfinite(b.features).all() for b in batches)
    quiet = cfg_for(tau, *PASST16, *QUIET)
    with on(dev, quiet) as g, on(torch.device("cpu"), quiet) as c:
        for a, b in zip(g.epoch(0), c.epoch(0), strict=True):
            assert a.keys == b.keys and (a.features.cpu() - b.features).abs().max() <= 1e-3
