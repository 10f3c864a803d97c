"""A trained checkpoint made ready for inference: its config, model, front end and classes.

Shared by ``evaluate``, ``predict`` and ``export``. The model, the standardisation statistics
(``feature_stats``) and the class list all come from the checkpoint, so inference needs neither
the training shards nor pretrained weight files. Settings that define what the weights expect
as input cannot be overridden.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from asc_dist import config as config_lib
from asc_dist.checkpoint import Checkpointer, CheckpointError
from asc_dist.checkpoint import load as load_checkpoint
from asc_dist.data.stats import load_or_compute_stats
from asc_dist.frontend import Standardize
from asc_dist.models import autocast, build_model, prepare_model

# What the weights were trained with: changing any of these makes the model see other inputs.
FROZEN_KEYS = ("features.", "num_classes", "model.name", "model.input_adapt", "model.resize",
               "model.passt.", "data.standardize")


def _frozen(cfg: Any) -> dict[str, Any]:
    """The values of FROZEN_KEYS in ``cfg``, one entry per leaf key."""
    out: dict[str, Any] = {}
    for k in FROZEN_KEYS:
        value = OmegaConf.select(cfg, k.rstrip("."))
        if isinstance(value, DictConfig):
            out.update({f"{k}{leaf}": v for leaf, v in OmegaConf.to_container(value).items()})
        else:
            out[k] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return out


def frozen_differences(trained: Any, run: Any) -> list[str]:
    """``key (checkpoint X, this run Y)`` for every frozen key whose values differ."""
    a, b = _frozen(trained), _frozen(run)
    return [f"{k} (checkpoint {a.get(k)!r}, this run {b.get(k)!r})"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run dir / its checkpoints dir -> its newest complete checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        latest = Checkpointer(run_dir).latest()
        if latest is None:
            raise CheckpointError(f"no usable checkpoint in {run_dir / 'checkpoints'} (from {path})")
        return latest
    raise CheckpointError(f"checkpoint {path} does not exist (give a .pt file or a run dir)")


def checkpoint_config(state: dict, overrides: Sequence[str] = (), *, path: str | Path = "") -> DictConfig:
    """The run's resolved config from the checkpoint, with ``key=value`` overrides applied.

    Keys that define what the weights expect as input (features, model architecture, the
    standardisation switch) cannot be overridden: the answer would silently be wrong.
    """
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'config' (not written by asc_dist.train?)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(config_lib.Config), config_lib.carry_over(state["config"]))
    except OmegaConfBaseException as e:
        raise CheckpointError(f"checkpoint {path}: its config does not fit this version's schema: "
                              f"{str(e).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise config_lib.ConfigError(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0].lstrip("+")
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in FROZEN_KEYS):
            raise config_lib.ConfigError(
                f"override '{item}': {key} is fixed by the checkpoint (the weights were trained "
                f"with {key}={OmegaConf.select(cfg, key)!r})")
        cfg = config_lib.merge_config(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    # World size 1: evaluation does not need train.global_batch to divide the process count.
    config_lib.validate(cfg, world_size=1)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def feature_standardizer(state: dict, cfg: Any, *, path: str | Path = "") -> nn.Module:
    """Standardize from the checkpoint's ``feature_stats``; else from the training shards' cache."""
    if not cfg.data.standardize:
        return nn.Identity()
    stats = state.get("feature_stats")
    if stats is not None:
        return Standardize(torch.as_tensor(stats["mean"]), torch.as_tensor(stats["std"]))
    train_manifest = Path(cfg.data.shards) / cfg.data.train_split / "manifest.json"
    if not train_manifest.is_file():
        raise CheckpointError(
            f"checkpoint {path} holds no 'feature_stats' (per-mel-bin mean/std of the training "
            f"split) and the training split is not here ({train_manifest} is missing): pass "
            f"data.shards=<the shards the model was trained on>, or use a checkpoint written by a "
            f"trainer that stores feature_stats")
    mean, std = load_or_compute_stats(cfg, progress=False)
    return Standardize(mean, std)


def build_trained_model(state: dict, cfg: Any, classes: list[str], device: torch.device,
                        *, path: str | Path = "") -> nn.Module:
    """The checkpoint's model in eval mode on ``device``; never touches pretrained weight files."""
    # The checkpoint holds every weight; ImageNet files need not exist on this machine.
    spec = OmegaConf.merge(cfg.model, {"pretrained": "none"})
    model = build_model(spec, len(classes))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: model weights do not fit {cfg.model.name} with "
                              f"{len(classes)} classes: {str(e).splitlines()[0]}") from None
    return prepare_model(model, spec, device).eval()


def eval_autocast(eval_precision: str, train_precision: str, device: torch.device):
    """The context evaluation runs the network in: ``auto`` = training's autocast; ``fp32`` and
    ``fp16`` none (for fp16 the model and its inputs are cast: asc_dist.validate, ``half``)."""
    return autocast(train_precision, device) if eval_precision == "auto" else nullcontext()


def resampler(state: dict) -> str:
    """The resampler of the checkpoint's training shards (asc_dist.audio.RESAMPLERS): what raw
    files of other rates go through at inference. Checkpoints older than the record: soxr."""
    from asc_dist.audio import RESAMPLER

    return str(state.get("resampler") or RESAMPLER)


@dataclass
class Restored:
    """A checkpoint made ready for inference."""

    path: Path
    cfg: DictConfig
    model: nn.Module
    standardize: nn.Module
    classes: list[str]
    step: int
    state: dict

    @property
    def resampler(self) -> str:
        return resampler(self.state)

    @property
    def train_devices(self) -> list[str]:
        """The recording devices of the clips the model was trained on (empty: not recorded)."""
        return list(self.state.get("train_devices") or [])

    def autocast(self, device: torch.device):
        """The network's context per train.eval_precision (auto: bf16 autocast exactly when
        training used it on this device type)."""
        return eval_autocast(self.cfg.train.eval_precision, self.cfg.train.precision, device)

    @property
    def half(self) -> bool:
        """train.eval_precision=fp16: the model and its inputs are cast to float16."""
        return self.cfg.train.eval_precision == "fp16"


def restore(checkpoint: str | Path, *, overrides: Sequence[str] = (),
            device: torch.device | str = "cpu", state: dict | None = None) -> Restored:
    """Load ``checkpoint`` (file or run dir): config (+ overrides), model, standardisation.

    ``state``: the already loaded contents of ``checkpoint``, to avoid reading it twice.
    """
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path) if state is None else state
    cfg = checkpoint_config(state, overrides, path=path)
    classes = state.get("classes")
    if not classes:
        raise CheckpointError(f"checkpoint {path} has no 'classes' list")
    device = torch.device(device)
    model = build_trained_model(state, cfg, list(classes), device, path=path)
    standardize = feature_standardizer(state, cfg, path=path).to(device)
    return Restored(path=path, cfg=cfg, model=model, standardize=standardize, classes=list(classes),
                    step=int(state.get("step", 0)), state=state)
