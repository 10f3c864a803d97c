"""ResNets for Table I: torchvision's ResNets (the recipe's ResNet-50, ImageNet weights) and timm's
squeeze-and-excitation ResNets (the SE-ResNet row), adapted to 1-channel log-mels.

``model.pretrained=imagenet`` reads torchvision's ``IMAGENET1K_V1`` file of the ResNet from torch
hub's cache, ``$TORCH_HOME/hub/checkpoints/<file name of the enum's url>``; it is never
downloaded (the training machines have no network and a half-written download on a shared cache
is worse than a clear message), so a missing file fails with the exact name and path to put it at
(``python -m asc_dist.weights fetch resnet50`` puts it there). V1 is the recipe the 2018 paper
could have used and the only ImageNet set that exists for every depth (resnet18/34 have no V2).

Input adaptation (``model.input_adapt``): ``sum`` makes conv1 take one channel, its filters the
sum of the pretrained RGB filters (a grey image through the RGB filters gives the same response);
``repeat`` keeps the 3-channel conv1 and repeats the input three times.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.models.common import adapt_input
from asc_dist.models.timm_models import SpecTimm

# Same block/layer layout as torchvision's builders, so state dict keys match their weight files
# (torchvision keeps the layouts inside its builder functions, with no table to read them from).
# Block names, not classes: torchvision is imported only when a ResNet is built (importing it
# pulls in torch._dynamo, ~1.5 s of every process start).
RESNETS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
    "resnet101": ("Bottleneck", [3, 4, 23, 3]),
    "resnet152": ("Bottleneck", [3, 8, 36, 3]),
}
# timm's squeeze-and-excitation ResNets (Table I's SE-ResNet row)
SE_RESNETS = ("seresnet18", "seresnet34", "seresnet50")
IMAGENET_WEIGHTS = "IMAGENET1K_V1"


def spec_resnet_class() -> type[nn.Module]:
    """``SpecResNet``: a torchvision ResNet whose forward first adapts a ``[B, 1, H, W]``
    spectrogram (made on first use: see RESNETS)."""
    global _SpecResNet
    if _SpecResNet is not None:
        return _SpecResNet
    from torchvision.models.resnet import ResNet

    class SpecResNet(ResNet):
        def __init__(self, block, layers, num_classes: int, input_adapt: str = "sum",
                     resize: tuple[int, int] | None = None):
            super().__init__(block, layers, num_classes=num_classes)
            self.input_adapt = input_adapt
            self.resize = resize
            if input_adapt == "sum":
                self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
                nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(adapt_input(x, self.resize, self.input_adapt))

    SpecResNet.__module__ = __name__
    _SpecResNet = SpecResNet
    return SpecResNet


_SpecResNet: type[nn.Module] | None = None


def imagenet_weights(name: str):
    """torchvision's record of ResNet ``name``'s ImageNet weights (URL, hash in the name)."""
    from torchvision.models import get_model_weights

    return get_model_weights(name)[IMAGENET_WEIGHTS]


def imagenet_weights_file(name: str) -> Path:
    """Where torch hub's cache keeps the ImageNet weights of ResNet ``name`` (may not exist)."""
    weights = imagenet_weights(name)
    # Resolved at call time so a changed TORCH_HOME is honoured.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def build_resnet(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    from torchvision.models import resnet

    block, layers = RESNETS[name]
    return spec_resnet_class()(getattr(resnet, block), layers, num_classes, m.input_adapt, resize)


def build_seresnet(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return SpecTimm(name, num_classes, m.input_adapt, resize)
