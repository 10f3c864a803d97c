"""Augmentations that act on the waveform, before the front end (``data.cache=waveform``).

The waveform cache (asc_dist.data.waveform) applies them per batch on the training device, in
CP-JKU's order (cpjku_dcase23: its DIR dataset wraps the cached waveforms, its roll dataset wraps
that, and the front end runs in the training step)::

    waveform -> impulse response (augment.dir) -> roll by samples (augment.roll_seconds)
             -> front end with a random mel band (augment.mel_band) -> log-mel

* **Device impulse responses** (``augment.dir``): a folder of impulse responses (WAV files,
  searched recursively, in sorted path order, any rate and channel count: each is decoded, mixed
  to mono and resampled once to the clips' rate through asc_dist.audio, as librosa.load(sr=...,
  mono=True) loads CP-JKU's). Each training clip of the listed recording devices is convolved,
  with probability p, with one of them drawn uniformly: ``scipy.signal.convolve(x, ir, "full")``
  truncated to the clip's length, as their code does. **Level handling: none**, as theirs:
  neither the response nor the result is normalised, so a response's own gain (and the tail cut
  off at the clip's end) stays in the clip. The convolution runs on the device as a product of
  float64 real FFTs of one fast length >= L + K - 1 (the spectra of every response computed once),
  then back to float32: a delta response returns the clip, and a known response gives numpy's
  ``convolve`` within float32 rounding (tests/test_waveform.py).
* **Roll by samples**: each clip rolled circularly by its own whole-sample shift, uniform in
  [-S, S] (both ends included, as numpy's random_integers in their RollDataset), S =
  round(roll_seconds * sample_rate). The same :func:`time_roll` rolls cached log-mels by frames.
* **A random mel band** (``augment.mel_band``, PaSST's AugmentMelSTFT in training): per batch
  ``f_min + randint(fmin_range)`` and ``f_max + fmax_range // 2 - randint(fmax_range)`` Hz
  (their fmin_aug_range / fmax_aug_range; 0 or 1 = off), Kaldi mel banks for that band computed
  on the device (frontend.kaldi_mel_banks_between, bit-identical to torchaudio's on the CPU).

Every draw comes from the generator passed in (the waveform cache seeds one per step from the
run's seed, the rank and the step), on its device: resumable, and no step waits for the host.
Per batch and in this order: the coins and the responses (B each), the shifts (B), the band (2).
An augmentation that is off draws nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from asc_dist import audio
from asc_dist.audio import fft_length
from asc_dist.errors import ConfigError
from asc_dist.frontend import kaldi_mel_banks_between


def gen_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    """Where ``generator`` draws (x's device without one)."""
    return generator.device if generator is not None else x.device


def time_roll(x: torch.Tensor, max_shift: int, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Roll each clip of ``x [B, ..., T]`` along the last dim by its own shift in
    ``[-max_shift, max_shift]`` (``out[b, ..., t] = x[b, ..., (t - shift[b]) mod T]``, as
    ``torch.roll``). Returns ``(out, shifts [B])``; ``max_shift <= 0`` returns ``(x, None)``
    and draws nothing."""
    if max_shift <= 0:
        return x, None
    b, t = x.shape[0], x.shape[-1]
    shifts = torch.randint(-max_shift, max_shift + 1, (b,), generator=generator,
                           device=gen_device(generator, x))
    s = shifts.to(x.device)
    idx = torch.remainder(torch.arange(t, device=x.device).unsqueeze(0) - s.unsqueeze(1), t)
    idx = idx.view(b, *([1] * (x.dim() - 2)), t).expand_as(x)
    return x.gather(-1, idx), shifts


def roll_samples(roll_seconds: float, sample_rate: int) -> int:
    """The largest roll of the waveform in samples: ``round(roll_seconds * sample_rate)``."""
    return round(float(roll_seconds) * sample_rate)


# -- device impulse responses ---------------------------------------------------------------------

def load_irs(folder: str | Path, sample_rate: int, resampler: str = audio.RESAMPLER
             ) -> tuple[list[str], list[np.ndarray]]:
    """The impulse responses under ``folder``: (relative names, mono float32 arrays at
    ``sample_rate``), in sorted path order. A folder that does not exist or holds no WAV file is
    refused naming it; a file that does not decode, is empty, silent or not finite is refused
    naming the file (skipping it would change the set of responses silently)."""
    root = Path(folder).expanduser()
    where = f"augment.dir.path={folder}"
    if not root.is_dir():
        raise ConfigError(f"{where}: no such folder (the impulse responses, e.g. MicIRP's: "
                          f"docs/data.md#device-impulse-responses)")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".wav")
    if not paths:
        raise ConfigError(f"{where}: no usable impulse responses: the folder holds no .wav file "
                          f"(docs/data.md#device-impulse-responses)")
    names, irs = [], []
    for p in paths:
        try:
            ir = audio.decode(p, sample_rate, name=str(p), resampler=resampler)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        finite = bool(np.isfinite(ir).all())
        if ir.size == 0 or not finite or not np.any(ir):
            what = "empty" if ir.size == 0 else ("not finite" if not finite else "silent")
            raise ConfigError(f"{where}: impulse response {p} is {what}: not usable")
        names.append(str(p.relative_to(root)))
        irs.append(ir)
    return names, irs


def fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= n (the sizes FFT libraries are fastest at)."""
    return fft_length(n, (3, 5, 7))


class ImpulseResponses:
    """A bank of impulse responses, resident on ``device`` as spectra; :meth:`apply` convolves
    chosen clips of a batch with random ones (see the module doc)."""

    def __init__(self, irs: list[np.ndarray], clip_samples: int, p: float, device: torch.device,
                 names: list[str] | None = None):
        if not irs:
            raise ValueError("ImpulseResponses needs at least one impulse response")
        self.names = names or [str(i) for i in range(len(irs))]
        self.clip_samples, self.p = clip_samples, float(p)
        self.longest = max(len(h) for h in irs)
        self.n_fft = fast_length(clip_samples + self.longest - 1)
        bank = np.zeros((len(irs), self.longest), dtype=np.float64)
        for i, h in enumerate(irs):
            bank[i, : len(h)] = h
        self.spectra = torch.fft.rfft(torch.from_numpy(bank).to(device), n=self.n_fft)

    @staticmethod
    def nbytes(irs: list[np.ndarray], clip_samples: int) -> int:
        """Device memory of the spectra (complex128) for these responses."""
        n_fft = fast_length(clip_samples + max(len(h) for h in irs) - 1)
        return len(irs) * (n_fft // 2 + 1) * 16

    def __len__(self) -> int:
        return self.spectra.shape[0]

    def convolve(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """``x [B, L]`` convolved with responses ``which [B]``, "full" cut to the first L."""
        spectrum = torch.fft.rfft(x.double(), n=self.n_fft) * self.spectra.index_select(0, which)
        return torch.fft.irfft(spectrum, n=self.n_fft)[..., : x.shape[-1]].to(x.dtype)

    def apply(self, x: torch.Tensor, eligible: torch.Tensor, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each clip of ``x [B, L]`` with ``eligible`` true convolved with probability p with a
        uniformly drawn response (a coin and a response drawn for every clip, branch-free: the
        batch's convolution always runs). Returns (out, applied [B] bool, which [B])."""
        b, gd = x.shape[0], gen_device(generator, x)
        coin = torch.rand(b, generator=generator, device=gd)
        which = torch.randint(len(self), (b,), generator=generator, device=gd).to(x.device)
        applied = eligible.to(x.device) & (coin.to(x.device) < self.p)
        return torch.where(applied.unsqueeze(1), self.convolve(x, which), x), applied, which


# -- the random mel band --------------------------------------------------------------------------

class MelBand:
    """PaSST's training band (see the module doc): :meth:`draw` -> (f_min, f_max, banks)."""

    def __init__(self, cfg_band: Any, cfg_features: Any):
        self.fmin_range, self.fmax_range = int(cfg_band.fmin_range), int(cfg_band.fmax_range)
        self.f_min, self.f_max = float(cfg_features.f_min), float(cfg_features.f_max)
        self.cfg_features = cfg_features

    @staticmethod
    def enabled(cfg_band: Any) -> bool:
        return int(cfg_band.fmin_range) > 1 or int(cfg_band.fmax_range) > 1

    def limits(self) -> tuple[float, float, float, float]:
        """(lowest f_min, highest f_min, lowest f_max, highest f_max) the draws can give."""
        top = self.f_max + max(self.fmax_range, 1) // 2
        return (self.f_min, self.f_min + max(self.fmin_range, 1) - 1,
                top - max(self.fmax_range, 1) + 1, top)

    def draw(self, generator: torch.Generator | None, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gd = generator.device if generator is not None else device
        up = torch.randint(max(self.fmin_range, 1), (), generator=generator, device=gd)
        down = torch.randint(max(self.fmax_range, 1), (), generator=generator, device=gd)
        lo = self.f_min + up.to(device, torch.float64)
        hi = self.f_max + max(self.fmax_range, 1) // 2 - down.to(device, torch.float64)
        return lo, hi, kaldi_mel_banks_between(self.cfg_features, lo, hi)
