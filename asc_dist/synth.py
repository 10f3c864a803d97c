"""Synthetic acoustic scenes in the exact TUT Urban Acoustic Scenes 2018 development layout.

``python -m asc_dist.synth OUT_DIR`` writes::

    OUT_DIR/audio/<scene>-<city>-<location>-<segment>-a.wav   (48 kHz, 24-bit, stereo by default)
    OUT_DIR/meta.csv                                           (tab-separated, with header)
    OUT_DIR/evaluation_setup/fold1_train.txt                   (file TAB label)
    OUT_DIR/evaluation_setup/fold1_test.txt                    (file)
    OUT_DIR/evaluation_setup/fold1_evaluate.txt                (file TAB label)

Each scene class has its own acoustic signature, built from things a log-mel CNN can see:
a coloured background spectrum (slope + resonances), tonal components (engine hum, motor
whine, music), impulsive events (footsteps, rail clacks, bird chirps) and slow amplitude
modulation (passing traffic, wind). Every recording location draws its own jittered copy of
those parameters, every city colours its recordings with its own "microphone/channel" EQ, and
every clip gets its own level, event timing and noise. Test locations never occur in
training, so a model must learn the class signature rather than memorise locations: chance is
10 %, a small CNN gets well above 80 % on held-out locations.

Deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from asc_dist import atomic
from asc_dist.audio import tune_malloc
from asc_dist.cli import command
from asc_dist.errors import UserError

SCENES = (
    "airport", "bus", "metro", "metro_station", "park",
    "public_square", "shopping_mall", "street_pedestrian", "street_traffic", "tram",
)
# The six cities of the TUT 2018 development set.
CITIES = ("barcelona", "helsinki", "london", "paris", "stockholm", "vienna")
DEVICE = "a"
META_HEADER = "filename\tscene_label\tidentifier\tsource_label"


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


def _rng(seed: int, *path: int) -> np.random.Generator:
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


def _jitter_location(spec: SceneSpec, rng: np.random.Generator) -> dict:
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
    rng = _rng(seed, 1, city_idx)
    lf = np.log2(np.maximum(freqs, 20.0) / 20.0) / 10.0  # 0..~1 over 20 Hz..20 kHz
    eq = np.zeros_like(freqs)
    for k in range(1, 4):
        eq += rng.normal(0.0, 1.5) * np.cos(math.pi * k * lf + rng.uniform(0, 2 * math.pi))
    return eq + rng.normal(0.0, 1.0) * (lf - 0.5) * 4.0  # plus a tilt


def _location_shape_db(p: dict, eq_db: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Background magnitude response (dB per rfft bin): tilt + resonances + city EQ, HP at 20 Hz."""
    shape = p["slope"] * np.log2(np.maximum(freqs, 20.0) / 1000.0)
    for c, w, g in p["peaks"]:
        shape += _band_gain_db(freqs, c, w, g)
    shape += eq_db
    shape[freqs < 20.0] = -120.0
    return shape


def _render_clip(
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
        nfft = _fast_len(n + klen)
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


def _fast_len(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n (fast FFT sizes)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _plan(clips_per_class: int, seed: int, segments_per_location: int, test_fraction: float):
    """Assign every clip a city, location id, segment id and fold-1 split.

    Location ids count up per city across scenes (so ``city-loc`` identifies one place) and
    segment ids count up globally, like the real file names.
    """
    rng = _rng(seed, 0)
    city_next_loc = {c: 0 for c in CITIES}
    segment = 0
    clips = []
    for ci, scene in enumerate(SCENES):
        n_loc = max(2, math.ceil(clips_per_class / segments_per_location))
        n_loc = min(n_loc, max(2, clips_per_class))
        n_test = min(n_loc - 1, max(1, round(n_loc * test_fraction)))
        test_locs = set(rng.permutation(n_loc)[:n_test].tolist())
        city_order = rng.permutation(len(CITIES))
        # Spread clips over locations as evenly as possible.
        per_loc = [clips_per_class // n_loc + (i < clips_per_class % n_loc) for i in range(n_loc)]
        for li in range(n_loc):
            city = CITIES[city_order[li % len(CITIES)]]
            loc_id = city_next_loc[city]
            city_next_loc[city] += 1
            for _ in range(per_loc[li]):
                clips.append({
                    "scene": scene, "class_idx": ci, "city": city, "loc_id": loc_id,
                    "loc_index": li, "segment": segment, "test": li in test_locs,
                })
                segment += 1
    return clips


@lru_cache(maxsize=8)
def _city_eqs(seed: int, n: int, sr: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    return freqs, {c: _city_eq_db(seed, i, freqs) for i, c in enumerate(CITIES)}


def _make_clip(task: tuple) -> None:
    """Worker: render one clip and write it. Depends only on its task, so any worker count
    gives the same bytes."""
    path, params, city, segment, seed, n, sr, channels, subtype = task
    freqs, eqs = _city_eqs(seed, n, sr)
    shape = _location_shape_db(params, eqs[city], freqs)
    x = _render_clip(params, shape, eqs[city], _rng(seed, 3, segment), n, sr, channels)
    sf.write(path, x.T.astype(np.float32), sr, subtype=subtype, format="WAV")


def generate(
    out_dir: str | Path,
    clips_per_class: int = 40,
    duration: float = 10.0,
    sample_rate: int = 48000,
    seed: int = 0,
    channels: int = 2,
    subtype: str = "PCM_24",
    segments_per_location: int = 4,
    test_fraction: float = 0.3,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic TUT-2018-layout dataset to ``out_dir`` and return its path.

    The dataset is built in a temp dir beside ``out_dir`` and renamed into place when complete,
    so ``out_dir`` never holds a half-written dataset. An existing non-empty ``out_dir`` is an
    error unless ``overwrite`` (then it is replaced).
    """
    if clips_per_class < 2:
        raise UserError(f"clips_per_class={clips_per_class}: need >= 2 (one train and one test location)")
    if duration <= 0 or sample_rate <= 0 or channels <= 0 or segments_per_location <= 0:
        raise UserError("duration, sample_rate, channels and segments_per_location must be > 0")
    if sample_rate < 16000:
        raise UserError(f"sample_rate={sample_rate}: the scene signatures need >= 16000 Hz")
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction={test_fraction}: must be in (0, 1)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    with atomic.staged_dir(out, overwrite=True) as tmp:
        _write_dataset(tmp, clips_per_class, duration, sample_rate, seed, channels, subtype,
                       segments_per_location, test_fraction, workers, progress)
    return out


def _write_dataset(tmp: Path, clips_per_class: int, duration: float, sample_rate: int, seed: int,
                   channels: int, subtype: str, segments_per_location: int, test_fraction: float,
                   workers: int, progress: bool) -> None:
    (tmp / "audio").mkdir(parents=True)
    (tmp / "evaluation_setup").mkdir()
    n = round(duration * sample_rate)
    clips = _plan(clips_per_class, seed, segments_per_location, test_fraction)
    loc_params: dict[tuple[int, int], dict] = {}
    tasks, rows = [], []
    for clip in clips:
        lk = (clip["class_idx"], clip["loc_index"])
        if lk not in loc_params:
            loc_params[lk] = _jitter_location(SPECS[clip["scene"]], _rng(seed, 2, *lk))
        name = f"audio/{clip['scene']}-{clip['city']}-{clip['loc_id']}-{clip['segment']}-{DEVICE}.wav"
        tasks.append((str(tmp / name), loc_params[lk], clip["city"], clip["segment"], seed, n,
                      sample_rate, channels, subtype))
        rows.append((name, clip["scene"], f"{clip['city']}-{clip['loc_id']}", clip["test"]))
    pool = mp.get_context("spawn").Pool(workers, initializer=tune_malloc) if workers > 1 else None
    try:
        done = pool.imap_unordered(_make_clip, tasks, chunksize=4) if pool else map(_make_clip, tasks)
        for _ in tqdm(done, total=len(tasks), desc="synth", unit="clip", disable=not progress,
                      file=sys.stderr):
            pass
        rows.sort()
        _write_text(tmp / "meta.csv", [META_HEADER] + [f"{f}\t{s}\t{i}\t{DEVICE}" for f, s, i, _ in rows])
        es = tmp / "evaluation_setup"
        _write_text(es / "fold1_train.txt", [f"{f}\t{s}" for f, s, _, test in rows if not test])
        _write_text(es / "fold1_test.txt", [f for f, _, _, test in rows if test])
        _write_text(es / "fold1_evaluate.txt", [f"{f}\t{s}" for f, s, _, test in rows if test])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@command("asc_dist.synth")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m asc_dist.synth",
        description="Write synthetic acoustic scenes in the TUT Urban Acoustic Scenes 2018 "
        "development layout (audio/, meta.csv, evaluation_setup/fold1_*.txt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("out_dir", help="output dataset folder (created)")
    ap.add_argument("--clips-per-class", type=int, default=40)
    ap.add_argument("--duration", type=float, default=10.0, help="clip length in seconds")
    ap.add_argument("--sample-rate", type=int, default=48000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--subtype", default="PCM_24", help="soundfile WAV subtype")
    ap.add_argument("--segments-per-location", type=int, default=4,
                    help="clips recorded at one location (locations are split ~70/30 train/test)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing OUT_DIR (the new dataset is renamed into place when complete)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    tune_malloc()
    out = generate(
        a.out_dir, clips_per_class=a.clips_per_class, duration=a.duration,
        sample_rate=a.sample_rate, seed=a.seed, channels=a.channels, subtype=a.subtype,
        segments_per_location=a.segments_per_location, workers=a.workers,
        overwrite=a.overwrite, progress=not a.no_progress,
    )
    print(f"wrote {a.clips_per_class * len(SCENES)} clips to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
