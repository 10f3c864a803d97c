"""Models: torchvision ResNets and timm SE-ResNets adapted to 1-channel log-mels, the DCASE
2018 baseline CNN, the DCASE 2024 task 1 baseline (``cp_mobile``, a simplified CP-Mobile) and
any timm architecture by name (``timm:<name>``, e.g. ``timm:efficientnet_b0``, as a student or
a teacher).

Input is ``[B, 1, n_mels, T]`` float, output ``[B, num_classes]`` logits; any ``T`` works
because every model ends in adaptive pooling.

Pretrained weights (``model.pretrained``):

* ``imagenet`` -- torchvision's ``IMAGENET1K_V1`` weights for the chosen ResNet. V1 is the
  recipe the 2018 paper could have used and the only ImageNet set that exists for every depth
  (resnet18/34 have no V2). The file is read from torch hub's cache,
  ``$TORCH_HOME/hub/checkpoints/<file name of the enum's url>``; it is never downloaded (the
  training machines have no network and a half-written download on a shared cache is worse
  than a clear message), so a missing file fails with the exact name and path to put it at.
* a path to a state dict file (torchvision layout, or one of our own model state dicts);
* ``none`` -- random initialisation.

Input adaptation (``model.input_adapt``): ``sum`` makes conv1 take one channel, its filters
the sum of the pretrained RGB filters (a grey image through the RGB filters gives the same
response); ``repeat`` keeps the 3-channel conv1 and repeats the input three times. With
``model.resize: [H, W]`` the log-mel is bilinearly interpolated to that size first.

Device placement and ``channels_last`` are applied by :func:`prepare_model`, not by
:func:`build_model`, so the model is built (and pretrained weights loaded) on the CPU once and
the same builder serves tests and tools that never touch a GPU. ``torch.compile`` is applied by
the trainer after the DDP wrap (PyTorch's order for overlapping communication).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)

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
IMAGENET_WEIGHTS = "IMAGENET1K_V1"
# Wrappers that training code commonly leaves on state dict keys.
_KEY_PREFIXES = ("module.", "_orig_mod.")


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


class DcaseBaseline(nn.Module):
    """The DCASE 2018 task 1 baseline CNN (Heittola et al.), for Table I's "baseline" row.

    conv 7x7x32 - BN - ReLU - maxpool 5x5 - dropout 0.3 - conv 7x7x64 - BN - ReLU - maxpool -
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


def imagenet_weights(name: str):
    """torchvision's record of ResNet ``name``'s ImageNet weights (URL, hash in the name)."""
    from torchvision.models import get_model_weights

    return get_model_weights(name)[IMAGENET_WEIGHTS]


def imagenet_weights_file(name: str) -> Path:
    """Where torch hub's cache keeps the ImageNet weights of ResNet ``name`` (may not exist)."""
    weights = imagenet_weights(name)
    # Resolved at call time so a changed TORCH_HOME is honoured.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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
        for prefix in _KEY_PREFIXES:
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
    _log_report(report)
    return report


def _log_report(report: LoadReport) -> None:
    log.info("loaded %d tensors from %s", len(report.loaded), report.source)
    # A new head is the point of transfer learning; anything else not loaded deserves a warning.
    def head(k: str) -> bool:
        return k.split(" ")[0].startswith(("fc.", "net.fc.", "classifier."))

    for kind in ("skipped", "missing", "unexpected"):
        keys = getattr(report, kind)
        expected = [k for k in keys if head(k)]
        other = [k for k in keys if not head(k)]
        if expected:
            log.info("%s keys from %s (new head, expected): %s", kind, report.source, expected)
        if other:
            log.warning("%s keys from %s: %s", kind, report.source, other)


Builder = Callable[[str, ModelConfig, int, "tuple[int, int] | None"], nn.Module]


def _resnet(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    from torchvision.models import resnet

    block, layers = RESNETS[name]
    return spec_resnet_class()(getattr(resnet, block), layers, num_classes, m.input_adapt, resize)


def _timm(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return SpecTimm(name, num_classes, m.input_adapt, resize)


def _timm_any(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return SpecTimm(name.removeprefix(TIMM), num_classes, m.input_adapt, resize)


def _dcase_baseline(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return DcaseBaseline(num_classes, resize)


def _cp_mobile(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    return CPMobile(num_classes, resize=resize)


# The one list of model names (model.name): name -> builder. seresnet*: timm's squeeze-and-
# excitation ResNets (Table I's SE-ResNet row); dcase_baseline: the DCASE 2018 baseline CNN;
# cp_mobile: the DCASE 2024 task 1 baseline (61,148 parameters).
MODELS: dict[str, Builder] = {
    **dict.fromkeys(RESNETS, _resnet),
    **dict.fromkeys(("seresnet18", "seresnet34", "seresnet50"), _timm),
    "dcase_baseline": _dcase_baseline,
    "cp_mobile": _cp_mobile,
}
# Families named by a prefix (``prefix:<name>``), resolved by their builder at build time.
# timm:<name>: any timm architecture (``timm.list_models()``), 1-channel stem, random init.
TIMM = "timm:"
PREFIXED: dict[str, Builder] = {TIMM: _timm_any}


def _builder(name: str) -> Builder:
    if name in MODELS:
        return MODELS[name]
    prefix = name.split(":", 1)[0] + ":" if ":" in name else None
    if prefix in PREFIXED and name != prefix:
        return PREFIXED[prefix]
    known = ", ".join([*MODELS, *(f"{p}<name>" for p in PREFIXED)])
    raise ConfigError(f"model.name={name!r}: unknown model; known: {known}")


def check_model(cfg_model: ModelConfig) -> None:
    """What the config layer cannot check about ``model``: a known name, weights that exist."""
    _builder(cfg_model.name)
    if cfg_model.name.startswith(TIMM):
        import timm

        arch = cfg_model.name.removeprefix(TIMM)
        if not timm.is_model(arch):
            near = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise ConfigError(f"model.name={cfg_model.name!r}: timm {timm.__version__} has no model "
                              f"{arch!r}" + (f"; similar: {', '.join(near)}" if near else
                                             " (python -c 'import timm; print(timm.list_models())')"))
    if cfg_model.pretrained == "imagenet" and cfg_model.name not in RESNETS:
        raise ConfigError(f"model.pretrained=imagenet: there are no ImageNet weights for "
                          f"model.name={cfg_model.name}; use model.pretrained=none or a path")


def build_model(cfg_model: ModelConfig, num_classes: int, *, load_weights: bool = True) -> nn.Module:
    """Build ``cfg.model`` with a ``num_classes``-way head, on CPU, pretrained weights loaded
    (``load_weights=False``: the architecture only, ``model.pretrained`` ignored)."""
    resize = tuple(int(s) for s in cfg_model.resize) if cfg_model.resize is not None else None
    model = _builder(cfg_model.name)(cfg_model.name, cfg_model, num_classes, resize)
    if not load_weights:
        return model
    path = pretrained_file(cfg_model)
    if path is not None:
        load_pretrained(model, _read_state_dict(path), source=str(path))
    return model


def pretrained_file(cfg_model: ModelConfig) -> Path | None:
    """The weights file ``model.pretrained`` names (None for ``none``); a ConfigError saying
    where to put it when it is missing."""
    check_model(cfg_model)
    pretrained = str(cfg_model.pretrained)
    if pretrained == "none":
        return None
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
                          "'imagenet', 'none' or a path to a state dict)")
    return path


def prepare_model(model: nn.Module, cfg_model: ModelConfig, device: torch.device | str) -> nn.Module:
    """Move to ``device``; on CUDA apply channels_last (feed it channels_last inputs too)."""
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda" and cfg_model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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
