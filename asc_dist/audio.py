"""Audio in and out: the one decode -> downmix -> resample path, the WAV encoder, file checks.

Every consumer of audio goes through :func:`decode`: the packer, the torch data backend, the
features CLI, predict and the export's own loader (which repeats these few lines with torch and
soxr only). A 44.1 kHz file therefore gives the same log-mel whether it is packed first or
predicted directly. Decoding is soundfile (libsndfile; integer PCM read exactly), the downmix
is the channel mean, all in float64; resampling (``RESAMPLERS``) is soxr at its "very high
quality" setting in float64 (the default), or ``torchaudio``: ``torchaudio.functional.resample``
with its defaults in float32, as the DCASE 2024/2025 baselines resample 44.1 to 32 kHz. A pack
records its resampler, its checkpoints carry it, and predict and export resample raw files of
other rates with it.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

RESAMPLER = "soxr-vhq"  # the default
RESAMPLERS = (RESAMPLER, "torchaudio")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
_INT_SUBTYPES = {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32"}
_PCM_BITS = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32}


def read(source: Any, *, name: str = "") -> tuple[np.ndarray, int, dict]:
    """Path or bytes -> (samples [frames, channels] float64 in [-1, 1], rate, format info).

    Raises ValueError naming ``name`` (or the path) when the data is not readable audio.
    """
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with sf.SoundFile(data) as f:
            sr, channels, subtype, frames = f.samplerate, f.channels, f.subtype, f.frames
            if subtype in _INT_SUBTYPES:
                # libsndfile left-aligns integer PCM in int32: exact, and faster than its float path.
                x = f.read(dtype="int32", always_2d=True) * 2.0**-31
            else:
                x = f.read(dtype="float64", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile's errors name a BytesIO object, not the input
        why = str(e).split("': ", 1)[-1] if str(e).startswith("Error opening") else str(e)
        raise ValueError(f"cannot decode audio {name or source}: {why}") from None
    return x, sr, {"sample_rate": sr, "channels": channels, "subtype": subtype, "frames": frames}


def to_mono(x: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames, 1] channel mean."""
    if x.shape[1] == 1:
        return x
    # Channel-by-channel sum: numpy's axis=1 mean over 2 columns is ~20x slower.
    acc = x[:, 0].copy()
    for c in range(1, x.shape[1]):
        acc += x[:, c]
    return (acc / x.shape[1])[:, None]


def resample(x: np.ndarray, sr_in: int, sr_out: int, resampler: str = RESAMPLER) -> np.ndarray:
    """[frames, channels] -> [frames', channels] at ``sr_out`` (band-limited; ``resampler``)."""
    if sr_in == sr_out:
        return x
    if resampler == "torchaudio":
        import torch
        import torchaudio.functional

        y = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(x.T, np.float32)),
                                           sr_in, sr_out)
        return y.numpy().T.astype(np.float64)
    if resampler != RESAMPLER:
        raise ValueError(f"resampler {resampler!r}: expected one of {', '.join(RESAMPLERS)}")
    return soxr.resample(np.ascontiguousarray(x), sr_in, sr_out, quality="VHQ")


def convert(x: np.ndarray, sr_in: int, sr_out: int, keep_channels: bool = False,
            resampler: str = RESAMPLER) -> np.ndarray:
    """Decoded samples -> what is stored and fed to the front end: downmix unless kept, resample."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return resample(x if keep_channels else to_mono(x), sr_in, sr_out, resampler)


def decode(source: Any, sample_rate: int, *, name: str = "", resampler: str = RESAMPLER) -> np.ndarray:
    """Path or bytes -> mono float32 [L] at ``sample_rate``: the front end's input."""
    x, sr, _ = read(source, name=name)
    return convert(x, sr, sample_rate, resampler=resampler)[:, 0].astype(np.float32)


def encode_wav(x: np.ndarray, sr: int, subtype: str) -> bytes:
    """Float samples -> WAV bytes. Integer PCM is rounded to nearest and clipped here, because
    libsndfile's float->24-bit path truncates (up to 1 LSB error) and wraps out-of-range values."""
    buf = io.BytesIO()
    bits = _PCM_BITS.get(subtype)
    if bits:
        q = np.clip(np.round(np.asarray(x, dtype=np.float64) * 2.0 ** (bits - 1)),
                    -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int32)
        # libsndfile keeps the top bits of int32 input: left-align so nothing is rounded again.
        sf.write(buf, q << (32 - bits), sr, format="WAV", subtype=subtype)
    else:
        sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def wav_truncation(source: Path | bytes) -> str | None:
    """Walk a RIFF/WAVE file's (or its bytes') chunks; report a data chunk that claims more bytes
    than exist."""
    if isinstance(source, (bytes, bytearray)):
        size, f = len(source), io.BytesIO(source)
    else:
        size, f = source.stat().st_size, open(source, "rb")  # noqa: SIM115 - closed just below
    with f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None  # not plain RIFF/WAVE: leave it to libsndfile
        fmt = "<4sI" if head[:4] == b"RIFF" else ">4sI"  # RIFX is the big-endian variant
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, clen = struct.unpack(fmt, f.read(8))
            if cid == b"data":
                # 0 / 0xFFFFFFFF are "unknown length" markers of streaming writers.
                if clen not in (0, 0xFFFFFFFF) and pos + 8 + clen > size:
                    return (f"truncated WAV: data chunk declares {clen} bytes but the file holds "
                            f"{size - pos - 8}")
                return None
            pos += 8 + clen + (clen & 1)
    return None


def read_checked(source: Path | bytes, *, name: str = "", expect_sample_rate: int | None = None,
                 expect_duration: float | None = None,
                 duration_tolerance: float = 0.01) -> tuple[np.ndarray, int, dict]:
    """:func:`read` plus the packer's checks; raise ValueError(problem) when unusable.

    ``source``: a file, or a file's bytes (e.g. a zip member) named ``name`` (its suffix tells
    whether it is a WAV).
    """
    if isinstance(source, (bytes, bytearray)):
        size, suffix, data = len(source), Path(name).suffix, source
    else:
        if not source.is_file():
            raise ValueError("missing file")
        size, suffix, data, name = source.stat().st_size, source.suffix, str(source), str(source)
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    if suffix.lower() == ".wav":
        problem = wav_truncation(source)
        if problem:
            raise ValueError(problem)
    try:
        x, sr, info = read(data, name=name)
    except ValueError as e:
        raise ValueError(f"not readable as audio: {str(e).split(': ', 1)[-1]}") from None
    if x.shape[0] != info["frames"]:
        raise ValueError(f"truncated: header says {info['frames']} frames, decoded {x.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("no audio frames")
    if sr <= 0:
        raise ValueError(f"invalid sample rate {sr}")
    if expect_sample_rate and sr != expect_sample_rate:
        raise ValueError(f"sample rate {sr} Hz, expected {expect_sample_rate} Hz")
    duration = x.shape[0] / sr
    if expect_duration and abs(duration - expect_duration) > duration_tolerance:
        raise ValueError(f"duration {duration:.3f} s, expected {expect_duration} s")
    if info["subtype"] not in _INT_SUBTYPES and not np.isfinite(x).all():  # integer PCM always is
        raise ValueError(f"{int((~np.isfinite(x)).sum())} non-finite samples (NaN/Inf)")
    return x, sr, info


def fft_length(n: int, radices: tuple[int, ...] = (3, 5, 7)) -> int:
    """The smallest 2^a times powers of ``radices`` that is >= n: a length FFTs are fast at
    (zero-padding a convolution to it changes nothing but the time it takes)."""
    best = 1 << max(0, (n - 1).bit_length())

    def odd_parts(i: int, base: int):  # base times every product of powers of radices[i:]
        if i == len(radices):
            yield base
            return
        while base < best:
            yield from odd_parts(i + 1, base)
            base *= radices[i]

    for odd in odd_parts(0, 1):
        m = odd
        while m < n:
            m *= 2
        best = min(best, m)
    return best


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every clip.

    Each clip allocates several 10-100 MB arrays; with glibc's default mmap threshold every one
    is a fresh mmap whose pages fault in again: measured here, page faults took ~40 % of the
    pack time (1.5x faster with this). Applied to our own worker processes and CLIs only.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 512 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)
