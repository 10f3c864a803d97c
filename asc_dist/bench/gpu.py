"""``bench gpu OUT_DIR``: verify a GPU node end to end and measure it, in one command (<= 8 min).

``launch/gpu_check.sh OUT_DIR`` runs this in the python it is given. Steps, each recorded in
``OUT_DIR/results.json`` and ``OUT_DIR/summary.md`` whether it passes, fails or cannot run here:

1. the ``gpu``-marked tests (when pytest and the tests are present);
2. front-end parity: the DALI and torch log-mel on the device vs the CPU (max dB);
3. a bf16 training run at the paper's input shape, stopped by SIGTERM and resumed;
4. evaluate and predict on the device vs the CPU (float32, TF32 off: they must agree);
5. throughput at per-GPU batch 64 and 256: the model alone on resident tensors (the ceiling),
   a plain PyTorch loop as a user would write it (torchvision ResNet-50, fused Adam, bf16,
   channels_last, features resident), and the real trainer with each data backend, cached and
   streamed: clips/s, step ms (CUDA events), data-wait %, peak memory, model FLOP utilisation.

It makes its own synthetic data, needs no network and changes no environment. ``--device cpu
--quick`` runs every step at toy size on a CPU (the test suite does, so this cannot rot).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from asc_dist import atomic, torchrun
from asc_dist.bench import machine
from asc_dist.bench.throughput import throughput, train_args
from asc_dist.data import dali_available

log = logging.getLogger(__name__)

PAPER_FEATURES = ["features.clip_seconds=10.0", "features.frames=320"]
QUICK_FEATURES = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
                  "features.hop_length=500", "features.f_max=8000", "features.clip_seconds=1.0",
                  "features.frames=32"]
# The gpu-marked tests build their own data and CPU smoke runs first: generous, inside the 8 minutes
GPU_TESTS_TIMEOUT_S = 420


class Check:
    """Runs the steps, records each (never letting one failure stop the others), writes files."""

    def __init__(self, out: Path, device: str, quick: bool) -> None:
        self.out, self.device, self.quick = out, torch.device(device), quick
        self.results: dict = {"machine": machine(), "device": device, "quick": quick,
                              "torch": torch.__version__, "steps": {}, "throughput": []}
        self.features = QUICK_FEATURES if quick else PAPER_FEATURES
        self.model = "model.name=resnet18" if quick else "model.name=resnet50"

    def step(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        log.info(f"[gpu_check] {name} ...")
        try:
            rec = {"status": "ok", **(fn() or {})}
        except Skip as e:
            rec = {"status": "not run", "why": str(e)}
        except Exception as e:  # noqa: BLE001 - recorded; the other steps still run
            rec = {"status": "failed", "why": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-4000:]}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.results["steps"][name] = rec
        log.info(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s)"
                 + (f": {rec['why']}" if "why" in rec else ""))
        self.write()

    def write(self) -> None:
        atomic.write_text(self.out / "results.json", json.dumps(self.results, indent=2, default=str))
        atomic.write_text(self.out / "summary.md", summary(self.results))


class Skip(Exception):
    """A step that cannot run here (no DALI, no pytest): recorded as 'not run' with the reason."""


def make_data(out: Path, quick: bool) -> Path:
    """Synthetic TUT-layout scenes at the checked input shape, packed: OUT/shards."""
    from asc_dist import pack, synth

    shards = out / "shards"
    if not (shards / "train" / "manifest.json").is_file():
        ds = synth.generate(out / "data", clips_per_class=4 if quick else 32,
                            duration=1.0 if quick else 10.0, sample_rate=16000 if quick else 48000,
                            channels=1, seed=0, workers=os.cpu_count() or 1, overwrite=True,
                            progress=False)
        pack.pack(ds, shards, sample_rate=16000 if quick else 48000, workers=os.cpu_count() or 1,
                  overwrite=True, progress=False, verbose=False)
    return shards


def gpu_tests(ck: Check) -> dict:
    tests = Path(__file__).resolve().parents[2] / "tests"
    if not tests.is_dir():
        raise Skip(f"no tests/ beside the package ({tests})")
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Skip("pytest is not installed in this python") from None
    # --quick (a CPU, where they all skip) checks the plumbing on one file, not the whole suite
    where = tests / "test_features.py" if ck.quick else tests
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            str(where)], capture_output=True, text=True, timeout=GPU_TESTS_TIMEOUT_S,
                           cwd=tests.parent)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        raise RuntimeError(f"the gpu tests did not finish in {GPU_TESTS_TIMEOUT_S} s; output so far:\n"
                           f"{out[-2000:]}") from None
    last = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode not in (0, 5):
        raise RuntimeError(f"{last}\n{p.stdout[-3000:]}")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected)", last)}
    return {"summary": last, **counts}


def _features_by_key(cfg, backend: str, device: torch.device) -> dict:
    from asc_dist.bench import with_values
    from asc_dist.data import build_source

    with build_source(with_values(cfg, {"data.backend": backend}), "test", train=False, rank=0,
                      world_size=1, device=device, batch_size=8, cache="none") as src:
        return {k: x.float().cpu() for b in src.epoch(0)
                for k, x, ok in zip(b.keys, b.features, b.valid.tolist()) if ok}


def parity(ck: Check, shards: Path) -> dict:
    from asc_dist import config

    cfg = config.load([*ck.features, f"data.shards={shards}"], world_size=1)
    cpu = torch.device("cpu")
    backends = ["torch"] + (["dali"] if dali_available() else [])
    out = {}
    feats = {(b, d.type): _features_by_key(cfg, b, d)
             for b in backends for d in {cpu, ck.device}}

    def max_db(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    for b in backends:
        if ck.device.type != "cpu":
            out[f"{b}_{ck.device.type}_vs_cpu_max_db"] = max_db(feats[(b, ck.device.type)], feats[(b, "cpu")])
    if "dali" in backends:
        out["dali_vs_torch_cpu_max_db"] = max_db(feats[("dali", "cpu")], feats[("torch", "cpu")])
    else:
        out["dali"] = "not installed: DALI comparisons not run"
    worst = max((v for v in out.values() if isinstance(v, float)), default=0.0)
    if worst > 0.01:
        raise RuntimeError(f"front ends differ by {worst:.4f} dB (> 0.01 dB): {out}")
    return out


def stop_resume(ck: Check, shards: Path) -> dict:
    """SIGTERM mid-run (exit 3, checkpoint), then the same command resumes and finishes."""
    run_dir = ck.out / "runs" / "stop-resume"
    steps = 8 if ck.quick else 30
    args = train_args(ck, shards, run_dir, f"train.max_iters={steps}", "train.log_every=1",
                       f"train.eval_every={steps}", "train.ckpt_every=1000", "resume=auto",
                       f"train.global_batch={4 if ck.quick else 32}")
    cmd = torchrun.command(args)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in p.stdout:
        log.append(line)
        if re.search(rf"step\s+{steps // 3}/", line):
            p.send_signal(signal.SIGTERM)
    if p.wait() != 3:
        raise RuntimeError(f"stopped run exited {p.returncode}, expected 3:\n{''.join(log)[-2000:]}")
    stopped = int(re.search(r"checkpointed at step (\d+)", "".join(log)).group(1))
    again = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=600)
    if again.returncode != 0 or f"at step {stopped}" not in again.stdout:
        raise RuntimeError(f"resume failed (exit {again.returncode}):\n{again.stdout[-4000:]}")
    acc = re.search(r"class-wise accuracy: ([\d.]+)", again.stdout)
    return {"precision": "bf16" if ck.device.type == "cuda" else "fp32 (CPU)",
            "stopped_at": stopped, "finished_at": steps, "run_dir": str(run_dir),
            "classwise_accuracy": float(acc.group(1)) if acc else None}


def inference_parity(ck: Check, shards: Path) -> dict:
    """evaluate and predict of the stop/resume run's model on the device vs the CPU, float32."""
    from asc_dist import evaluate, predict
    from asc_dist.validate import read_predictions

    run_dir = ck.out / "runs" / "stop-resume"
    if not (run_dir / "checkpoints").is_dir():
        raise Skip("the stop/resume run left no checkpoint")
    if ck.device.type == "cpu":
        raise Skip("no accelerator: nothing to compare the CPU with")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides: they must agree
    torch.backends.cudnn.allow_tf32 = False
    probs = {}
    for dev in ("cpu", ck.device.type):
        out = ck.out / f"eval-{dev}"
        rc = evaluate.main([str(run_dir), "--split", str(shards / "test"), "--out", str(out),
                            "--backend", "torch", "--device", dev, "train.precision=fp32", "--quiet"])
        if rc != 0:
            raise RuntimeError(f"evaluate --device {dev} exited {rc}")
        probs[dev] = read_predictions(out / "predictions.tsv")[1]
        wavs = sorted((ck.out / "data" / "audio").glob("*.wav"))[:8]
        rc = predict.main([str(run_dir), *map(str, wavs), "--scores", "--device", dev, "--precision", "fp32",
                           "--workers", "0", "--out", str(ck.out / f"predict-{dev}.tsv"), "--quiet"])
        if rc != 0:
            raise RuntimeError(f"predict --device {dev} exited {rc}")
    diff = max(float(abs(probs["cpu"][k][1] - probs[ck.device.type][k][1]).max()) for k in probs["cpu"])
    rows = [open(ck.out / f"predict-{d}.tsv").read().splitlines()[1:] for d in ("cpu", ck.device.type)]
    pdiff = max(abs(float(a) - float(b)) for ra, rb in zip(*rows)
                for a, b in zip(ra.split("\t")[2:], rb.split("\t")[2:]))
    if diff > 1e-3 or pdiff > 1e-3:
        raise RuntimeError(f"device and CPU disagree: evaluate {diff:.2e}, predict {pdiff:.2e}")
    return {"evaluate_max_prob_diff": diff, "predict_max_prob_diff": pdiff, "precision": "fp32, TF32 off"}


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def summary(results: dict) -> str:
    lines = [f"# GPU check ({results['device']}{', quick' if results['quick'] else ''})", "",
             f"machine: {results['machine']}; torch {results['torch']}", "",
             "| step | status | seconds | details |", "|---|---|---:|---|"]
    for name, rec in results["steps"].items():
        details = rec.get("why") or ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("status", "seconds", "traceback", "run_dir"))
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {details} |")
    lines += ["", "| variant | batch | clips/s | step ms | data wait % | peak GiB | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["throughput"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | failed: {r['error'][:120]} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['batch']} | {r['clips_per_s']:.0f} | {r['step_ms']:.1f} | "
                     f"{r['data_wait_pct']:.1f} | {_fmt(r.get('peak_mem_gb'), '.2f')} | "
                     f"{_fmt(r.get('mfu'), '.1%')} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from asc_dist.errors import ConfigError

        raise ConfigError("--device cuda but CUDA is not available on this machine")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ck = Check(out, device, args.quick)
    t0 = time.perf_counter()
    if not dali_available():
        log.warning("[gpu_check] NVIDIA DALI is not importable here: its steps are skipped")
    if not args.skip_tests:
        ck.step("gpu tests", lambda: gpu_tests(ck))
    shards = {}
    ck.step("synthetic data", lambda: shards.update(path=make_data(out, args.quick)) or {
        "shards": str(out / "shards")})
    if "path" in shards:
        ck.step("front-end parity", lambda: parity(ck, shards["path"]))
        ck.step("bf16 training stop/resume", lambda: stop_resume(ck, shards["path"]))  # fp32 on CPU
        ck.step("evaluate/predict device vs cpu", lambda: inference_parity(ck, shards["path"]))
        ck.step("throughput", lambda: throughput(ck, shards["path"]))
    ck.results["seconds"] = round(time.perf_counter() - t0, 1)
    ck.write()
    print(summary(ck.results))
    failed = [k for k, v in ck.results["steps"].items() if v["status"] == "failed"]
    log.info(f"[gpu_check] {len(ck.results['steps'])} steps in {ck.results['seconds']} s"
             + (f"; FAILED: {', '.join(failed)}" if failed else "; none failed")
             + f"; wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="verify and measure a GPU node end to end (launch/gpu_check.sh)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="results.json, summary.md, the synthetic data and runs go here")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="toy size (seconds; what the CPU tests run)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.set_defaults(func=run)
