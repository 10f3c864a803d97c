"""The DCASE 2024 task 1 baseline network (``cp_mobile``): a simplified CP-Mobile of 61,148
parameters (CPJKU/dcase2024_task1_baseline; also the DCASE 2025 baseline's network)."""

from __future__ import annotations

import torch
from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.models.common import adapt_input


def make_divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), rounded up
    instead when rounding to nearest would lose more than 10 % (MobileNet's channel rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride=1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    """conv (no bias, 'same' padding for odd kernels) - BN - optional ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CPMobileBlock(nn.Module):
    """Inverted bottleneck: 1x1 expand - 3x3 depthwise (carries the stride) - 1x1 project, each
    with BN (ReLU after the first two), a shortcut when the widths agree (average-pooled 3x3 when
    strided), ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, expansion_rate: float, stride: tuple[int, int]):
        super().__init__()
        c_exp = make_divisible(c_in * expansion_rate)
        self.block = nn.Sequential(
            _conv_bn(c_in, c_exp, 1),
            _conv_bn(c_exp, c_exp, 3, stride=stride, groups=c_exp),
            _conv_bn(c_exp, c_out, 1, relu=False),
        )
        self.use_shortcut = c_in == c_out
        strided = tuple(stride) != (1, 1)
        self.shortcut = (nn.AvgPool2d(3, stride=stride, padding=1)
                         if self.use_shortcut and strided else nn.Identity())
        self.after_block_activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.use_shortcut:
            y = y + self.shortcut(x)
        return self.after_block_activation(y)


class CPMobile(nn.Module):
    """The DCASE 2024 task 1 baseline network (CPJKU/dcase2024_task1_baseline, models/baseline.py
    with run_training.py's settings): a simplified CP-Mobile of 61,148 parameters and 29,419,156
    MACs on a ``[1, 1, 256, 65]`` log-mel (the baseline's README table; ``asc_dist.complexity``).

    Stem: two 3x3 stride-2 conv-BN-ReLU (1 -> base/4 -> base channels). Stages of
    :class:`CPMobileBlock` (``n_blocks`` per stage, widths ``base * multiplier**stage`` rounded by
    :func:`make_divisible`), blocks numbered b1, b2, ... across stages and strided where
    ``strides`` names them. Head: 1x1 conv to the classes (no bias) - BN - global average pool.
    Layer names follow the reference (``in_c``, ``stages.s1.b1.block.0``, ``feed_forward``) so the
    per-layer complexity table reads like its README's.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, base_channels: int = 32,
                 channels_multiplier: float = 1.8, expansion_rate: float = 2.1,
                 n_blocks: tuple[int, ...] = (3, 2, 1),
                 strides: dict[str, tuple[int, int]] | None = None,
                 resize: tuple[int, int] | None = None):
        super().__init__()
        self.resize = resize
        # The reference's default strides (models/baseline.py get_model; run_training.py passes none)
        strides = {"b2": (1, 1), "b3": (1, 2), "b4": (2, 1)} if strides is None else strides
        base = make_divisible(base_channels)
        widths = [base] + [make_divisible(base * channels_multiplier ** s)
                           for s in range(len(n_blocks))]
        self.in_c = nn.Sequential(
            _conv_bn(in_channels, widths[0] // 4, 3, stride=2),
            _conv_bn(widths[0] // 4, widths[0], 3, stride=2),
        )
        self.stages = nn.Sequential()
        block_id = 0
        for s, count in enumerate(n_blocks):
            stage = nn.Sequential()
            c_in = widths[s]
            for _ in range(count):
                block_id += 1
                name = f"b{block_id}"
                stage.add_module(name, CPMobileBlock(c_in, widths[s + 1], expansion_rate,
                                                     tuple(strides.get(name, (1, 1)))))
                c_in = widths[s + 1]
            self.stages.add_module(f"s{s + 1}", stage)
        self.feed_forward = nn.Sequential(
            nn.Conv2d(widths[-1], num_classes, 1, bias=False),
            nn.BatchNorm2d(num_classes),
            nn.AdaptiveAvgPool2d(1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.in_c(adapt_input(x, self.resize)))
        return self.feed_forward(x).flatten(1)


def build_cp_mobile(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return CPMobile(num_classes, resize=resize)
