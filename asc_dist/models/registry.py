"""The one list of model names (``model.name``) and what builds, checks and loads each.

Input is ``[B, 1, n_mels, T]`` float, output ``[B, num_classes]`` logits. Pretrained weights
(``model.pretrained``): ``imagenet`` (torchvision's, the ResNets: asc_dist.models.resnet), a name
of the weights registry (``passt-audioset``: asc_dist.models.hub), a path to a state dict file
(that family's layout, or one of our own model state dicts), or ``none`` (random init).
``model.resize: [H, W]`` interpolates the log-mel to that size first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError
from asc_dist.models import hub
from asc_dist.models.common import load_pretrained, read_state_dict
from asc_dist.models.cp_mobile import build_cp_mobile
from asc_dist.models.dcase2018 import build_dcase_baseline
from asc_dist.models.passt import build_passt, check_passt, load_passt
from asc_dist.models.resnet import (
    RESNETS,
    SE_RESNETS,
    build_resnet,
    build_seresnet,
    imagenet_weights,
    imagenet_weights_file,
)
from asc_dist.models.timm_models import TIMM, build_timm, check_timm

Builder = Callable[[str, ModelConfig, int, "tuple[int, int] | None"], nn.Module]

# name -> builder. seresnet*: timm's squeeze-and-excitation ResNets (Table I's SE-ResNet row);
# dcase_baseline: the DCASE 2018 baseline CNN; cp_mobile: the DCASE 2024 task 1 baseline (61,148
# parameters); passt: PaSST via hear21passt (the DCASE 2025 teachers' model).
MODELS: dict[str, Builder] = {
    **dict.fromkeys(RESNETS, build_resnet),
    **dict.fromkeys(SE_RESNETS, build_seresnet),
    "dcase_baseline": build_dcase_baseline,
    "cp_mobile": build_cp_mobile,
    "passt": build_passt,
}
# Families named by a prefix (``prefix:<name>``), resolved by their builder at build time.
# timm:<name>: any timm architecture (``timm.list_models()``), 1-channel stem, random init.
PREFIXED: dict[str, Builder] = {TIMM: build_timm}
# How model.pretrained's file is loaded, where the family has its own rules (default:
# common.load_pretrained, non-strict with the head skipped by shape).
LOADERS = {"passt": load_passt}


def _builder(name: str) -> Builder:
    if name in MODELS:
        return MODELS[name]
    prefix = name.split(":", 1)[0] + ":" if ":" in name else None
    if prefix in PREFIXED and name != prefix:
        return PREFIXED[prefix]
    known = ", ".join([*MODELS, *(f"{p}<name>" for p in PREFIXED)])
    raise ConfigError(f"model.name={name!r}: unknown model; known: {known}")


def check_model(cfg_model: ModelConfig) -> None:
    """What the config layer cannot check about ``model``: a known name, weights that fit it."""
    name, pretrained = cfg_model.name, str(cfg_model.pretrained)
    _builder(name)
    if name.startswith(TIMM):
        check_timm(name)
    if pretrained == "imagenet" and name not in RESNETS:
        raise ConfigError(f"model.pretrained=imagenet: there are no ImageNet weights for "
                          f"model.name={name}; use model.pretrained=none or a path")
    published = hub.PUBLISHED.get(pretrained)
    if published is not None and published.model != name:
        raise ConfigError(f"model.pretrained={pretrained} holds {published.model} weights, not "
                          f"model.name={name}'s")
    if name == "passt":
        check_passt(cfg_model, published)


def check_grad_checkpointing(cfg) -> None:
    """``train.grad_checkpointing`` on a model without blocks to checkpoint, before any work."""
    name = cfg.model.name
    if cfg.train.grad_checkpointing and not (name == "passt" or name.startswith(TIMM)
                                             or name in SE_RESNETS):
        raise ConfigError(f"train.grad_checkpointing=true: model.name={name} has no gradient "
                          f"checkpointing (passt, seresnet* and timm:<name> have)")


def build_model(cfg_model: ModelConfig, num_classes: int, *, load_weights: bool = True) -> nn.Module:
    """Build ``cfg.model`` with a ``num_classes``-way head, on CPU, pretrained weights loaded
    (``load_weights=False``: the architecture only, ``model.pretrained`` ignored)."""
    resize = tuple(int(s) for s in cfg_model.resize) if cfg_model.resize is not None else None
    model = _builder(cfg_model.name)(cfg_model.name, cfg_model, num_classes, resize)
    if not load_weights:
        return model
    path = pretrained_file(cfg_model)
    if path is not None:
        load = LOADERS.get(cfg_model.name, load_pretrained)
        load(model, read_state_dict(path), source=str(path))
    return model


def pretrained_file(cfg_model: ModelConfig) -> Path | None:
    """The weights file ``model.pretrained`` names (None for ``none``), checked (a registry
    entry against its record); a ConfigError saying where to put it when it is missing."""
    check_model(cfg_model)
    pretrained = str(cfg_model.pretrained)
    if pretrained == "none":
        return None
    if pretrained in hub.PUBLISHED:
        return hub.verified_file(pretrained)
    if pretrained == "imagenet":
        path = imagenet_weights_file(cfg_model.name)
        if not path.is_file():
            url = imagenet_weights(cfg_model.name).url
            raise ConfigError(
                f"model.pretrained=imagenet: ImageNet weights for {cfg_model.name} not found. Place "
                f"the file {path.name} at {path}: `python -m asc_dist.weights fetch "
                f"{cfg_model.name}` downloads it there; without network, download {url} on a "
                f"machine that has it and install it with `python -m asc_dist.weights fetch "
                f"{cfg_model.name} --from FILE` (TORCH_HOME="
                f"{os.environ.get('TORCH_HOME', '<unset>')}), or set model.pretrained=none or a "
                "path to a state dict.")
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such weights file (expected "
                          f"'imagenet', {', '.join(repr(n) for n in hub.PUBLISHED)}, 'none' or a "
                          "path to a state dict)")
    return path
