"""timm models on spectrograms: any timm architecture by name (``timm:<name>``, e.g.
``timm:efficientnet_b0``, as a student or a teacher) and the SE-ResNets of Table I (built here,
registered by :mod:`asc_dist.models.resnet`). Random initialisation: timm's weights carry no hash
to check a file against (asc_dist.weights)."""

from __future__ import annotations

import torch
from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError
from asc_dist.models.common import adapt_input

TIMM = "timm:"  # the family's prefix in model.name


class SpecTimm(nn.Module):
    """A timm model (``seresnet*`` for Table I, any ``timm:<name>``) on ``[B, 1, H, W]`` input.

    ``sum`` builds it with a 1-channel stem (timm's ``in_chans=1``); ``repeat`` keeps the RGB stem
    and repeats the input. Its weights live under ``net.``.
    """

    def __init__(self, name: str, num_classes: int, input_adapt: str = "sum",
                 resize: tuple[int, int] | None = None):
        super().__init__()
        import timm  # only timm models need it (its import costs every process a second)

        self.input_adapt, self.resize = input_adapt, resize
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                     in_chans=1 if input_adapt == "sum" else 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(adapt_input(x, self.resize, self.input_adapt))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.net.set_grad_checkpointing(enabled)


def build_timm(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    """``seresnet*`` or ``timm:<name>``."""
    return SpecTimm(name.removeprefix(TIMM), num_classes, m.input_adapt, resize)


def check_timm(name: str) -> None:
    """A ``timm:<name>`` timm does not know fails naming similar ones."""
    import timm

    arch = name.removeprefix(TIMM)
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={name!r}: timm {timm.__version__} has no model "
                          f"{arch!r}" + (f"; similar: {', '.join(near)}" if near else
                                         " (python -c 'import timm; print(timm.list_models())')"))
