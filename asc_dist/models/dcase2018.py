"""The DCASE 2018 task 1 baseline CNN (Heittola et al.), Table I's "baseline" row."""

from __future__ import annotations

import torch
from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.models.common import adapt_input


class DcaseBaseline(nn.Module):
    """conv 7x7x32 - BN - ReLU - maxpool 5x5 - dropout 0.3 - conv 7x7x64 - BN - ReLU - maxpool -
    dropout 0.3 - dense 100 (ReLU) - dropout 0.3 - dense num_classes. The baseline's second pool
    is 4x100 on 40x500 inputs, leaving a 2x1 map; an adaptive max pool to 2x1 gives the same
    map for any input size (inputs must be at least 5x5 for the first pool).
    """

    def __init__(self, num_classes: int, resize: tuple[int, int] | None = None,
                 dropout: float = 0.3):
        super().__init__()
        self.resize = resize
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 7, padding=3),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(5),
            nn.Dropout(dropout),
            nn.Conv2d(32, 64, 7, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d((2, 1)),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 2, 100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(adapt_input(x, self.resize)))


def build_dcase_baseline(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return DcaseBaseline(num_classes, resize)
