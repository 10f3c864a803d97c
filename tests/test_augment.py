import math

import pytest
import torch
import torchaudio

from asc_dist.augment import Augment, mixstyle_apply, mixstyle_stats
from asc_dist.config import AugmentConfig, FeaturesConfig, MaskConfig, MixStyleConfig, load

B, F_, T = 8, 16, 40


def _x(b=B, f=F_, t=T, seed=0, offset=5.0):
    # Away from every fill value (0, -100, ln 1e-5), so a changed entry is always visible.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, f, t, generator=g) + offset


def _aug(roll=0.0, freq=(0, 0), time=(0, 0), mask_at="log_mel", p=0.0, alpha=0.3, eps=1e-6,
         **features):
    a = AugmentConfig(mixstyle=MixStyleConfig(p=p, alpha=alpha, eps=eps),
                      freq_mask=MaskConfig(*freq), time_mask=MaskConfig(*time),
                      mask_at=mask_at, roll_seconds=roll)
    return Augment(a, FeaturesConfig(**features))


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --- everything off -------------------------------------------------------------------------

@pytest.mark.parametrize("aug", [
    _aug(),
    _aug(freq=(2, 0), time=(0, 8)),  # count without width / width without count
    _aug(roll=0.01),  # rounds to 0 frames at 48 kHz / hop 1500
])
def test_off_returns_input_and_draws_nothing(aug):
    assert not aug.enabled
    x, g = _x(), _g(1)
    state = g.get_state()
    assert aug.before_standardize(x, g) is x
    assert aug.after_standardize(x, g) is x
    assert torch.equal(g.get_state(), state)


def test_from_config_and_enabled():
    cfg = load(["augment.roll_seconds=0.1", "augment.freq_mask.count=1",
                "augment.freq_mask.width=8", "augment.mixstyle.p=0.4"])
    aug = Augment.from_config(cfg)
    assert aug.enabled and aug.max_shift == round(0.1 * 48000 / 1500) == 3
    assert aug.fill == -100.0 and aug.mix_p == 0.4
    assert not Augment.from_config(load([])).enabled
    with pytest.raises(ValueError, match="mask_at"):
        _aug(mask_at="wave")
    with pytest.raises(ValueError, match="mixstyle.p"):
        _aug(p=1.5)


def test_only_the_enabled_augmentation_draws():
    # Roll alone draws exactly B integers; masks at "input" draw nothing before standardising.
    aug = _aug(roll=0.1, freq=(1, 4), mask_at="input")
    g, ref = _g(3), _g(3)
    aug.before_standardize(_x(), g)
    torch.randint(-3, 4, (B,), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# --- time roll ------------------------------------------------------------------------------

def test_time_roll_is_per_clip_circular_roll():
    aug = _aug(roll=0.5)  # S = round(0.5 * 48000 / 1500) = 16 frames
    assert aug.max_shift == 16
    x = _x()
    out = aug.before_standardize(x, _g(5))
    shifts = torch.randint(-16, 17, (B,), generator=_g(5))  # the same draw, redone
    assert torch.equal(aug.last_shifts, shifts)
    for i in range(B):
        assert torch.equal(out[i], torch.roll(x[i], int(shifts[i]), dims=-1))
    assert len(set(shifts.tolist())) > 1  # per-clip shifts
    # Over many draws the shifts cover [-S, S] and nothing outside it.
    seen = []
    for s in range(40):
        aug.before_standardize(x, _g(s))
        seen.append(aug.last_shifts)
    seen = torch.cat(seen)
    assert seen.min() == -16 and seen.max() == 16


def test_roll_frames_follow_sample_rate_and_hop():
    assert _aug(roll=0.1, sample_rate=32000, hop_length=320).max_shift == 10  # DCASE 2024
    assert _aug(roll=0.1, sample_rate=48000, hop_length=1500).max_shift == 3


# --- masks vs torchaudio --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize("axis", ["freq", "time"])
def test_one_mask_equals_torchaudio(seed, axis):
    width = 6
    x = _x()
    if axis == "freq":
        aug, ta = _aug(freq=(1, width)), torchaudio.transforms.FrequencyMasking(width, iid_masks=True)
    else:
        aug, ta = _aug(time=(1, width)), torchaudio.transforms.TimeMasking(width, iid_masks=True)
    torch.manual_seed(seed)
    expected = ta(x, 0.0)
    assert torch.equal(aug.before_standardize(x, _g(seed)), expected)
    assert not torch.equal(expected, x)


@pytest.mark.parametrize("seed", [0, 4])
def test_several_masks_equal_torchaudio_in_sequence(seed):
    # Draw order: all frequency masks (value then start for each), then all time masks.
    x = _x()
    aug = _aug(freq=(2, 5), time=(3, 9), mask_at="mel_power", log="ln", log_eps=1e-5)
    fill = math.log(1e-5)
    fm = torchaudio.transforms.FrequencyMasking(5, iid_masks=True)
    tm = torchaudio.transforms.TimeMasking(9, iid_masks=True)
    torch.manual_seed(seed)
    expected = x
    for m in (fm, fm, tm, tm, tm):
        expected = m(expected, fill)
    assert torch.equal(aug.before_standardize(x, _g(seed)), expected)


# --- mask properties ------------------------------------------------------------------------

@pytest.mark.parametrize("mask_at,log,fill", [
    ("mel_power", "db", -80.0),  # floor_db
    ("mel_power", "ln", math.log(1e-3)),  # ln(log_eps)
    ("log_mel", "db", 0.0),
    ("input", "ln", 0.0),
])
def test_mask_bands_and_fill(mask_at, log, fill):
    fw, tw = 6, 10
    aug = _aug(freq=(1, fw), time=(1, tw), mask_at=mask_at, log=log, floor_db=-80.0,
               log_eps=1e-3)
    assert aug.fill == pytest.approx(fill)
    x = _x(b=32)
    if mask_at == "input":
        assert aug.before_standardize(x, _g(0)) is x
        out = aug.after_standardize(x, _g(0))
    else:
        assert aug.after_standardize(x, _g(0)) is x
        out = aug.before_standardize(x, _g(0))
    changed = out != x
    # Only masked entries changed, and they hold the fill value.
    assert torch.equal(out[changed], torch.full_like(out[changed], fill))
    assert torch.equal(out[~changed], x[~changed])
    widths = {"freq": [], "time": []}
    for i in range(32):
        c = changed[i, 0]
        # A band never spans a whole axis (width < F and T), so fully masked bins are the
        # frequency band and fully masked frames the time band.
        rows, cols = c.all(dim=1), c.all(dim=0)
        # Every changed entry lies in a masked bin or a masked frame.
        assert torch.equal(c, rows[:, None] | cols[None, :])
        for axis, band, w in (("freq", rows, fw), ("time", cols, tw)):
            idx = band.nonzero().flatten()
            if idx.numel():
                assert idx.max() - idx.min() + 1 == idx.numel()  # one contiguous band
            assert idx.numel() < w  # at most width - 1
            widths[axis].append(idx.numel())
    assert max(widths["freq"]) > 0 and max(widths["time"]) > 0


def test_band_widths_over_many_draws():
    # torchaudio's band is [int(start), int(start) + int(value)), value ~ U[0, width): every
    # width 0 .. width-1 occurs, never width.
    width = 4
    x = _x(b=64, f=32)
    out = _aug(freq=(1, width)).before_standardize(x, _g(0))
    n = (out != x).all(dim=-1)[:, 0].sum(dim=1)
    assert set(n.tolist()) == set(range(width))


# --- Frequency-MixStyle ---------------------------------------------------------------------

def test_mixstyle_matches_definition():
    eps = 1e-2  # large enough for the var/(var+eps) factor to be seen
    aug = _aug(p=1.0, alpha=0.3, eps=eps)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, 1, F_, T, generator=g, dtype=torch.float64) * torch.rand(
        B, 1, F_, 1, generator=g, dtype=torch.float64) * 3 + torch.randn(
        B, 1, F_, 1, generator=g, dtype=torch.float64)
    out = aug.after_standardize(x, _g(2))
    assert aug.last_mixed
    lam = aug.last_lam.view(-1, 1, 1, 1)
    perm = aug.last_perm
    assert sorted(perm.tolist()) == list(range(B)) and lam.shape[0] == B
    mu = x.mean(dim=(1, 3), keepdim=True)
    var = x.var(dim=(1, 3), keepdim=True)
    sig = (var + eps).sqrt()
    mu_mix = mu * lam + mu[perm] * (1 - lam)
    sig_mix = sig * lam + sig[perm] * (1 - lam)
    torch.testing.assert_close(out.mean(dim=(1, 3), keepdim=True), mu_mix)
    torch.testing.assert_close(out.var(dim=(1, 3), keepdim=True), sig_mix ** 2 * var / (var + eps))
    torch.testing.assert_close(out, (x - mu) / sig * sig_mix + mu_mix)
    # Same numbers in float32 (the training dtype), to float tolerance.
    out32 = _aug(p=1.0, alpha=0.3, eps=eps).after_standardize(x.float(), _g(2))
    torch.testing.assert_close(out32, out.float(), atol=1e-5, rtol=1e-5)


def test_mixstyle_p0_never_mixes_and_p1_always_does():
    x = _x()
    off = _aug(p=0.0)
    g = _g(0)
    state = g.get_state()
    assert off.after_standardize(x, g) is x and torch.equal(g.get_state(), state)
    on = _aug(p=1.0)
    for s in range(30):
        out = on.after_standardize(x, _g(s))
        assert on.last_mixed and not torch.equal(out, x)


def test_mixstyle_fraction_of_mixed_batches_is_p():
    p, n = 0.3, 600
    aug = _aug(p=p)
    x = _x(b=2, f=2, t=4)
    mixed = 0
    for s in range(n):
        out = aug.after_standardize(x, _g(s))
        mixed += bool(aug.last_mixed)
        expected = mixstyle_apply(x, aug.last_lam, aug.last_perm, 1e-6) if aug.last_mixed else x
        assert torch.equal(out, expected)
    assert abs(mixed / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_mixstyle_gradients_skip_the_statistics():
    eps = 1e-3
    aug = _aug(p=1.0, eps=eps)
    x = _x(seed=3).requires_grad_(True)
    w = torch.randn(x.shape, generator=_g(4))
    out = aug.after_standardize(x, _g(1))
    (out * w).sum().backward()
    # Statistics detached: out = (x - mu) / sig * sig_mix + mu_mix is elementwise linear in x.
    _, sig = mixstyle_stats(x.detach(), eps)
    lam = aug.last_lam.float().view(-1, 1, 1, 1)
    sig_mix = sig * lam + sig[aug.last_perm] * (1 - lam)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, w * sig_mix / sig)


# --- composition and determinism ------------------------------------------------------------

def test_order_roll_then_masks_then_mixstyle():
    # The combined augment equals its parts applied in order with one generator.
    x = _x()
    full = _aug(roll=0.3, freq=(2, 5), time=(1, 8), mask_at="input", p=1.0)
    g = _g(11)
    out = full.after_standardize(full.before_standardize(x, g), g)
    g = _g(11)
    y = _aug(roll=0.3).before_standardize(x, g)
    y = _aug(freq=(2, 5), time=(1, 8), mask_at="input").after_standardize(y, g)
    y = _aug(p=1.0).after_standardize(y, g)
    assert torch.equal(out, y)


def test_same_generator_state_same_output_and_seeds_differ():
    x = _x()
    aug = _aug(roll=0.3, freq=(2, 5), time=(2, 8), mask_at="log_mel", p=0.5)

    def step(seed):
        g = _g(seed)
        return aug.after_standardize(aug.before_standardize(x, g), g)

    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    a, b, c = step(7), step(7), step(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not used
    # Resuming from a saved generator state redraws the same step.
    g = _g(21)
    aug.before_standardize(x, g)
    saved = g.get_state()
    first = aug.after_standardize(aug.before_standardize(x, g), g)
    g2 = torch.Generator()
    g2.set_state(saved)
    assert torch.equal(aug.after_standardize(aug.before_standardize(x, g2), g2), first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_cpu_and_cuda_generators():
    x = _x()
    aug = _aug(roll=0.3, freq=(2, 5), time=(2, 8), mask_at="mel_power", p=1.0)
    # A CPU generator: the same draws as on CPU, applied on the GPU.
    g = _g(3)
    cuda = aug.after_standardize(aug.before_standardize(x.cuda(), g), g)
    g = _g(3)
    cpu = aug.after_standardize(aug.before_standardize(x, g), g)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)
    # A CUDA generator: deterministic for the same state, different for another seed.

    def on_cuda(seed):
        gc = torch.Generator(device="cuda").manual_seed(seed)
        return aug.after_standardize(aug.before_standardize(x.cuda(), gc), gc)

    a, b, c = on_cuda(5), on_cuda(5), on_cuda(6)
    assert a.device.type == "cuda" and torch.equal(a, b) and not torch.equal(a, c)
    # Masks alone with a CUDA generator: only fill values or unchanged entries.
    m = _aug(freq=(1, 5), time=(1, 8), mask_at="mel_power")
    gc = torch.Generator(device="cuda").manual_seed(0)
    out = m.before_standardize(x.cuda(), gc)
    changed = out != x.cuda()
    assert changed.any() and (out[changed] == -100.0).all()
