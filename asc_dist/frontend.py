"""The log-mel front end in torch: fixed-length mono clip -> [1, n_mels, frames] log mel power.

Defaults (``cfg.features``) follow Ye et al.: Hann 2048 / hop 1500 power STFT, 64 mel bands
50 Hz-24 kHz, 10*log10. This implementation matches DALI's graph (asc_dist.data.dali) and librosa
to well under 0.01 dB because every library default that differs is pinned: centred frames with
reflect padding, the torch (periodic) Hann window, power 2, an absolute dB reference of 1.0 and a
floor of ``floor_db``. A centred 10 s clip gives 321 frames; ``frames`` (320, the paper's count)
crops the last one.

Options (each one equal in both backends, tests/test_frontend_options.py):

* ``mel_scale``: ``slaney`` (librosa's default; linear below 1 kHz) or ``htk``
  (2595*log10(1 + f/700), torchaudio's default). Triangles are built in Hz between mel-spaced
  edges on both sides.
* ``mel_norm``: ``slaney`` (each triangle scaled to unit area, 2/(f_hi - f_lo)) or ``none``
  (peak 1, torchaudio's default).
* ``log``: ``db`` = 10*log10(max(power, 10**(floor_db/10))) or ``ln`` = ln(power + log_eps).
* ``mel_scale=kaldi``: torchaudio.compliance.kaldi.get_mel_banks (triangles in the mel domain,
  1127 ln(1 + f/700), VTLN off) with a zero column appended for the Nyquist bin, unnormalised
  (``mel_norm=none``). DALI has no such filterbank: its graph stops at the power spectrogram
  and this module's :meth:`LogMel.from_spectrogram` does the rest on the device.
* ``preemphasis`` c > 0: y[n] = x[n+1] - c x[n] on the padded/cropped clip, so the STFT sees
  ``clip_samples - 1`` samples (PaSST's convention: a 1-s clip at 32 kHz and hop 320 gives 100
  frames, not 101).
* ``window``: ``periodic`` Hann (torch's default) or ``symmetric`` (``periodic=False``). A window
  shorter than n_fft is zero-padded on both sides to n_fft (torch.stft's and DALI's convention).
* ``log_offset`` / ``log_divisor``: after the log, (x + log_offset) / log_divisor.

PaSST's AugmentMelSTFT in evaluation mode (hear21passt; CP-JKU's DCASE 2023 teacher) is
``sample_rate=32000 n_fft=1024 win_length=800 hop_length=320 n_mels=128 f_min=0 f_max=15500
mel_scale=kaldi mel_norm=none log=ln log_eps=1e-5 preemphasis=0.97 window=symmetric
log_offset=4.5 log_divisor=5`` (f_max = sr/2 - fmax_aug_range/2 with their fmax_aug_range 1000;
its training-time random band and masks are not part of the front end here).

The DCASE 2024 task 1 baseline (CPJKU) is ``mel_scale=htk mel_norm=none log=ln log_eps=1e-5``
with 32 kHz, n_fft 4096, win 3072, hop 500, 256 mels, 0-16000 Hz: torchaudio's MelSpectrogram
with its defaults, then ``(x + 1e-5).log()``. Frames added past the clip's own (``frames`` above
what the clip gives) hold "silence", the log of zero power (:func:`log_zero`): ``floor_db`` for
db, ln(log_eps) for ln.

Torch only: the model's side of the pipeline (export embeds these modules), apart from audio
decoding (asc_dist.audio) and the data sources that feed it (asc_dist.data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
import torchaudio
from omegaconf import OmegaConf
from torch import nn


def clip_samples(cfg_features: Any) -> int:
    """Samples in one clip at the feature rate: every waveform is padded/cropped to this."""
    return round(cfg_features.clip_seconds * cfg_features.sample_rate)


def fix_length(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Zero-pad or crop along the last dim, so a short (e.g. truncated) file keeps batch shapes."""
    n = wave.shape[-1]
    if n > num_samples:
        return wave[..., :num_samples]
    if n < num_samples:
        return nn.functional.pad(wave, (0, num_samples - n))
    return wave


def hann_window(n: int, periodic: bool = True) -> torch.Tensor:
    """The Hann window torch/torchaudio/librosa use (periodic) or PaSST's (symmetric); DALI is
    given these exact values."""
    return torch.hann_window(n, periodic=periodic, dtype=torch.float32)


def options(cfg_features: Any) -> tuple[str, str, str]:
    """(mel_scale, mel_norm, log) of the features, checked (a config built without the schema,
    e.g. an old saved one, gets the defaults for keys it lacks)."""
    f = cfg_features
    opts = (str(getattr(f, "mel_scale", "slaney")), str(getattr(f, "mel_norm", "slaney")),
            str(getattr(f, "log", "db")))
    for name, value, allowed in zip(("mel_scale", "mel_norm", "log"), opts,
                                    (("slaney", "htk", "kaldi"), ("slaney", "none"), ("db", "ln"))):
        if value not in allowed:
            raise ValueError(f"features.{name}={value!r}: expected one of {', '.join(allowed)}")
    return opts


def log_eps(cfg_features: Any) -> float:
    """``features.log_eps`` (the ln option's offset)."""
    return float(getattr(cfg_features, "log_eps", 1e-5))


def periodic_window(cfg_features: Any) -> bool:
    """``features.window``: True for the periodic Hann window, False for the symmetric one."""
    window = str(getattr(cfg_features, "window", "periodic"))
    if window not in ("periodic", "symmetric"):
        raise ValueError(f"features.window={window!r}: expected periodic or symmetric")
    return window == "periodic"


def preemphasis(cfg_features: Any) -> float:
    """``features.preemphasis`` (0: off)."""
    return float(getattr(cfg_features, "preemphasis", 0.0))


def affine(cfg_features: Any) -> tuple[float, float]:
    """(``log_offset``, ``log_divisor``): features = (log + offset) / divisor."""
    return (float(getattr(cfg_features, "log_offset", 0.0)),
            float(getattr(cfg_features, "log_divisor", 1.0)))


def stft_frames(cfg_features: Any) -> int:
    """Centred STFT frames of one clip (pre-emphasis makes it one sample shorter)."""
    samples = clip_samples(cfg_features) - (1 if preemphasis(cfg_features) > 0 else 0)
    return samples // int(cfg_features.hop_length) + 1


def kaldi_mel_banks(cfg_features: Any) -> torch.Tensor:
    """[n_mels, n_fft/2 + 1]: Kaldi's mel triangles (torchaudio.compliance.kaldi, VTLN off, as
    hear21passt calls it) with a zero weight on the Nyquist bin."""
    from torchaudio.compliance import kaldi

    f = cfg_features
    banks, _ = kaldi.get_mel_banks(int(f.n_mels), int(f.n_fft), float(f.sample_rate),
                                   float(f.f_min), float(f.f_max), 100.0, -500.0, 1.0)
    return nn.functional.pad(banks.float(), (0, 1))


def kaldi_mel_banks_between(cfg_features: Any, f_min: torch.Tensor, f_max: torch.Tensor
                            ) -> torch.Tensor:
    """[n_fft/2 + 1, n_mels] (the projection's layout): :func:`kaldi_mel_banks` for the band
    [f_min, f_max] given as 0-dim tensors, computed on their device from them, so a band drawn
    there per batch (``augment.mel_band``) is never read by the host. The ops are torchaudio's
    get_mel_banks' (VTLN off), in its dtypes: on the CPU the banks equal it bit for bit."""
    f = cfg_features
    n_mels, n_fft, sr = int(f.n_mels), int(f.n_fft), float(f.sample_rate)
    device = f_min.device

    def mel_of(hz: torch.Tensor) -> torch.Tensor:  # its mel_scale_scalar, in double
        return 1127.0 * torch.log(1.0 + hz.double() / 700.0)

    low = mel_of(f_min)
    delta = ((mel_of(f_max) - low) / (n_mels + 1)).float()
    low = low.float()
    b = torch.arange(n_mels, device=device).unsqueeze(1)
    left, center, right = b * delta + low, (b + 1.0) * delta + low, (b + 2.0) * delta + low
    mel = (1127.0 * (1.0 + (sr / n_fft) * torch.arange(n_fft / 2, device=device) / 700.0).log()
           ).unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.maximum(torch.zeros(1, device=device), torch.minimum(up, down))
    return nn.functional.pad(banks, (0, 1)).T.contiguous()


class LogMel(nn.Module):
    """wave [B, L] (or [L]) float -> [B, 1, n_mels, frames] float32 log mel power (dB or ln, per
    ``features.log``, then the affine map), on whatever device it lives."""

    def __init__(self, cfg_features: Any):
        super().__init__()
        f = cfg_features
        mel_scale, mel_norm, log = options(f)
        self.num_samples = clip_samples(f)
        self.frames = int(f.frames)
        self.log_kind = log
        self.floor_db = float(f.floor_db)
        self.log_eps = log_eps(f)
        self.preemphasis = preemphasis(f)
        self.offset, self.divisor = affine(f)
        periodic = periodic_window(f)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=int(f.sample_rate), n_fft=int(f.n_fft), win_length=int(f.win_length),
            hop_length=int(f.hop_length), f_min=float(f.f_min), f_max=float(f.f_max),
            n_mels=int(f.n_mels), window_fn=torch.hann_window, power=2.0, center=True,
            pad_mode="reflect", norm="slaney" if mel_norm == "slaney" else None,
            mel_scale="htk" if mel_scale == "kaldi" else mel_scale,
            wkwargs=None if periodic else {"periodic": False},
        )
        if mel_scale == "kaldi":  # the same projection, Kaldi's weights ([n_freqs, n_mels])
            self.mel.mel_scale.fb = kaldi_mel_banks(f).T.contiguous()
        self.silence = log_zero(f)  # what padding past the clip's frames holds

    def log(self, power: torch.Tensor) -> torch.Tensor:
        """Mel power -> its log per ``features.log``, then the affine map (elementwise; zero
        power -> ``silence``)."""
        if self.log_kind == "ln":
            out = torch.log(power + self.log_eps)
        else:
            out = 10.0 * torch.log10(torch.clamp(power, min=10.0 ** (self.floor_db / 10.0)))
        if self.offset != 0.0 or self.divisor != 1.0:
            out = (out + self.offset) / self.divisor
        return out

    def forward(self, wave: torch.Tensor, banks: torch.Tensor | None = None) -> torch.Tensor:
        """``banks`` [n_fft/2 + 1, n_mels]: another mel projection for this batch (a random
        band, :func:`kaldi_mel_banks_between`); None: the configured one."""
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        wave = fix_length(wave.float(), self.num_samples)
        if self.preemphasis > 0.0:
            wave = wave[..., 1:] - self.preemphasis * wave[..., :-1]
        return self.from_spectrogram(self.mel.spectrogram(wave), banks)

    def from_spectrogram(self, power: torch.Tensor, banks: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Power spectrogram [B, n_fft/2 + 1, T] -> [B, 1, n_mels, frames] (mel, log, affine,
        frames cropped or padded with silence): what follows DALI's graph for mel_scale=kaldi."""
        if banks is None:
            mel = self.mel.mel_scale(power)
        else:  # torchaudio's MelScale.forward with these weights
            mel = torch.matmul(power.transpose(-1, -2), banks).transpose(-1, -2)
        out = self.log(mel)
        t = out.shape[-1]
        if t > self.frames:
            out = out[..., : self.frames]
        elif t < self.frames:  # the config check refuses this; a config built without it may not
            out = nn.functional.pad(out, (0, self.frames - t), value=self.silence)
        return out.unsqueeze(1).contiguous()


def feature_value(cfg_features: Any, log_value: float) -> float:
    """What a log-domain value becomes in the features (the affine map, in float32 as LogMel
    computes it): 0 on the log-mel is what a mask at log_mel leaves (PaSST: (0 + 4.5) / 5)."""
    offset, divisor = affine(cfg_features)
    if offset == 0.0 and divisor == 1.0:
        return float(log_value)
    return float((torch.tensor(log_value, dtype=torch.float32) + offset) / divisor)


def log_zero(cfg_features: Any) -> float:
    """The features' value for zero mel power ("silence"): ``floor_db`` for log=db, ln(log_eps)
    (as float32 computes it) for log=ln, through the affine map. Whatever pads frames or masks
    bins as silence uses it."""
    _, _, log = options(cfg_features)
    if log == "ln":
        zero = float(torch.log(torch.zeros(1) + log_eps(cfg_features))[0])
    else:
        zero = float(cfg_features.floor_db)
    return feature_value(cfg_features, zero)


class Standardize(nn.Module):
    """(x - mean) / std per mel bin for x [B, 1, n_mels, T]."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"Standardize: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ")
        # A bin that is constant over the training set (e.g. always at the floor) would divide by
        # ~0 and blow up the first test clip that has energy there.
        self.register_buffer("mean", mean.view(1, 1, -1, 1))
        self.register_buffer("std", std.clamp(min=1e-2).view(1, 1, -1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.mean.shape[-2]:
            raise ValueError(
                f"Standardize: input has {x.shape[-2]} mel bins, statistics have {self.mean.shape[-2]}"
            )
        return (x - self.mean) / self.std


def settings(cfg_features: Any) -> dict:
    """The feature settings as a plain sorted dict (the typed schema keeps ints ints and floats
    floats, so equal settings serialise equally)."""
    if dataclasses.is_dataclass(cfg_features):
        d = dataclasses.asdict(cfg_features)
    else:
        d = OmegaConf.to_container(cfg_features, resolve=True)
    return dict(sorted(d.items()))


def settings_hash(cfg_features: Any) -> str:
    """Short, stable hash of the feature settings: files derived from features are keyed by it."""
    blob = json.dumps(settings(cfg_features), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
