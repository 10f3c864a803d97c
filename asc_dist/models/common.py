"""What every model family shares: the input check, loading a state dict with a report, device
placement and the autocast the trainer and the inference commands use.

Device placement and ``channels_last`` are applied by :func:`prepare_model`, not by the builders,
so a model is built (and pretrained weights loaded) on the CPU once and the same builder serves
tests and tools that never touch a GPU. ``torch.compile`` is applied by the trainer after the DDP
wrap (PyTorch's order for overlapping communication).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)

# Wrappers that training code commonly leaves on state dict keys.
KEY_PREFIXES = ("module.", "_orig_mod.")


def adapt_input(x: torch.Tensor, resize: tuple[int, int] | None,
                input_adapt: str = "sum") -> torch.Tensor:
    """Check a ``[B, 1, n_mels, T]`` log-mel; resize it if asked; repeat it for an RGB stem."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"model input must be [B, 1, n_mels, T]; got shape {list(x.shape)}")
    if resize is not None:
        x = F.interpolate(x, size=resize, mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1) if input_adapt == "repeat" else x


@dataclass
class LoadReport:
    """What happened to each key when a state dict was loaded into a model."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    skipped: list[str] = field(default_factory=list)  # in both, shapes differ (e.g. the head)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: plain, nested under ``model``/``state_dict`` (our own
    checkpoints, Lightning's), DDP- or compile-prefixed; a ConfigError naming the file if not."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF: all "not a usable weights file"
        raise ConfigError(f"model.pretrained: cannot read weights file {path}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # Our own checkpoints and many others nest the weights one level down.
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"model.pretrained: weights file {path} does not hold a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in KEY_PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_pretrained(model: nn.Module, state_dict: dict[str, torch.Tensor],
                    source: str = "state dict") -> LoadReport:
    """Load ``state_dict`` into ``model`` non-strictly, adapting conv1 and skipping the head.

    A 3-channel conv1 loaded into a 1-channel conv1 is summed over its RGB dimension. Keys whose
    shapes still differ (the 1000-way ImageNet head against our ``num_classes`` head) are
    skipped and reported, as are missing and unexpected keys.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    if not own.keys() & state_dict.keys() and {f"net.{k}" for k in state_dict} & own.keys():
        state_dict = {f"net.{k}": v for k, v in state_dict.items()}  # a timm file for SpecTimm
    stem = "net.conv1.weight" if "net.conv1.weight" in own else "conv1.weight"
    w = state_dict.get(stem)
    if w is not None and stem in own and w.shape[1] == 3 and own[stem].shape[1] == 1:
        state_dict[stem] = w.sum(dim=1, keepdim=True)
    report = LoadReport(source=source)
    for k in list(state_dict):
        if k in own and state_dict[k].shape != own[k].shape:
            report.skipped.append(
                f"{k} (file {list(state_dict[k].shape)}, model {list(own[k].shape)})"
            )
            del state_dict[k]
    result = model.load_state_dict(state_dict, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    report.loaded = [k for k in state_dict if k in own]
    if not report.loaded:
        raise ConfigError(
            f"no weight in {source} matches the model ({len(report.unexpected)} unexpected keys, "
            f"e.g. {report.unexpected[:3]}): wrong architecture?"
        )
    log_report(report)
    return report


def log_report(report: LoadReport, head: tuple[str, ...] = ("fc.", "net.fc.", "classifier.")
               ) -> None:
    """One INFO line for what was loaded; keys under ``head`` (the replaced classifier) at INFO as
    expected, anything else not loaded as a WARNING."""
    log.info("loaded %d tensors from %s", len(report.loaded), report.source)

    def is_head(k: str) -> bool:
        return k.split(" ")[0].startswith(head)

    for kind in ("skipped", "missing", "unexpected"):
        keys = getattr(report, kind)
        expected = [k for k in keys if is_head(k)]
        other = [k for k in keys if not is_head(k)]
        if expected:
            log.info("%s keys from %s (new head, expected): %s", kind, report.source, expected)
        if other:
            log.warning("%s keys from %s: %s", kind, report.source, other)


def prepare_model(model: nn.Module, cfg_model: ModelConfig, device: torch.device | str) -> nn.Module:
    """Move to ``device``; on CUDA apply channels_last (feed it channels_last inputs too)."""
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda" and cfg_model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def use_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Hand the trainer's per-step generator to every submodule that draws in its forward (a
    ``generator`` attribute: PaSST's patchout and positional-embedding offset), so those draws
    are a function of (seed, rank, step) and a resumed run redraws them exactly."""
    for m in model.modules():
        if hasattr(m, "generator"):
            m.generator = generator


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """``train.grad_checkpointing``: recompute each block's activations in the backward pass
    instead of keeping them (less memory for ~30 % more compute). The families that have blocks
    to checkpoint implement ``set_grad_checkpointing`` (PaSST, timm models); others are refused
    (:func:`asc_dist.models.check_grad_checkpointing` says so before any process group)."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"train.grad_checkpointing=true: {type(model).__name__} has no gradient "
                          f"checkpointing (passt and timm models have)")
    model.set_grad_checkpointing(enabled)


class CpuBf16Autocast:
    """bf16 autocast on a CPU with oneDNN off for its duration (reusable, like torch.autocast).

    torch 2.11's oneDNN AMX bf16 convolution intermittently returns NaN or garbage when its
    reduction length is not a multiple of 32 (oneDNN issue 5717; our 1-channel stem has 7x7 = 49):
    measured here as NaN scores from about every other freshly loaded model. Guarding only the
    49-long stem did not help. PyTorch's own kernels are correct but ~40x slower than float32.
    """

    warned = False

    def __enter__(self) -> None:
        if not CpuBf16Autocast.warned:
            CpuBf16Autocast.warned = True
            log.warning("bf16 on a CPU runs without oneDNN (its AMX bf16 kernels return NaN at "
                        "random in this torch): correct but ~40x slower than float32; use "
                        "train.precision=fp32 (predict: --precision fp32) for speed")
        self._mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        self._autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self._autocast.__enter__()

    def __exit__(self, *exc) -> None:
        try:
            self._autocast.__exit__(*exc)
        finally:
            torch.backends.mkldnn.enabled = self._mkldnn


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast for ``train.precision`` bf16, or auto on CUDA; otherwise float32."""
    if precision == "bf16" and device.type == "cpu":
        return CpuBf16Autocast()
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
