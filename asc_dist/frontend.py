"""The paper's log-mel front end in torch: fixed-length mono clip -> [1, n_mels, frames] in dB.

Settings (all from ``cfg.features``) follow Ye et al.: Hann 2048 / hop 1500 power STFT, 64 mel bands
50 Hz-24 kHz, 10*log10. This implementation matches DALI's graph (asc_dist.data.dali) and librosa
to well under 0.01 dB because every library default that differs is pinned: centred frames with
reflect padding, Slaney mel scale with Slaney (area) normalisation, the torch Hann window, an
absolute dB reference of 1.0 and a floor of ``floor_db``. A centred 10 s clip gives 321 frames;
``frames`` (320, the paper's count) crops the last one.

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


def hann_window(n: int) -> torch.Tensor:
    """The periodic Hann window torch/torchaudio/librosa use; DALI is given these exact values."""
    return torch.hann_window(n, periodic=True, dtype=torch.float32)


class LogMel(nn.Module):
    """wave [B, L] (or [L]) float -> [B, 1, n_mels, frames] float32 dB, on whatever device it lives."""

    def __init__(self, cfg_features: Any):
        super().__init__()
        f = cfg_features
        self.num_samples = clip_samples(f)
        self.frames = int(f.frames)
        self.floor_db = float(f.floor_db)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=int(f.sample_rate), n_fft=int(f.n_fft), win_length=int(f.win_length),
            hop_length=int(f.hop_length), f_min=float(f.f_min), f_max=float(f.f_max),
            n_mels=int(f.n_mels), window_fn=torch.hann_window, power=2.0, center=True,
            pad_mode="reflect", norm="slaney", mel_scale="slaney",
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        wave = fix_length(wave.float(), self.num_samples)
        power = self.mel(wave)  # [B, n_mels, frames+1]
        db = 10.0 * torch.log10(torch.clamp(power, min=10.0 ** (self.floor_db / 10.0)))
        t = db.shape[-1]
        if t > self.frames:
            db = db[..., : self.frames]
        elif t < self.frames:  # only if config allows more frames than the clip gives
            db = nn.functional.pad(db, (0, self.frames - t), value=self.floor_db)
        return db.unsqueeze(1).contiguous()


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
