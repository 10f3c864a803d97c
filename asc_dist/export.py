"""Export a checkpoint for inference without this package: waveform in, logits out.

    python -m asc_dist.export CHECKPOINT --out model_dir [--format both|torchscript|export] [--overwrite]

``model_dir/`` receives:

* ``model.pt`` -- TorchScript module: mono float waveform ``[B, L]`` (or ``[L]``, any ``L``) at
  ``features.sample_rate`` -> logits ``[B, num_classes]``. It holds the whole front end
  (zero-pad/crop to the clip length, the log-mel, the training-split standardisation), so the
  caller only decodes, downmixes and resamples. ``module.features(wave)`` returns the
  standardised log-mel ``[B, 1, n_mels, frames]`` the network sees. ``model.json`` is embedded
  too (``torch.jit.load(path, _extra_files={"model.json": ""})``). Loads in libtorch (C++) as well.
* ``model.pt2`` -- the same pipeline as a ``torch.export`` program (TorchScript is deprecated in
  recent torch): dynamic batch, but exactly ``clip_samples`` samples per row; pad/crop first
  (``load_model.py`` does).
* ``model.json`` -- classes (logit order), the input contract, front-end parameters,
  standardisation mean/std, the source checkpoint and the round-trip check's result.
* ``load_model.py`` -- a loader that imports only torch (``load(model_dir)``, ``classify``) and a
  small CLI for audio files (decoding needs soundfile, resampling soxr: asc_dist.audio's path).

The network is traced for TorchScript (torchvision's ResNet forward calls ``super()``, which
scripting rejects) inside a scripted front end, so any batch size and length work. Every format
written is loaded back and compared with the checkpoint's model on the same waveforms before the
directory is put in place; a difference beyond ``--atol`` fails the export.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from asc_dist import atomic
from asc_dist.cli import command
from asc_dist.errors import ConfigError
from asc_dist.frontend import LogMel, clip_samples, fix_length, periodic_window, preemphasis
from asc_dist.restore import restore

log = logging.getLogger(__name__)

FORMAT = "asc-dist-export/1"
FILES = {"torchscript": "model.pt", "export": "model.pt2"}
META_FILE = "model.json"
LOADER_FILE = "load_model.py"
MAX_BATCH = 4096  # upper bound of the exported program's dynamic batch dimension


class ExportError(RuntimeError):
    """A format could not be built, or its round trip differs from the checkpoint's model."""


class WaveformClassifier(nn.Module):
    """wave ``[B, L]`` at the feature rate -> logits: pad/crop, log-mel, standardise, network."""

    def __init__(self, logmel: nn.Module, standardize: nn.Module, network: nn.Module):
        super().__init__()
        self.logmel = logmel
        self.standardize = standardize
        self.network = network

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.network(self.features(wave))

    @torch.jit.export
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        return self.standardize(self.logmel(wave))


@contextmanager
def _quiet_jit():
    # torch 2.11 marks torch.jit deprecated; we choose it knowingly (and write torch.export too).
    # The models' input-shape check turns into a constant when traced: the front end fixes it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.export.load wraps its read-only archive buffers; nothing writes to them.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        yield


def example_waves(cfg_features: Any, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Deterministic noise of differing loudness, one clip long: the round-trip check's input."""
    g = torch.Generator().manual_seed(seed)
    n = clip_samples(cfg_features)
    gains = torch.logspace(-3, -0.5, batch).unsqueeze(1)
    return torch.randn(batch, n, generator=g) * gains


def eager_pipeline(restored) -> WaveformClassifier:
    """The checkpoint's model behind the training front end, on CPU in float32."""
    network = restored.model.cpu().float().eval()
    return WaveformClassifier(LogMel(restored.cfg.features), restored.standardize.cpu(), network).eval()


def build_torchscript(restored) -> torch.jit.ScriptModule:
    """Script the front end, trace the network, script the combination."""
    eager = eager_pipeline(restored)
    with torch.no_grad(), _quiet_jit():
        feats = eager.features(example_waves(restored.cfg.features, batch=2))
        traced = torch.jit.trace(eager.network, feats, check_trace=True)
        module = WaveformClassifier(torch.jit.script(eager.logmel), torch.jit.script(eager.standardize),
                                    traced)
        return torch.jit.script(module.eval())


def build_exported(restored) -> torch.export.ExportedProgram:
    """torch.export of the whole pipeline; dynamic batch, the clip length fixed."""
    eager = eager_pipeline(restored)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(eager, (example_waves(restored.cfg.features, batch=2),),
                                   dynamic_shapes=({0: batch},))


def metadata(restored, files: dict[str, str], check: dict) -> dict:
    f = restored.cfg.features
    stats = restored.standardize
    return {
        "format": FORMAT,
        "files": {**files, "loader": LOADER_FILE},
        "classes": list(restored.classes),
        "input": {
            "kind": "waveform", "shape": "[B, L] float32 (model.pt also [L])",
            "sample_rate": int(f.sample_rate),
            "channels": "mono (average the channels of multi-channel audio)",
            "resampler": restored.resampler,
            "scale": "float in [-1, 1] (soundfile dtype='float32')",
            "clip_samples": clip_samples(f),
            "length": "model.pt: any L, zero-padded or cropped to clip_samples inside; "
                      "model.pt2: exactly clip_samples (pad/crop first)",
        },
        "output": "logits [B, num_classes] in the order of 'classes' (softmax for probabilities)",
        "methods": {"forward(wave)": "logits",
                    "features(wave)": "standardised log-mel [B, 1, n_mels, frames] (model.pt only)"},
        "front_end": {
            **OmegaConf.to_container(f, resolve=True),
            "window": f"hann ({'periodic' if periodic_window(f) else 'symmetric'})",
            "power": 2.0, "center": True, "pad_mode": "reflect",
            "log_formula": ("10*log10(max(power, 10**(floor_db/10))), reference 1.0"
                            if f.log == "db" else "ln(power + log_eps)")
                           + ", then (x + log_offset) / log_divisor; last frames cropped to 'frames'"
                           + ("; pre-emphasis first: one sample shorter" if preemphasis(f) else ""),
        },
        "standardization": {
            "formula": "(logmel - mean) / std per mel bin (std as applied: clamped at >= 0.01)",
            "mean": stats.mean.flatten().tolist(), "std": stats.std.flatten().tolist(),
        } if hasattr(stats, "mean") else None,
        "model": restored.cfg.model.name,
        "source": {"checkpoint": str(restored.path), "step": restored.step, "run": restored.cfg.name},
        "torch_version": torch.__version__,
        "check": check,
        "load": "import sys; sys.path.insert(0, MODEL_DIR); from load_model import load, classify; "
                "module, meta = load(MODEL_DIR); labels, probs = classify(module, meta, wave)",
    }


LOADER = '''"""Load an asc-dist exported scene classifier with torch alone (no asc_dist, no torchaudio).

    from load_model import load, classify
    module, meta = load("model_dir")                 # model.pt (TorchScript); format="export": model.pt2
    labels, probs = classify(module, meta, wave)     # wave: [B, L] float mono at meta["input"]["sample_rate"]

CLI: python load_model.py MODEL_DIR AUDIO...   (decoding needs soundfile; resampling soxr)
"""

import json
import os
import sys

import torch


class FixedLength(torch.nn.Module):
    """Zero-pad/crop to the clip length the exported program was built for, then run it."""

    def __init__(self, program_module, clip_samples):
        super().__init__()
        self.inner = program_module
        self.clip_samples = clip_samples

    def forward(self, wave):
        if wave.dim() == 1:
            wave = wave[None]
        n = wave.shape[-1]
        if n >= self.clip_samples:
            wave = wave[..., : self.clip_samples]
        else:
            wave = torch.nn.functional.pad(wave, (0, self.clip_samples - n))
        return self.inner(wave.float().contiguous())


def load(model_dir, device="cpu", format=None):
    with open(os.path.join(model_dir, "model.json")) as f:
        meta = json.load(f)
    files = meta["files"]
    format = format or ("torchscript" if "torchscript" in files else "export")
    path = os.path.join(model_dir, files[format])
    if format == "torchscript":
        return torch.jit.load(path, map_location=device).eval(), meta
    module = torch.export.load(path).module().to(device)
    return FixedLength(module, meta["input"]["clip_samples"]), meta


def classify(module, meta, wave):
    with torch.no_grad():
        probs = module(wave).float().softmax(dim=-1)
    return [meta["classes"][i] for i in probs.argmax(dim=-1).tolist()], probs


def read_audio(path, sample_rate, resampler="soxr-vhq"):
    """Channel mean, then the training data's resampler: soxr "VHQ" in float64, or torchaudio's
    default resample in float32 (meta["input"]["resampler"])."""
    import soundfile as sf

    x, sr = sf.read(path, dtype="float64", always_2d=True)
    x = x.mean(axis=1)
    if sr != sample_rate and resampler == "torchaudio":
        import torchaudio.functional

        return torchaudio.functional.resample(torch.from_numpy(x.astype("float32")), sr, sample_rate)
    if sr != sample_rate:
        import soxr

        x = soxr.resample(x, sr, sample_rate, quality="VHQ")
    return torch.from_numpy(x.astype("float32"))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    module, meta = load(sys.argv[1])
    for path in sys.argv[2:]:
        wave = read_audio(path, meta["input"]["sample_rate"], meta["input"]["resampler"])
        labels, probs = classify(module, meta, wave[None])
        print(f"{path}\\t{labels[0]}\\t{float(probs.max()):.3f}")
'''


def _max_diff(run, waves: list[torch.Tensor], reference: nn.Module, fixed: int | None) -> float:
    diff = 0.0
    with torch.no_grad():
        for w in waves:
            x = w if fixed is None else fix_length(w, fixed)
            got, want = run(x), reference(w)
            if got.shape != want.shape:
                raise ExportError(f"exported module gives {list(got.shape)} logits, the original "
                                   f"{list(want.shape)} for input {list(w.shape)}")
            diff = max(diff, float((got - want).abs().max()))
    return diff


def export(restored, out_dir: str | Path, *, formats: tuple[str, ...] = ("torchscript", "export"),
           overwrite: bool = False, atol: float = 1e-4, strict: bool = False) -> dict:
    """Write ``out_dir`` (model.pt and/or model.pt2, model.json, load_model.py) after round trips.

    Everything is built in a temp dir beside ``out_dir`` and renamed into place, so a failed
    export leaves an existing ``out_dir`` as it was. A format that cannot be built is skipped with
    a warning unless ``strict`` (or it is the only one asked for).
    """
    n = clip_samples(restored.cfg.features)
    fc = restored.cfg.features
    # Batch sizes other than the traced one, and clips shorter and longer than one clip.
    waves = [example_waves(fc, batch=3, seed=1), example_waves(fc, batch=1, seed=2)[:, : n // 3],
             example_waves(fc, batch=2, seed=3).repeat(1, 2)[:, : n + n // 2]]
    reference = eager_pipeline(restored)
    check: dict[str, Any] = {"atol": atol, "inputs": [list(w.shape) for w in waves], "max_abs_diff": {}}
    files: dict[str, str] = {}
    with atomic.staged_dir(out_dir, overwrite=overwrite) as tmp:
        built: dict[str, Any] = {}
        for fmt in formats:
            try:
                built[fmt] = build_torchscript(restored) if fmt == "torchscript" else build_exported(restored)
            except Exception as e:
                if strict or len(formats) == 1:
                    raise ExportError(f"cannot build the {fmt} module: {type(e).__name__}: {e}") from e
                log.warning("skipping the %s format: %s: %s", fmt, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
        if not built:
            raise ExportError("no export format could be built")
        files = {fmt: FILES[fmt] for fmt in built}
        meta = metadata(restored, files, check)
        for fmt, obj in built.items():
            path = tmp / FILES[fmt]
            with _quiet_jit():
                if fmt == "torchscript":
                    obj.save(str(path), _extra_files={META_FILE: json.dumps(meta, indent=2)})
                    loaded = torch.jit.load(str(path), map_location="cpu").eval()
                    check["max_abs_diff"][fmt] = _max_diff(loaded, waves, reference, None)
                else:
                    torch.export.save(obj, str(path))
                    loaded = torch.export.load(str(path)).module()
                    check["max_abs_diff"][fmt] = _max_diff(loaded, waves, reference, n)
        bad = {k: v for k, v in check["max_abs_diff"].items() if not v <= atol}
        if bad:
            raise ExportError(f"exported model differs from the checkpoint's by "
                               f"{', '.join(f'{v:.3g} ({k})' for k, v in bad.items())} > atol {atol} "
                               f"on the same waveforms")
        blob = json.dumps(meta, indent=2)
        if "torchscript" in built:  # again, now that the embedded metadata holds the check's result
            with _quiet_jit():
                built["torchscript"].save(str(tmp / FILES["torchscript"]), _extra_files={META_FILE: blob})
        (tmp / META_FILE).write_text(blob + "\n")
        (tmp / LOADER_FILE).write_text(LOADER)
    return meta


def _dcase2025(args) -> int:
    from asc_dist.devices import load_model_or_set
    from asc_dist.submission import write_package

    if not args.label:
        raise ConfigError("--dcase2025 needs --label (the submission label, e.g. Lastname_INST_task1)")
    overrides = [f"train.eval_precision={args.precision}"] if args.precision else []
    model = load_model_or_set(args.checkpoint, overrides=overrides, device="cpu")
    meta = write_package(model, args.dcase2025, args.label, args.index, overwrite=args.overwrite,
                         atol=args.atol)
    print(json.dumps({"package": str(args.dcase2025), "module": f"{meta['label']}_{meta['index']}",
                      "members": ["general", *meta["members"]], "half": meta["half"]}))
    return 0


@command("asc_dist.export")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asc_dist.export",
        description="Export a checkpoint as a waveform->logits module (TorchScript model.pt and "
                    "torch.export model.pt2) with its front-end parameters, classes and "
                    "standardisation stats (model.json) and a torch-only loader (load_model.py); "
                    "each is checked against the original before it is kept.")
    p.add_argument("checkpoint", help="checkpoint .pt file, a run dir (its newest checkpoint), or "
                                      "for --dcase2025 a device set")
    p.add_argument("--out", help="output directory")
    p.add_argument("--dcase2025", metavar="OUT", default=None,
                   help="write the DCASE 2025 task 1 inference package to OUT instead (needs --label;"
                        " asc_dist/submission.py)")
    p.add_argument("--label", help="--dcase2025: the submission label, e.g. Lastname_INST_task1")
    p.add_argument("--index", type=int, default=1, help="--dcase2025: the module number 1-4 (default 1)")
    p.add_argument("--precision", choices=["fp16", "fp32"], default=None,
                   help="--dcase2025: the networks' precision (default: the model's "
                        "train.eval_precision; the DCASE baselines' packages run fp16)")
    p.add_argument("--format", choices=["both", "torchscript", "export"], default="both",
                   help="both (default; a format that cannot be built is skipped with a warning), "
                        "or only one (then it must succeed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed logit difference in the round-trip check (default 1e-4)")
    args = p.parse_args(argv)
    if args.dcase2025:
        return _dcase2025(args)
    if not args.out:
        raise ConfigError("--out DIR is required (or --dcase2025 OUT --label LABEL)")
    formats = ("torchscript", "export") if args.format == "both" else (args.format,)
    restored = restore(args.checkpoint, device="cpu")
    try:
        meta = export(restored, args.out, formats=formats, overwrite=args.overwrite, atol=args.atol)
    except ExportError as e:  # the model cannot be exported as asked: not an input problem
        log.error("asc_dist.export: %s", e)
        return 1
    diffs = ", ".join(f"{FILES[k]} {v:.1e}" for k, v in meta["check"]["max_abs_diff"].items())
    log.info(f"exported {restored.path} (step {restored.step}, {meta['model']}, "
             f"{len(meta['classes'])} classes) to {args.out}/; round trip max |logit diff|: {diffs}")
    log.info(f"load with torch only: {meta['load']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
