"""The paper's front end: fixed-length mono clip -> log-mel [1, n_mels, frames] in dB.

Settings (all from ``cfg.features``) follow Ye et al.: Hann 2048 / hop 1500 power STFT, 64 mel bands
50 Hz-24 kHz, 10*log10. The torch implementation here matches DALI's pipeline (asc_dist.data.dali)
and librosa to well under 0.01 dB because every library default that differs is pinned:
centred frames with reflect padding, Slaney mel scale with Slaney (area) normalisation, the
torch Hann window, an absolute dB reference of 1.0 and a floor of ``floor_db``. A centred 10 s
clip gives 321 frames; ``frames`` (320, the paper's count) crops the last one.

Standardisation is per mel bin with mean/std over the training split only, cached beside the
shards as ``<shards>/<train_split>/stats-<hash>.json``.

``python -m asc_dist.features AUDIO [--out x.npy] [--png x.png] [--backend dali|torch] [cfg...]``
writes exactly what the model sees for one file (before standardisation) and a picture of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from torch import nn

from asc_dist import atomic

STATS_VERSION = 1


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


# ---------------------------------------------------------------------------------------------
# audio decoding shared by the torch backend and the CLI


def decode_audio(source: Any, sample_rate: int, *, name: str = "") -> torch.Tensor:
    """WAV/FLAC path or bytes -> mono float32 [L] at ``sample_rate`` (soundfile, channel mean,
    torchaudio resampling only when the file's rate differs)."""
    import soundfile as sf

    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        x, sr = sf.read(data, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile's errors name a BytesIO object, not the input
        why = str(e).split(">: ", 1)[-1] if str(e).startswith("Error opening") else str(e)
        raise ValueError(f"cannot decode audio {name or source}: {why}") from None
    wave = torch.from_numpy(x.mean(axis=1) if x.shape[1] > 1 else x[:, 0])
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, int(sr), int(sample_rate))
    return wave.contiguous()


# ---------------------------------------------------------------------------------------------
# standardisation statistics


def _plain(node: Any) -> dict:
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _settings(cfg_features: Any) -> dict:
    # The typed schema keeps ints ints and floats floats, so equal settings serialise equally.
    return dict(sorted(_plain(cfg_features).items()))


def settings_hash(cfg_features: Any) -> str:
    """Short, stable hash of the feature settings: a changed setting gets a new stats file."""
    blob = json.dumps(_settings(cfg_features), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stats_path(cfg: Any) -> Path:
    return Path(cfg.data.shards) / cfg.data.train_split / f"stats-{settings_hash(cfg.features)}.json"


def _manifest_digest(split_dir: Path) -> str:
    """Identity of the packed split: re-packing into the same folder invalidates cached stats."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    ids = [(s.get("name"), s.get("sha256"), s.get("samples")) for s in manifest.get("shards", [])]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _read_stats(path: Path, cfg: Any, digest: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if d.get("version") != STATS_VERSION or d.get("manifest") != digest:
        return None
    if d.get("features") != _settings(cfg.features):
        return None
    mean, std = torch.tensor(d["mean"]), torch.tensor(d["std"])
    if mean.numel() != cfg.features.n_mels or std.numel() != cfg.features.n_mels:
        return None
    return mean, std


def compute_stats(cfg: Any, *, device: torch.device | None = None, progress: bool = True,
                  batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-mel-bin mean/std (float64 accumulation) over every frame of every training clip."""
    from asc_dist.data import build_source

    device = device or torch.device("cpu")
    src = build_source(cfg, cfg.data.train_split, train=False, rank=0, world_size=1,
                       device=device, batch_size=batch_size, seed=0)
    n_mels = cfg.features.n_mels
    total = torch.zeros(n_mels, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    try:
        it = src.epoch(0)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=src.steps_per_epoch, desc=f"feature stats ({src.backend})", unit="batch")
        for batch in it:
            x = batch.features[batch.valid].double()  # [n, 1, M, T]
            total += x.sum(dim=(0, 1, 3))
            total_sq += (x * x).sum(dim=(0, 1, 3))
            count += x.shape[0] * x.shape[-1]
    finally:
        src.close()
    if count == 0:
        raise ValueError(f"no training clips in {cfg.data.shards}/{cfg.data.train_split} for statistics")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=0).sqrt()
    return mean.float().cpu(), std.float().cpu(), count


def load_or_compute_stats(cfg: Any, *, device: torch.device | None = None,
                          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [n_mels] of the training split, cached beside its shards.

    Deterministic and written atomically (tmp + os.replace), so concurrent callers at worst
    compute the same numbers twice; the trainer computes on rank 0, barriers, then all ranks load.
    """
    split_dir = Path(cfg.data.shards) / cfg.data.train_split
    if not (split_dir / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no manifest at {split_dir}/manifest.json (data.shards={cfg.data.shards}, "
            f"data.train_split={cfg.data.train_split}): pack the dataset first"
        )
    path = stats_path(cfg)
    digest = _manifest_digest(split_dir)
    cached = _read_stats(path, cfg, digest)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    mean, std, count = compute_stats(cfg, device=device, progress=progress)
    record = {
        "version": STATS_VERSION, "split": cfg.data.train_split, "manifest": digest,
        "features": _settings(cfg.features),
        "frames_counted": count, "mean": mean.tolist(), "std": std.tolist(),
    }
    try:
        atomic.write_text(path, json.dumps(record, indent=1))
    except OSError as e:  # read-only dataset storage: the run still has them (and checkpoints keep them)
        print(f"warning: cannot cache feature statistics at {path} ({e}); computed again next run",
              file=sys.stderr, flush=True)
        return mean, std
    if progress:
        print(f"feature statistics: {path} ({count} frames, {time.perf_counter() - t0:.1f} s)", flush=True)
    return mean, std


# ---------------------------------------------------------------------------------------------
# CLI


def features_for_file(path: str | Path, cfg: Any, backend: str = "torch") -> np.ndarray:
    """[1, n_mels, frames] float32 dB for one audio file, exactly as the chosen backend builds it."""
    if backend == "dali":
        from asc_dist.data.dali import logmel_for_file

        return logmel_for_file(path, cfg.features)
    if backend != "torch":
        raise ValueError(f"backend must be dali or torch, not {backend!r}")
    wave = decode_audio(str(path), int(cfg.features.sample_rate), name=str(path))
    with torch.no_grad():
        return LogMel(cfg.features)(wave)[0].numpy()


def save_png(feats: np.ndarray, path: str | Path, cfg_features: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = cfg_features
    seconds = feats.shape[-1] * f.hop_length / f.sample_rate
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    im = ax.imshow(feats[0], origin="lower", aspect="auto", cmap="magma",
                   extent=(0.0, seconds, -0.5, feats.shape[1] - 0.5))
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"mel bin ({f.f_min:g} Hz - {f.f_max:g} Hz)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="dB")
    fig.tight_layout()
    tmp = Path(f"{path}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.features",
        description="Write the log-mel the model sees for one audio file (before standardisation).",
    )
    p.add_argument("audio", help="audio file (wav/flac; any rate or channel count)")
    p.add_argument("--out", help="write the [1, n_mels, frames] float32 array here (.npy)")
    p.add_argument("--png", help="write an image of it here")
    p.add_argument("--backend", choices=["dali", "torch"], default=None,
                   help="front end to use (default: data.backend; auto = dali when usable)")
    p.add_argument("config", nargs="*", help="extra YAML files and key=value overrides")
    args = p.parse_intermixed_args(argv)

    from asc_dist import config as config_lib

    try:
        cfg = config_lib.load(args.config)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not Path(args.audio).is_file():
        print(f"error: no such audio file: {args.audio}", file=sys.stderr)
        return 2
    from asc_dist.data import resolve_backend

    try:
        backend = resolve_backend(args.backend or cfg.data.backend)
        feats = features_for_file(args.audio, cfg, backend)
    except (ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    f = cfg.features
    print(f"{args.audio}: {backend} log-mel {tuple(feats.shape)} "
          f"(sr {f.sample_rate}, n_fft {f.n_fft}, hop {f.hop_length}, {f.n_mels} mels "
          f"{f.f_min:g}-{f.f_max:g} Hz), min {feats.min():.1f} dB, max {feats.max():.1f} dB, "
          f"mean {feats.mean():.1f} dB")
    if args.out:
        tmp = f"{args.out}.tmp.npy"
        np.save(tmp, feats)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    if args.png:
        save_png(feats, args.png, f, f"{Path(args.audio).name} ({backend})")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
