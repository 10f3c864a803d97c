"""DCASE 2025 task 1 inference runtime, copied verbatim into every package that
``python -m asc_dist.export ... --dcase2025`` writes (as ``<label>/_runtime.py``).

It imports torch, numpy and soundfile only (and soxr, for models whose training audio was resampled
with soxr): never asc_dist. A submission module ``<label>_<i>`` binds :class:`Submission` to its
checkpoint folder and offers the challenge's API (CPJKU/dcase2025_task1_inference):

* ``load_model(model_file_path=None)`` -> :class:`DeviceModels` (an ``nn.Module``);
* ``load_inputs(file_paths, device_ids, model)`` -> one model-ready tensor per file,
  ``[1, 1, n_mels, frames]``, in the model's precision;
* ``get_model_for_device(model, device_id)`` -> the device's own model, the general model for an
  id without one;
* ``predict(file_paths, device_ids, model_file_path=None, use_cuda=True)`` -> (one logit tensor per
  file in input order, the class order).

A checkpoint folder holds ``model.json`` (classes, devices, front-end settings, precision),
``frontend.pt`` (TorchScript: a mono float32 waveform at the model's rate -> the standardised
log-mel, padded or cropped to the training clip length) and one TorchScript network per model
(``general.pt``, ``<device>.pt``). Audio is read as training read it: the channel mean in float64,
resampled to the model's rate with the resampler the training shards were packed with (soxr's
very high quality, or torchaudio's default windowed-sinc resampler, reimplemented below in torch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn

BATCH = 64  # files per forward, per device (as the baseline's package)


class DeviceModels(nn.Module):
    """The front end, the general model and one model per training device."""

    def __init__(self, frontend: nn.Module, general: nn.Module, members: dict[str, nn.Module],
                 meta: dict):
        super().__init__()
        self.frontend = frontend
        self.general = general
        self.device_models = nn.ModuleDict(members)
        self.meta = meta

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def half_precision(self) -> bool:
        return bool(self.meta["half"])

    def for_device(self, device_id: str | None) -> nn.Module:
        if device_id is not None and str(device_id) in self.device_models:
            return self.device_models[str(device_id)]
        return self.general

    def forward(self, x: torch.Tensor, device_id: str | None = None) -> torch.Tensor:
        return self.for_device(device_id)(x)


def load(ckpt_dir: str | Path) -> DeviceModels:
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "model.json").read_text())
    frontend = torch.jit.load(str(ckpt_dir / meta["frontend"]), map_location="cpu").eval()
    general = torch.jit.load(str(ckpt_dir / meta["general"]), map_location="cpu").eval()
    members = {d: torch.jit.load(str(ckpt_dir / f), map_location="cpu").eval()
               for d, f in meta["members"].items()}
    if meta["half"]:  # the networks only: the front end stays float32, as in training
        general = general.half()
        members = {d: m.half() for d, m in members.items()}
    return DeviceModels(frontend, general, members, meta).eval()


# ------------------------------------------------------------------------------- audio


def resample_sinc(x: torch.Tensor, sr_in: int, sr_out: int, zeros: int = 6,
                  rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``x [L]`` by a Hann-windowed sinc: for output sample j (at time
    j / sr_out) the sum of x[i] sinc(pi b (i / sr_in - j / sr_out)) over ``zeros`` zero crossings
    each side, b = rolloff * min(sr_in, sr_out) (torchaudio.functional.resample's defaults),
    computed as a strided convolution with one filter per output phase, in x's dtype."""
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    base = min(up, down) * rolloff
    width = math.ceil(zeros * down / base)
    taps = torch.arange(-width, width + down, dtype=x.dtype) / down
    t = (torch.arange(0, -up, -1, dtype=x.dtype)[:, None] / up + taps[None, :]) * base
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    filters = (sinc * (window * (base / down)))[:, None, :]  # [phases, 1, taps]
    padded = torch.nn.functional.pad(x[None, None], (width, width + down))
    y = torch.nn.functional.conv1d(padded, filters, stride=down)  # [1, phases, steps]
    y = y.transpose(1, 2).reshape(-1)
    return y[: math.ceil(up * x.shape[-1] / down)]


def read_audio(path: str | Path, sample_rate: int, resampler: str) -> torch.Tensor:
    """Mono float32 [L] at ``sample_rate``: the channel mean (float64), then the resampler."""
    x, sr = sf.read(str(path), dtype="float64", always_2d=True)
    if x.shape[0] == 0:
        raise ValueError(f"{path}: no audio samples")
    x = x.mean(axis=1)
    if sr != sample_rate:
        if resampler == "torchaudio":
            return resample_sinc(torch.from_numpy(x.astype(np.float32)), sr, sample_rate)
        import soxr

        x = soxr.resample(np.ascontiguousarray(x[:, None]), sr, sample_rate, quality="VHQ")[:, 0]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# ------------------------------------------------------------------------------- the API


class Submission:
    """The challenge's functions for one checkpoint folder (one ``<label>_<i>`` module)."""

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        self._cache: dict[str, DeviceModels] = {}

    def load_model(self, model_file_path: str | Path | None = None) -> DeviceModels:
        where = str(Path(model_file_path) if model_file_path else self.ckpt_dir)
        if where not in self._cache:
            self._cache[where] = load(where)
        return self._cache[where]

    @staticmethod
    def get_model_for_device(model: DeviceModels, device_id: str | None) -> nn.Module:
        return model.for_device(device_id)

    @staticmethod
    @torch.no_grad()
    def load_inputs(file_paths: Sequence[str], device_ids: Sequence[str], model: DeviceModels
                    ) -> list[torch.Tensor]:
        meta = model.meta
        device = next(model.general.parameters()).device
        dtype = torch.float16 if model.half_precision else torch.float32
        out = []
        for path in file_paths:
            wave = read_audio(path, int(meta["sample_rate"]), meta["resampler"]).to(device)
            out.append(model.frontend(wave[None]).to(dtype))
        return out

    @torch.no_grad()
    def predict(self, file_paths: Sequence[str], device_ids: Sequence[str],
                model_file_path: str | Path | None = None, use_cuda: bool = True
                ) -> tuple[list[torch.Tensor], list[str]]:
        if len(file_paths) != len(device_ids):
            raise ValueError(f"{len(file_paths)} files but {len(device_ids)} device ids")
        model = self.load_model(model_file_path)
        cuda = use_cuda and torch.cuda.is_available()
        target = torch.device("cuda" if cuda else "cpu")
        model = model.to(target)
        inputs = self.load_inputs(file_paths, device_ids, model)
        logits: list[torch.Tensor | None] = [None] * len(file_paths)
        groups: dict[str | None, list[int]] = {}
        for i, d in enumerate(device_ids):
            groups.setdefault(d, []).append(i)
        for d, rows in groups.items():
            net = self.get_model_for_device(model, d)
            for start in range(0, len(rows), BATCH):
                part = rows[start:start + BATCH]
                y = net(torch.cat([inputs[i] for i in part])).float().cpu()
                for i, row in zip(part, y):
                    logits[i] = row
        return logits, model.classes


def write_output(path: str | Path, names: Sequence[str], logits: Sequence[torch.Tensor],
                 classes: Sequence[str]) -> Path:
    """``output.csv`` as the official evaluation script writes it: tab-separated, a header,
    per file its name, the predicted scene and one softmax probability per class."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(["filename", "scene_label", *classes])]
    for name, row in zip(names, logits):
        p = torch.softmax(row.float(), dim=-1)
        probs = [f"{float(v):.6f}" for v in p]
        lines.append("\t".join([str(name), classes[int(p.argmax())], *probs]))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
