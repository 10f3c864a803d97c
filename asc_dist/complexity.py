"""Model complexity as the DCASE low-complexity tasks count it: parameters, parameter memory and
multiply-accumulate operations (MACs) per clip, per layer.

The challenge counts with NeSsi, which reads torchinfo's ``total_params`` and
``total_mult_adds``; this module applies the same rules with forward hooks on the leaf modules,
without the dependency:

* a convolution (any ``ConvNd``, transposed too): its parameters (weights and bias) times the
  batch times the output positions -- ``c_in/groups * c_out * k_h * k_w * H_out * W_out`` for a
  bias-free Conv2d;
* a linear layer: its parameters times the output positions (``prod(out.shape[:-1])``; torchinfo
  multiplies by the batch only, the same for the usual ``[B, features]`` input);
* any other module with parameters (batch norm, layer norm, ...): its parameters times the batch
  (a BatchNorm2d of C channels: 2 C, as the DCASE 2024 baseline's table counts it);
* modules without parameters (activations, pooling, shortcut additions): 0.

Parameters are counted once per tensor (shared weights once, where first used); parameters held
outside any called leaf module are listed as one ``(other parameters)`` row, so the per-layer
rows always add up to the totals. The DCASE 2024 task 1 baseline (``model.name=cp_mobile``)
counts 61,148 parameters and 29,419,156 MACs on ``[1, 1, 256, 65]``, its published table.

    python -m asc_dist.complexity [conf.yaml ...] [key=value ...] [--layers] [--json]
    python -m asc_dist.complexity CHECKPOINT|DEVSET [--json]

For a checkpoint or a device set (asc_dist.devices) the trained models are counted on their own
input: each member of a set, and the maxima, which DCASE 2025 holds against the limits (they
apply to every device model separately).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from asc_dist.cli import command
from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)

# Bytes per parameter at the precisions the challenge rules talk about.
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "int8": 1}
# DCASE 2024 task 1: at most 128 kB of parameter memory and 30 M MACs per 1-s clip. DCASE 2025
# keeps them, for each device-specific model separately (CPJKU/dcase2025_task1_baseline README).
LIMITS = {"dcase2024": {"param_bytes": 128_000, "macs_per_second": 30_000_000},
          "dcase2025": {"param_bytes": 128_000, "macs_per_second": 30_000_000}}


@dataclass
class LayerCount:
    name: str  # the module's name in the model ("stages.s1.b1.block.0.0")
    kind: str  # its class name
    input: list[int]  # shape of its first input on the counted call
    output: list[int]
    params: int
    macs: int


@dataclass
class Complexity:
    input: list[int]
    params: int
    macs: int
    layers: list[LayerCount] = field(default_factory=list)

    @property
    def param_bytes(self) -> dict[str, int]:
        return {k: self.params * b for k, b in BYTES_PER_PARAM.items()}

    def to_dict(self, layers: bool = False) -> dict:
        out = {"input": list(self.input), "params": self.params, "macs": self.macs,
               "param_bytes": self.param_bytes}
        if layers:
            out["layers"] = [asdict(layer) for layer in self.layers]
        return out


def _first_tensor(x) -> torch.Tensor | None:
    if torch.is_tensor(x):
        return x
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(x, dict):
        return _first_tensor(list(x.values()))
    return None


def layer_macs(module: nn.Module, params: int, out: torch.Tensor) -> int:
    """MACs of one call of leaf ``module`` holding ``params`` parameters (all of its own, shared
    ones included: the work is done every call) that produced ``out``."""
    if params == 0 or out is None or out.dim() == 0:
        return 0
    shape = list(out.shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        return params * shape[0] * math.prod(shape[2:])
    if isinstance(module, nn.Linear):
        return params * math.prod(shape[:-1])
    return params * shape[0]


def count(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> Complexity:
    """Parameters and MACs of ``model`` on one zero input of ``input_shape``, per leaf module in
    call order. The model runs once in eval mode without gradients (its mode is restored)."""
    shape = [int(s) for s in input_shape]
    leaves = {m: name for name, m in model.named_modules() if not list(m.children())}
    seen_params: set[int] = set()
    layers: list[LayerCount] = []

    def hook(module: nn.Module, args, output) -> None:
        own = list(module.parameters(recurse=False))
        new = [p for p in own if id(p) not in seen_params]
        seen_params.update(id(p) for p in new)
        inp, out = _first_tensor(args), _first_tensor(output)
        layers.append(LayerCount(
            name=leaves[module] or type(module).__name__, kind=type(module).__name__,
            input=list(inp.shape) if inp is not None else [],
            output=list(out.shape) if out is not None else [],
            params=sum(p.numel() for p in new),
            macs=layer_macs(module, sum(p.numel() for p in own), out)))

    handles = [m.register_forward_hook(hook) for m in leaves]
    first = next(model.parameters(), None)
    x = torch.zeros(shape, dtype=first.dtype if first is not None else torch.float32,
                    device=first.device if first is not None else "cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    rest = sum(p.numel() for p in model.parameters() if id(p) not in seen_params)
    if rest:
        layers.append(LayerCount("(other parameters)", "-", [], [], rest, 0))
    return Complexity(input=shape, params=sum(p.numel() for p in model.parameters()),
                      macs=sum(layer.macs for layer in layers), layers=layers)


def over_limits(c: Complexity, limits: str, precision: str, clip_seconds: float) -> list[str]:
    """What exceeds ``complexity.limits`` (none: nothing), in words; MACs are per second of
    audio (the rules count a 1-s clip)."""
    if limits == "none":
        return []
    lim, out = LIMITS[limits], []
    nbytes = c.param_bytes[precision]
    if nbytes > lim["param_bytes"]:
        out.append(f"{nbytes:,} B of parameters at {precision} > {lim['param_bytes']:,} B")
    per_s = c.macs / clip_seconds
    if per_s > lim["macs_per_second"]:
        out.append(f"{per_s:,.0f} MACs per second of audio > {lim['macs_per_second']:,}")
    return out


def for_run(model: nn.Module, cfg) -> tuple[Complexity, dict, list[str]]:
    """The configured model's counts on the configured input: (counts, report.json entry,
    limit violations)."""
    f = cfg.features
    c = count(model, [1, 1, int(f.n_mels), int(f.frames)])
    problems = over_limits(c, cfg.complexity.limits, cfg.complexity.precision, float(f.clip_seconds))
    entry = {**c.to_dict(), "clip_seconds": float(f.clip_seconds), "limits": cfg.complexity.limits,
             "precision": cfg.complexity.precision, "within_limits": not problems}
    return c, entry, problems


def for_models(models: dict[str, nn.Module], input_shape: list[int], *, clip_seconds: float,
               limits: str = "none", precision: str = "fp16") -> dict:
    """Each model's counts on ``input_shape`` and the maxima over them, held against ``limits``
    (what DCASE 2025's complexity.json states per device model)."""
    rows = {name: count(m, input_shape) for name, m in models.items()}
    out: dict = {"input": list(input_shape), "clip_seconds": clip_seconds, "precision": precision,
                 "limits": limits, "models": {}}
    for name, c in rows.items():
        out["models"][name] = {"params": c.params, "param_bytes": c.param_bytes, "macs": c.macs,
                               "over_limits": over_limits(c, limits, precision, clip_seconds)}
    out["max_macs"] = max(c.macs for c in rows.values())
    out["max_params"] = max(c.params for c in rows.values())
    out["max_param_bytes"] = max(c.param_bytes[precision] for c in rows.values())
    out["within_limits"] = not any(r["over_limits"] for r in out["models"].values())
    return out


def format_models(counts: dict) -> str:
    """A table of :func:`for_models`' counts, one row per model, and the maxima."""
    p = counts["precision"]
    lines = [f"| model | parameters | bytes ({p}) | MACs per clip {counts['input']} | limits |",
             "|---|---:|---:|---:|---|"]
    for name, r in counts["models"].items():
        lines.append(f"| {name} | {r['params']:,} | {r['param_bytes'][p]:,} | {r['macs']:,} | "
                     f"{'; '.join(r['over_limits']) or ('within' if counts['limits'] != 'none' else '-')} |")
    lines.append(f"| **max** | {counts['max_params']:,} | {counts['max_param_bytes']:,} | "
                 f"{counts['max_macs']:,} | {counts['limits']} |")
    return "\n".join(lines)


def format_layers(c: Complexity) -> str:
    """A per-layer table (layers with neither parameters nor MACs left out) and its sum."""
    rows = [(layer.name, layer.kind, str(layer.input), f"{layer.params:,}", f"{layer.macs:,}")
            for layer in c.layers if layer.params or layer.macs]
    rows.append(("sum", "", "", f"{c.params:,}", f"{c.macs:,}"))
    head = ("layer", "type", "input", "params", "MACs")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def format_summary(c: Complexity, model_name: str) -> str:
    b = c.param_bytes
    return "\n".join([
        f"model       {model_name}",
        f"input       {c.input}",
        f"parameters  {c.params:,}",
        f"memory      fp32 {b['fp32']:,} B, fp16 {b['fp16']:,} B, int8 {b['int8']:,} B",
        f"MACs/clip   {c.macs:,}",
    ])


@command("asc_dist.complexity")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.complexity",
        description="Parameters, parameter memory (fp32/fp16/int8 bytes) and MACs per clip of the "
                    "configured model on the configured input [1, 1, features.n_mels, "
                    "features.frames], counted as the DCASE challenge counts them.")
    p.add_argument("config", nargs="*", help="YAML files, then key=value overrides; or one "
                                             "checkpoint, run dir or device set")
    p.add_argument("--layers", action="store_true", help="also print a per-layer table")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--limits", choices=["none", *LIMITS], default=None,
                   help="for a checkpoint or set: the limits to hold the models to (default: the "
                        "run's complexity.limits)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from asc_dist import config
    from asc_dist.models import build_model

    if len(args.config) == 1 and not args.config[0].endswith((".yaml", ".yml")) \
            and "=" not in args.config[0]:
        return _trained(args.config[0], args)

    cfg = config.load(args.config)
    if cfg.num_classes is None or int(cfg.num_classes) < 1:
        raise ConfigError(f"num_classes={cfg.num_classes}: need a positive number of classes")
    # Architecture only: the weights do not change the counts (model.pretrained is not read).
    model = build_model(cfg.model, int(cfg.num_classes), load_weights=False)
    shape = [1, 1, int(cfg.features.n_mels), int(cfg.features.frames)]
    log.info("counting %s (%d classes) on input %s", cfg.model.name, cfg.num_classes, shape)
    c = count(model, shape)
    problems = over_limits(c, cfg.complexity.limits, cfg.complexity.precision,
                           float(cfg.features.clip_seconds))
    for problem in problems:
        log.warning("complexity.limits=%s exceeded: %s", cfg.complexity.limits, problem)
    if args.json:
        out = {**c.to_dict(layers=args.layers), "model": cfg.model.name,
               "limits": cfg.complexity.limits, "over_limits": problems}
        print(json.dumps(out, indent=2))
        return 0
    print(format_summary(c, cfg.model.name))
    if args.layers:
        print()
        print(format_layers(c))
    return 0


def trained_counts(model_or_set, limits: str | None = None) -> dict:
    """:func:`for_models` of a restored checkpoint (``model``) or device set (``general`` and one
    row per device) on its input, at its complexity.precision, held to ``limits`` (default:
    its complexity.limits)."""
    from asc_dist.devices import DeviceSet

    cfg = model_or_set.cfg
    if isinstance(model_or_set, DeviceSet):
        models = {"general": model_or_set.general.model,
                  **{d: r.model for d, r in model_or_set.members.items()}}
    else:
        models = {"model": model_or_set.model}
    f = cfg.features
    return for_models(models, [1, 1, int(f.n_mels), int(f.frames)],
                      clip_seconds=float(f.clip_seconds),
                      limits=limits or str(cfg.complexity.limits),
                      precision=str(cfg.complexity.precision))


def _trained(path: str, args) -> int:
    from asc_dist.devices import load_model_or_set

    counts = trained_counts(load_model_or_set(path), args.limits)
    for name, r in counts["models"].items():
        for problem in r["over_limits"]:
            log.warning("%s: complexity.limits=%s exceeded: %s", name, counts["limits"], problem)
    print(json.dumps(counts, indent=2) if args.json else format_models(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
