"""Models: one module per family, one registry.

* :mod:`~asc_dist.models.resnet` -- torchvision ResNets (the 2018 recipe's ResNet-50, ImageNet
  weights) and timm's SE-ResNets, for Table I;
* :mod:`~asc_dist.models.dcase2018` -- the DCASE 2018 task 1 baseline CNN;
* :mod:`~asc_dist.models.cp_mobile` -- the DCASE 2024/2025 task 1 baseline (simplified CP-Mobile);
* :mod:`~asc_dist.models.timm_models` -- any timm architecture (``timm:<name>``);
* :mod:`~asc_dist.models.passt` -- PaSST via hear21passt, with the AudioSet weights;
* :mod:`~asc_dist.models.registry` -- the names (``model.name``), building, checking, loading;
* :mod:`~asc_dist.models.hub` -- the weights registry (published files without a hash in their
  name, and the sha256 record that checks them);
* :mod:`~asc_dist.models.common` -- the input check, state-dict loading with a report, device
  placement, autocast, the per-step generator and gradient checkpointing hooks.

Everything callers use is importable from ``asc_dist.models``. Importing it imports torch only:
torchvision, timm and hear21passt are imported when a model of theirs is built.
"""

from asc_dist.models.common import (
    CpuBf16Autocast,
    LoadReport,
    adapt_input,
    autocast,
    load_pretrained,
    prepare_model,
    read_state_dict,
    set_grad_checkpointing,
    use_generator,
)
from asc_dist.models.cp_mobile import CPMobile, make_divisible
from asc_dist.models.dcase2018 import DcaseBaseline
from asc_dist.models.passt import PaSST
from asc_dist.models.registry import (
    MODELS,
    PREFIXED,
    build_model,
    check_grad_checkpointing,
    check_model,
    pretrained_file,
)
from asc_dist.models.resnet import RESNETS, imagenet_weights, imagenet_weights_file
from asc_dist.models.timm_models import TIMM, SpecTimm

__all__ = [
    "MODELS", "PREFIXED", "RESNETS", "TIMM", "CPMobile", "CpuBf16Autocast", "DcaseBaseline",
    "LoadReport", "PaSST", "SpecTimm", "adapt_input", "autocast", "build_model",
    "check_grad_checkpointing", "check_model", "imagenet_weights", "imagenet_weights_file",
    "load_pretrained", "make_divisible", "prepare_model", "pretrained_file", "read_state_dict",
    "set_grad_checkpointing", "use_generator",
]
