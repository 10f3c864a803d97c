"""The synthetic scene classes: their acoustic signatures and the rendering of one clip.

Each scene class has its own signature, built from things a log-mel CNN can see: a coloured
background spectrum (slope + resonances), tonal components (engine hum, motor whine, music),
impulsive events (footsteps, rail clacks, bird chirps) and slow amplitude modulation (passing
traffic, wind). Every recording location draws its own jittered copy of those parameters, every
city colours its recordings with its own "microphone/channel" EQ, and every clip gets its own
level, event timing and noise (asc_dist.synth lays the clips out as a TUT 2018 dataset).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from asc_dist.audio import fft_length

SCENES = (
    "airport", "bus", "metro", "metro_station", "park",
    "public_square", "shopping_mall", "street_pedestrian", "street_traffic", "tram",
)
# The six cities of the TUT 2018 development set.
CITIES = ("barcelona", "helsinki", "london", "paris", "stockholm", "vienna")

@dataclass(frozen=True)
class SceneSpec:
    """Class signature. Frequencies in Hz; all features sit below 7.5 kHz so they survive 16 kHz."""

    slope_db_oct: float  # background spectral tilt
    peaks: tuple[tuple[float, float, float], ...]  # (centre Hz, width octaves, gain dB)
    tones: tuple[tuple[float, float], ...]  # (Hz, level dB re background)
    tone_drift: float  # relative frequency wander of the tones (vibrato/sweep depth)
    event_rate: float  # events per second
    event_hz: float  # event centre frequency
    event_oct: float  # event bandwidth in octaves (0 = tonal chirp)
    event_ms: float  # event decay time constant
    event_db: float  # event peak level re background RMS
    am_hz: float  # amplitude modulation rate
    am_depth: float  # 0..1


SPECS: dict[str, SceneSpec] = {
    "airport": SceneSpec(-3.0, ((300, 1.5, 8), (2500, 1.0, 4)), ((1047, -16), (1319, -18)), 0.002,
                         2.0, 2200, 1.0, 25, 6, 0.3, 0.2),
    "bus": SceneSpec(-6.0, ((120, 1.0, 12),), ((90, -4), (180, -8), (270, -12)), 0.03,
                     0.5, 600, 1.5, 40, 4, 0.5, 0.35),
    "metro": SceneSpec(-4.0, ((600, 1.0, 9),), ((1200, -8), (2400, -14)), 0.12,
                       1.5, 400, 1.0, 60, 10, 0.2, 0.5),
    "metro_station": SceneSpec(-2.0, ((1000, 2.0, 6),), ((2500, -14),), 0.0,
                               0.8, 1000, 1.5, 300, 10, 0.07, 0.3),
    "park": SceneSpec(-1.0, ((250, 2.0, 3),), (), 0.0,
                      4.0, 4200, 0.0, 20, 12, 0.1, 0.6),
    "public_square": SceneSpec(-2.5, ((500, 1.0, 9),), ((200, -20),), 0.05,
                               2.0, 1500, 1.0, 80, 6, 1.0, 0.15),
    "shopping_mall": SceneSpec(-3.0, ((250, 1.0, 6), (800, 1.0, 6)), ((440, -8), (554, -10), (659, -10)), 0.004,
                               1.0, 3000, 1.0, 150, 3, 0.0, 0.0),
    "street_pedestrian": SceneSpec(-2.0, ((400, 1.5, 6),), (), 0.0,
                                   2.5, 3000, 1.5, 15, 14, 0.4, 0.15),
    "street_traffic": SceneSpec(-5.0, ((160, 1.5, 10),), ((420, -22),), 0.1,
                                0.3, 800, 0.0, 400, 4, 0.12, 0.7),
    "tram": SceneSpec(-4.0, ((250, 1.0, 6),), ((700, -6), (1400, -10)), 0.06,
                      1.0, 300, 1.0, 50, 10, 0.25, 0.3),
}


def seeded(seed: int, *path: int) -> np.random.Generator:
    # One independent stream per (seed, what, ...) so adding a clip never shifts another's noise.
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def _band_gain_db(freqs: np.ndarray, centre: float, width_oct: float, gain_db: float) -> np.ndarray:
    """Gaussian bump on a log-frequency axis."""
    with np.errstate(divide="ignore"):
        octs = np.log2(np.maximum(freqs, 1.0) / centre)
    return gain_db * np.exp(-0.5 * (octs / (width_oct / 2.0)) ** 2)


def _shaped_noise(rng: np.random.Generator, shape_db: np.ndarray, n: int, channels: int) -> np.ndarray:
    """Gaussian noise coloured by a magnitude response in dB (rfft bins); unit RMS per channel."""
    spec = rng.standard_normal((channels, len(shape_db))) + 1j * rng.standard_normal((channels, len(shape_db)))
    spec *= 10.0 ** (shape_db / 20.0)
    x = np.fft.irfft(spec, n=n, axis=-1)
    return x / (np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) + 1e-12)


def jitter_location(spec: SceneSpec, rng: np.random.Generator) -> dict:
    """Per-location parameter draw: the within-class variation a model has to generalise over."""
    f = lambda: float(np.exp(rng.normal(0.0, 0.08)))
    return {
        "slope": spec.slope_db_oct + rng.normal(0.0, 0.6),
        "peaks": [(c * f(), w * f(), g + rng.normal(0.0, 2.0)) for c, w, g in spec.peaks],
        "tones": [(hz * f(), db + rng.normal(0.0, 3.0)) for hz, db in spec.tones],
        "tone_drift": spec.tone_drift,
        "event_rate": spec.event_rate * float(np.exp(rng.normal(0.0, 0.3))),
        "event_hz": spec.event_hz * f(),
        "event_oct": spec.event_oct,
        "event_ms": spec.event_ms * float(np.exp(rng.normal(0.0, 0.2))),
        "event_db": spec.event_db + rng.normal(0.0, 2.0),
        "am_hz": spec.am_hz * float(np.exp(rng.normal(0.0, 0.2))),
        "am_depth": float(np.clip(spec.am_depth + rng.normal(0.0, 0.05), 0.0, 0.9)),
        "level_db": rng.normal(-26.0, 3.0),  # dBFS RMS of this location's recordings
        "snr_db": rng.uniform(25.0, 40.0),  # sensor noise floor below the scene
        "width": rng.uniform(0.5, 0.9),  # inter-channel correlation of the background
    }


def _city_eq_db(seed: int, city_idx: int, freqs: np.ndarray) -> np.ndarray:
    """Smooth per-city channel colouring (microphone + room), a few dB over log frequency."""
    rng = seeded(seed, 1, city_idx)
    lf = np.log2(np.maximum(freqs, 20.0) / 20.0) / 10.0  # 0..~1 over 20 Hz..20 kHz
    eq = np.zeros_like(freqs)
    for k in range(1, 4):
        eq += rng.normal(0.0, 1.5) * np.cos(math.pi * k * lf + rng.uniform(0, 2 * math.pi))
    return eq + rng.normal(0.0, 1.0) * (lf - 0.5) * 4.0  # plus a tilt


def location_shape_db(p: dict, eq_db: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Background magnitude response (dB per rfft bin): tilt + resonances + city EQ, HP at 20 Hz."""
    shape = p["slope"] * np.log2(np.maximum(freqs, 20.0) / 1000.0)
    for c, w, g in p["peaks"]:
        shape += _band_gain_db(freqs, c, w, g)
    shape += eq_db
    shape[freqs < 20.0] = -120.0
    return shape


def render_clip(
    p: dict, shape_db: np.ndarray, eq_db: np.ndarray, rng: np.random.Generator, n: int, sr: int,
    channels: int,
) -> np.ndarray:
    """One clip [channels, n] in float64, peak <= 0.99."""
    # Background: partially correlated channels, mixed in the frequency domain (one irfft).
    nb = len(shape_db)
    white = rng.standard_normal((channels + 1, 2, nb))
    spec = white[:, 0] + 1j * white[:, 1]
    spec = p["width"] * spec[:1] + math.sqrt(1 - p["width"] ** 2) * spec[1:]
    spec *= 10.0 ** (shape_db / 20.0)
    bg = np.fft.irfft(spec, n=n, axis=-1)
    bg /= np.sqrt(np.mean(bg**2)) + 1e-12

    t = np.arange(n) / sr
    if p["am_depth"] > 0 and p["am_hz"] > 0:
        bg *= 1.0 + p["am_depth"] * np.sin(2 * math.pi * p["am_hz"] * t + rng.uniform(0, 2 * math.pi))
    x = bg

    # Tones with a slow random frequency wander; partials share the wander (one source).
    if p["tones"]:
        wander = np.sin(2 * math.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * math.pi))
        wander *= p["tone_drift"] * rng.uniform(0.5, 1.0)
        hz = np.array([h for h, _ in p["tones"]])
        keep = hz < sr / 2 * 0.9  # drop partials near/above Nyquist
        eq_gain = 10 ** (eq_db[np.clip((hz * n / sr).astype(int), 0, len(eq_db) - 1)] / 20)
        amp = np.array([10 ** (db / 20) * math.sqrt(2) for _, db in p["tones"]]) * eq_gain * keep
        base_phase = 2 * math.pi * np.cumsum(1.0 + wander) / sr
        phases = hz[:, None] * base_phase[None, :] + rng.uniform(0, 2 * math.pi, (len(hz), 1))
        x = x + (amp[:, None] * np.sin(phases)).sum(axis=0)[None, :]

    # Impulsive events: a Poisson impulse train convolved with one decaying kernel (FFT).
    n_events = rng.poisson(p["event_rate"] * n / sr)
    if n_events:
        train = np.zeros(n)
        pos = rng.integers(0, n, n_events)
        np.add.at(train, pos, 10 ** (rng.normal(0.0, 3.0, n_events) / 20))
        klen = min(n, int(sr * p["event_ms"] / 1000 * 6) + 1)
        kt = np.arange(klen) / sr
        env = np.exp(-kt / (p["event_ms"] / 1000))
        ehz = min(p["event_hz"], sr / 2 * 0.8)
        if p["event_oct"] > 0:
            kf = np.fft.rfftfreq(klen, 1.0 / sr)
            kshape = _band_gain_db(kf, ehz, p["event_oct"], 40.0) - 40.0
            kernel = _shaped_noise(rng, kshape, klen, 1)[0] * env
        else:  # tonal chirp: a short downward glide
            glide = ehz * (1.0 + 0.15 * env)
            kernel = np.sin(2 * math.pi * np.cumsum(glide) / sr) * env * math.sqrt(2)
        nfft = fft_length(n + klen, (3, 5))
        ev = np.fft.irfft(np.fft.rfft(train, nfft) * np.fft.rfft(kernel, nfft), nfft)[:n]
        pan = rng.uniform(0.6, 1.0, (channels, 1))
        x = x + (10 ** (p["event_db"] / 20)) * pan * ev[None, :]

    x /= np.sqrt(np.mean(x**2)) + 1e-12
    x += 10 ** (-p["snr_db"] / 20) * rng.standard_normal(x.shape)
    x *= 10 ** ((p["level_db"] + rng.normal(0.0, 1.5)) / 20)
    peak = np.abs(x).max()
    if peak > 0.99:
        x *= 0.99 / peak
    return x


# The reference device records flat; TAU's real device "a" (a Soundman OKM II binaural
# microphone) is the one the others are compared with.
REFERENCE_DEVICE = "a"


@lru_cache(maxsize=32)
def device_response_db(device: str, n: int, sr: int) -> np.ndarray:
    """A simulated recording device's fixed magnitude response (dB per rfft bin of an ``n``-sample
    clip): a smooth colouring of a few dB, a low cut (12 dB/octave) and a high cut (24 dB/octave)
    at frequencies of its own, all drawn from its name alone. The reference device is flat."""
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    if device == REFERENCE_DEVICE:
        return np.zeros_like(freqs)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "little"))
    lf = np.log2(np.maximum(freqs, 20.0) / 20.0) / 10.0
    eq = np.zeros_like(freqs)
    for k in range(1, 5):
        eq += rng.normal(0.0, 2.5) * np.cos(math.pi * k * lf + rng.uniform(0, 2 * math.pi))
    low, high = rng.uniform(100.0, 500.0), min(rng.uniform(3000.0, 7000.0), 0.45 * sr)
    f = np.maximum(freqs, 1.0)
    eq -= 12.0 * np.log2(np.maximum(low / f, 1.0))
    eq -= 24.0 * np.log2(np.maximum(f / high, 1.0))
    return eq


def record(x: np.ndarray, device: str, sr: int) -> np.ndarray:
    """``x [channels, n]`` as ``device`` records it (:func:`device_response_db`), peak <= 0.99."""
    if device == REFERENCE_DEVICE:
        return x
    gain = 10.0 ** (device_response_db(device, x.shape[-1], sr) / 20.0)
    y = np.fft.irfft(np.fft.rfft(x, axis=-1) * gain, n=x.shape[-1], axis=-1)
    y *= np.sqrt(np.mean(x**2) / (np.mean(y**2) + 1e-20))  # the same loudness, another colour
    peak = np.abs(y).max()
    return y * (0.99 / peak) if peak > 0.99 else y


@lru_cache(maxsize=8)
def city_eqs(seed: int, n: int, sr: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    return freqs, {c: _city_eq_db(seed, i, freqs) for i, c in enumerate(CITIES)}
