"""The DCASE 2025 task 1 inference package, written from a device set or a checkpoint::

    python -m asc_dist.export DEVSET_OR_CKPT --dcase2025 OUT --label Lastname_INST_task1 [--index 1]

The challenge asks for inference code with a fixed API (CPJKU/dcase2025_task1_inference): an
installable package named after the submission label holding modules ``<label>_1`` ...
``<label>_4``, each with ``load_model``, ``load_inputs``, ``get_model_for_device`` and
``predict`` (asc_dist/submission_runtime.py says what each does). ``OUT`` becomes::

    OUT/setup.py, requirements.txt, README.md
    OUT/<label>/__init__.py
    OUT/<label>/_runtime.py                    asc_dist/submission_runtime.py, verbatim
    OUT/<label>/<label>_<i>.py                 the API, bound to ckpts/<label>_<i>/
    OUT/<label>/ckpts/<label>_<i>/             model.json, frontend.pt, general.pt, <device>.pt
    OUT/<label>/resources/<label>_<i>/complexity.json
    OUT/<label>/run.py                         python -m <label>.run: output.csv as the official
                                               evaluation script writes it

The package imports torch, numpy and soundfile (and soxr when the training audio was resampled
with soxr; requirements.txt says so) and never asc_dist: the front end (the log-mel and the
standardisation) is TorchScript, every network a TorchScript trace of the checkpoint's model,
each checked against the original on the same inputs before the package is put in place. A
single checkpoint serves every device. Models whose ``train.eval_precision`` is fp16 run in
float16 as the baselines' packages do (the front end in float32). ``complexity.json`` is counted
at export by asc_dist.complexity: MACs and parameter bytes (at the deployed precision) for every
device id the official complexity test probes, and their maxima. Calling the command again with
another ``--index`` adds a module to the same package; everything is staged beside ``OUT`` and
swapped in only when complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from asc_dist import atomic
from asc_dist.complexity import LIMITS, count
from asc_dist.errors import UserError
from asc_dist.export import _quiet_jit, example_waves
from asc_dist.frontend import LogMel, clip_samples

log = logging.getLogger(__name__)

FORMAT = "asc-dist-dcase2025/1"
RUNTIME = Path(__file__).with_name("submission_runtime.py")
LABEL = re.compile(r"[A-Z][A-Za-z]*_[A-Za-z0-9]+_task1")
# The device ids the official complexity test probes (dcase2025_task1_inference test_complexity.py)
PROBED = ("a", "b", "c", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10")


class SubmissionError(UserError):
    """A package that cannot be written as asked; the message names the option or file."""


class FrontEnd(nn.Module):
    """wave [B, L] float32 at the model's rate -> standardised log-mel [B, 1, n_mels, frames]."""

    def __init__(self, logmel: nn.Module, standardize: nn.Module):
        super().__init__()
        self.logmel = logmel
        self.standardize = standardize

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.standardize(self.logmel(wave))


def _members(model_or_set) -> dict[str, object]:
    """{"general": Restored, device: Restored, ...} of a device set or one checkpoint."""
    from asc_dist.devices import DeviceSet

    if isinstance(model_or_set, DeviceSet):
        return {"general": model_or_set.general, **model_or_set.members}
    return {"general": model_or_set}


def complexity_record(model_or_set, half: bool) -> dict:
    """complexity.json: per probed device id the model that serves it, its MACs per clip and
    its parameter bytes (2 per parameter in fp16, 4 in fp32), and the maxima."""
    members = _members(model_or_set)
    f = model_or_set.cfg.features
    shape = [1, 1, int(f.n_mels), int(f.frames)]
    counts = {name: count(r.model, shape) for name, r in members.items()}
    per_param = 2 if half else 4
    devices = {}
    for d in PROBED:
        name = d if d in members else "general"
        devices[d] = {"model": name, "MACs": counts[name].macs,
                      "Params": counts[name].params * per_param}
    limits = LIMITS["dcase2025"]
    record = {"input": shape, "clip_seconds": float(f.clip_seconds),
              "precision": "fp16" if half else "fp32", "devices": devices,
              "max_MACs": max(v["MACs"] for v in devices.values()),
              "max_Params": max(v["Params"] for v in devices.values()),
              "limits": {"MACs": limits["macs_per_second"] * float(f.clip_seconds),
                         "Params": limits["param_bytes"]}}
    record["within_limits"] = (record["max_MACs"] <= record["limits"]["MACs"]
                               and record["max_Params"] <= record["limits"]["Params"])
    return record


def _trace(model: nn.Module, example: torch.Tensor, name: str, atol: float
           ) -> tuple[torch.jit.ScriptModule, float]:
    """A TorchScript trace of ``model`` (CPU, float32), checked on another batch size."""
    model = model.cpu().float().eval()
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(model, example[:2], check_trace=False)
        diff = float((traced(example) - model(example)).abs().max())
    if not diff <= atol:
        raise SubmissionError(f"the traced {name} model differs from the checkpoint's by "
                              f"{diff:.3g} > {atol} on the same inputs: it cannot be exported as "
                              f"TorchScript")
    return traced, diff


def _frontend(restored, waves: torch.Tensor, atol: float) -> tuple[torch.jit.ScriptModule, float]:
    eager = FrontEnd(LogMel(restored.cfg.features), restored.standardize.cpu()).eval()
    with torch.no_grad(), _quiet_jit():
        scripted = torch.jit.script(eager)
        diff = float((scripted(waves) - eager(waves)).abs().max())
    if not diff <= atol:
        raise SubmissionError(f"the scripted front end differs from the checkpoint's by {diff:.3g}")
    return scripted, diff


def _requirements(package: Path) -> list[str]:
    """What every module of the package needs: soxr only where a model's audio was soxr's."""
    needs = ["torch", "numpy", "soundfile"]
    for meta in sorted(package.glob("ckpts/*/model.json")):
        if json.loads(meta.read_text())["resampler"] != "torchaudio" and "soxr" not in needs:
            needs.append("soxr")
    return needs


SETUP = '''"""The DCASE 2025 task 1 submission {label}, written by asc_dist.export --dcase2025."""

from pathlib import Path

from setuptools import setup

setup(
    name="{label}",
    version="1.0.0",
    packages=["{label}"],
    package_data={{"{label}": ["ckpts/*/*", "resources/*/*"]}},
    python_requires=">=3.11",
    install_requires=[line.strip() for line in
                      (Path(__file__).parent / "requirements.txt").read_text().splitlines()
                      if line.strip()],
)
'''

MODULE = '''"""DCASE 2025 task 1 submission {label}_{index} (asc_dist.export --dcase2025):
{what}."""

from pathlib import Path

from {label}._runtime import Submission

_SUBMISSION = Submission(Path(__file__).parent / "ckpts" / "{label}_{index}")


def load_model(model_file_path=None):
    return _SUBMISSION.load_model(model_file_path)


def load_inputs(file_paths, device_ids, model):
    return _SUBMISSION.load_inputs(file_paths, device_ids, model)


def get_model_for_device(model, device_id):
    return _SUBMISSION.get_model_for_device(model, device_id)


def predict(file_paths, device_ids, model_file_path=None, use_cuda=True):
    return _SUBMISSION.predict(file_paths, device_ids, model_file_path, use_cuda=use_cuda)
'''

RUNNER = '''"""python -m {label}.run --submission {label}_1 (--list FILE [--root DIR] | FILE ...)
    --out DIR

Predicts audio files with one module of this package and writes DIR/output.csv as the official
evaluation script does (tab-separated: filename, scene_label, one softmax probability per class)
and DIR/complexity.json. --list: a tab-separated list with a header naming 'filename' and, where
known, 'device_id' (evaluation_setup/fold1_test.csv); files are read relative to --root. Without a
device_id the last part of a TAU name (...-s2.wav) is the device.
"""

import argparse
import csv
import importlib
import shutil
import sys
from pathlib import Path

from {label}._runtime import write_output


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m {label}.run",
                                description=__doc__.split("\\n\\n")[0])
    p.add_argument("--submission", default="{label}_1", help="module name ({label}_1 ... _4)")
    p.add_argument("--list", help="filename[/device_id] list (tab-separated, header)")
    p.add_argument("--root", default=".", help="the folder the list's names are relative to")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cuda", action="store_true", help="use a GPU when there is one")
    p.add_argument("files", nargs="*")
    a = p.parse_args(argv)
    names, devices = list(a.files), []
    if a.list:
        with open(a.list, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\\t"))
        names = [r["filename"] for r in rows]
        devices = [r.get("device_id") for r in rows]
    if not names:
        p.error("no files: give --list or files")
    devices = [d or Path(n).stem.rsplit("-", 1)[-1]
               for n, d in zip(names, devices or [None] * len(names))]
    module = importlib.import_module(f"{label}.{{a.submission}}")
    paths = [str(Path(a.root) / n) if a.list else n for n in names]
    logits, classes = module.predict(paths, devices, use_cuda=a.cuda)
    out = Path(a.out)
    write_output(out / "output.csv", names, logits, classes)
    shutil.copyfile(Path(module.__file__).parent / "resources" / a.submission / "complexity.json",
                    out / "complexity.json")
    print(f"{{len(names)}} files -> {{out / 'output.csv'}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''


def write_package(model_or_set, out: str | Path, label: str, index: int = 1, *,
                  overwrite: bool = False, atol: float = 1e-4) -> dict:
    """Write (or add module ``index`` to) the package ``out`` (module doc); returns model.json."""
    from asc_dist.devices import DeviceSet

    if not LABEL.fullmatch(label):
        raise SubmissionError(f"--label {label!r}: a DCASE submission label reads "
                              f"Lastname_INSTITUTION_task1 (letters and digits, e.g. "
                              f"Schmid_CPJKU_task1)")
    if not 1 <= index <= 4:
        raise SubmissionError(f"--index {index}: a package holds submissions 1 to 4")
    out = Path(out)
    if out.exists() and not (out / label / "_runtime.py").is_file() and any(out.iterdir()):
        raise SubmissionError(f"{out} exists and is not the package {label} (no "
                              f"{label}/_runtime.py): give another folder")
    name = f"{label}_{index}"
    if (out / label / "ckpts" / name).exists() and not overwrite:
        raise SubmissionError(f"{out} already holds {name}: pass --overwrite to replace it, or "
                              f"another --index")
    members = _members(model_or_set)
    general = members["general"]
    half = general.half
    waves = example_waves(general.cfg.features, batch=3, seed=7)
    frontend, fdiff = _frontend(general, waves, atol)
    traced, diffs = {}, {"frontend": fdiff}
    with torch.no_grad():
        for key, r in members.items():  # each on its own inputs (a set's members share them)
            x = r.standardize.cpu()(LogMel(r.cfg.features)(waves))
            traced[key], diffs[key] = _trace(r.model, x, key, atol)
    f = general.cfg.features
    is_set = isinstance(model_or_set, DeviceSet)
    meta = {
        "format": FORMAT, "label": label, "index": index, "classes": list(general.classes),
        "sample_rate": int(f.sample_rate), "clip_samples": clip_samples(f),
        "resampler": general.resampler, "half": half, "frontend": "frontend.pt",
        "general": "general.pt", "members": {d: f"{d}.pt" for d in members if d != "general"},
        "model": general.cfg.model.name,
        "source": str(model_or_set.path), "step": general.step,
        "check": {"atol": atol, "max_abs_diff": diffs},
    }
    complexity = complexity_record(model_or_set, half)
    with atomic.staged_dir(out, overwrite=True) as tmp:
        if out.is_dir():  # the modules already there stay
            shutil.copytree(out, tmp, dirs_exist_ok=True)
        pkg = tmp / label
        ckpt = pkg / "ckpts" / name
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
        (pkg / "resources" / name).mkdir(parents=True, exist_ok=True)
        with _quiet_jit():
            frontend.save(str(ckpt / "frontend.pt"))
            for key, module in traced.items():
                module.save(str(ckpt / f"{key}.pt"))
        (ckpt / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        (pkg / "resources" / name / "complexity.json").write_text(
            json.dumps(complexity, indent=2) + "\n")
        shutil.copyfile(RUNTIME, pkg / "_runtime.py")
        (pkg / "__init__.py").write_text(f'"""DCASE 2025 task 1 submission package {label}."""\n')
        what = (f"device set {Path(model_or_set.path).name} (general model + "
                f"{', '.join(meta['members'])})" if is_set
                else f"checkpoint {Path(model_or_set.path).name} for every device")
        (pkg / f"{name}.py").write_text(MODULE.format(label=label, index=index, what=what))
        (pkg / "run.py").write_text(RUNNER.format(label=label))
        (tmp / "setup.py").write_text(SETUP.format(label=label))
        (tmp / "requirements.txt").write_text("\n".join(_requirements(pkg)) + "\n")
        modules = sorted(p.stem for p in pkg.glob(f"{label}_[1-4].py"))
        (tmp / "README.md").write_text(
            f"# {label}\n\nDCASE 2025 task 1 inference package written by asc_dist.export "
            f"--dcase2025: modules {', '.join(modules)}.\n\n    pip install .\n    python -m "
            f"{label}.run --submission {label}_1 --list fold1_test.csv --root DATASET --out "
            f"predictions/{label}_1\n")
    log.info(f"wrote {name} into {out} ({'fp16' if half else 'fp32'}; round trip max |diff|: "
             + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
             + f"); complexity: max {complexity['max_MACs']:,} MACs, {complexity['max_Params']:,} "
               f"B of parameters"
             + ("" if complexity["within_limits"] else " (over DCASE 2025's limits)"))
    return meta
