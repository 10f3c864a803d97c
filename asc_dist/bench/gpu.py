"""``bench gpu [OUT_DIR]``: verify a GPU node end to end and measure it, planned and bounded.

``launch/gpu_check.sh OUT_DIR`` runs this in the python it is given. The check is planned first
(asc_dist.bench.plan: every step's budget from its work, refused when not worth a lease; ``--plan``
prints it and runs nothing), then each step runs as a child process in its own process group,
killed when it passes its budget. Steps, each recorded in ``OUT_DIR/results.json`` and
``OUT_DIR/summary.md`` (rewritten after every step, so a check killed at any moment leaves valid
files) as ok, failed, timed_out or not run, with its log tail:

- ``gpu-tests``: the ``gpu``-marked tests (when pytest and the tests are present);
- ``data``: synthetic scenes at the paper's input shape, packed (in ``--work``, reused);
- ``parity``: the DALI and torch log-mel on the device vs the CPU (max dB);
- ``stop-resume``: a bf16 training run stopped by SIGTERM and resumed;
- ``inference``: evaluate and predict on the device vs the CPU (float32, TF32 off);
- ``loops-bN``: our model alone on a resident batch (the ceiling) and a plain PyTorch loop as a
  user would write it (torchvision ResNet-50, fused Adam, bf16, channels_last);
- ``trainer-<backend>-<cached|streamed>-bN``: the real trainer (clips/s, step ms from CUDA
  events, data-wait %, peak memory, model FLOP utilisation).

``--only``/``--skip`` split the check over several calls sharing one ``--work`` folder (the
data is built once); each call merges its steps into OUT_DIR's results. It needs no network and
changes no environment. ``--device cpu --quick`` runs it all at toy size on a CPU (the tests do).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from asc_dist import atomic
from asc_dist.bench import plan as planning
from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)

PAPER_FEATURES = ["features.clip_seconds=10.0", "features.frames=320"]
QUICK_FEATURES = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
                  "features.hop_length=500", "features.f_max=8000", "features.clip_seconds=1.0",
                  "features.frames=32"]
TESTS = Path(__file__).resolve().parents[2] / "tests"
LOG_TAIL = 3000  # characters of a step's log kept in results.json


class Skip(Exception):
    """A step that cannot run here (no DALI, no pytest): recorded as 'not run' with the reason."""


class Ctx:
    """What a step needs: the device, the size, the work folder, the plan."""

    def __init__(self, device: str, quick: bool, work: Path, plan: planning.Plan) -> None:
        import torch

        self.device, self.quick, self.work, self.plan = torch.device(device), quick, work, plan
        self.features = QUICK_FEATURES if quick else PAPER_FEATURES
        # Toy size: the small DCASE 2018 CNN (the trainer is the same for every model)
        self.model = "model.name=dcase_baseline" if quick else "model.name=resnet50"
        self.shards = work / "shards"


# --- the parent: plan, run each step bounded, keep the results ---------------------------------

def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so a child that left its group is killed too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(p: subprocess.Popen) -> None:
    if p.poll() is not None:  # reaped: its pid may be another process's now; its group is not
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    victims = _descendants(p.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=5)
            if sig == signal.SIGTERM:
                time.sleep(0.2)  # grandchildren handling SIGTERM; SIGKILL whatever remains
        except subprocess.TimeoutExpired:
            pass


def run_bounded(name: str, budget_s: float, cmd: list[str], work: Path) -> dict:
    """Run ``cmd`` in its own process group with its output in ``work/logs/NAME.log``; kill the
    whole tree when it passes ``budget_s``. The record: status, seconds, log tail, and whatever
    the step wrote to ``work/records/NAME.json`` (its results)."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "records").mkdir(parents=True, exist_ok=True)
    log_path, rec_path = work / "logs" / f"{name}.log", work / "records" / f"{name}.json"
    rec_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on success or when the check itself is stopped: nothing outlives a step
            _kill_tree(p)
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    if rc is None:
        rec.update(status="timed_out", why=f"passed its budget of {budget_s:g} s: killed")
    elif rc != 0 and rec.get("status", "ok") == "ok":
        rec.update(status="failed", why=f"exited {rc}")
    rec.setdefault("status", "ok")
    rec["seconds"], rec["budget_s"] = round(time.perf_counter() - t0, 1), budget_s
    rec["log_tail"] = log_path.read_bytes()[-LOG_TAIL:].decode(errors="replace")
    return rec


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def summary(results: dict) -> str:
    lines = [f"# GPU check ({results['device']}{', quick' if results['quick'] else ''})", "",
             f"machine: {results['machine']}; torch {results['torch']}", "",
             "| step | status | seconds | budget s | details |", "|---|---|---:|---:|---|"]
    for name, rec in results["steps"].items():
        details = rec.get("why") or ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("status", "seconds", "budget_s", "traceback", "log_tail", "rows", "settings"))
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {rec['budget_s']:g} | "
                     f"{details.splitlines()[0] if details else ''} |")
    lines += ["", "| variant | batch | steps/epoch | clips/s | step ms | data wait % | peak GiB | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rec in results["steps"].items():
        for r in rec.get("rows", []):
            lines.append(f"| {r['variant']} | {r['batch']} | {_fmt(r.get('steps_per_epoch'), 'd')} | "
                         f"{r['clips_per_s']:.0f} | {r['step_ms']:.1f} | {r['data_wait_pct']:.1f} | "
                         f"{_fmt(r.get('peak_mem_gb'), '.2f')} | {_fmt(r.get('mfu'), '.1%')} |")
    ratios = comparisons(results)
    if ratios:
        lines += [""] + [f"- {k}: {v:.3g}" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def comparisons(results: dict) -> dict:
    """The trainer's best against the plain loop at each batch, and the recipe's projected time."""
    rows = [r for rec in results["steps"].values() for r in rec.get("rows", [])]
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        at = [r for r in rows if r["batch"] == batch]
        plain = next((r for r in at if r["variant"].startswith("plain")), None)
        best = max((r for r in at if r["variant"].startswith("trainer")), default=None,
                   key=lambda r: r["clips_per_s"])
        if plain and best:
            out[f"trainer_vs_plain_loop_batch{batch}"] = best["clips_per_s"] / plain["clips_per_s"]
        if best and batch == 64:
            out["projected_5000_iterations_s"] = 5000 * best["step_ms"] / 1000
    return out


def _plan_from(args) -> planning.Plan:
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    p = planning.make_plan(device=device, quick=args.quick, clips_per_class=args.clips_per_class,
                           budget=args.budget, backends=_backends(),
                           gpu_tests=_count_gpu_tests(), with_tests=not args.skip_tests)
    planning.validate_variants(p)  # the whole check's variants, whatever --only selects
    planning.select(p, _names(args.only), _names(args.skip))
    planning.validate_budget(p)
    return p


def _names(s: str | None) -> list[str] | None:
    return [n for n in s.split(",") if n] if s else None


def _backends() -> tuple[str, ...]:
    from asc_dist.data import dali_available

    return ("dali", "torch") if dali_available() else ("torch",)


def _count_gpu_tests() -> int:
    if not TESTS.is_dir():
        return 0
    return sum(f.read_text().count("@pytest.mark.gpu") for f in TESTS.glob("test_*.py"))


def run(args) -> int:
    if args.run_step:
        return run_step(args)
    plan = _plan_from(args)
    if args.plan:
        print(json.dumps(plan.to_json(), indent=2) if args.json else planning.describe(plan))
        return 0
    if not args.out_dir:
        raise ConfigError("OUT_DIR is required unless --plan (where results.json and summary.md go)")
    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available on this machine")
    from asc_dist.bench import machine

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "device": plan.device, "quick": plan.quick,
               "torch": torch.__version__, "plan": plan.to_json(), "steps": {}, "seconds": 0.0}
    old = out / "results.json"
    if old.is_file():  # a split check: this call's steps join the earlier calls' ones
        try:
            prev = json.loads(old.read_text())
            if (prev.get("device"), prev.get("quick")) == (plan.device, plan.quick):
                results["steps"] = prev.get("steps", {})
        except (OSError, ValueError):
            log.warning(f"[gpu_check] {old} is unreadable: starting a new one")
    if "dali" not in plan.backends:
        log.warning("[gpu_check] NVIDIA DALI is not importable here: its steps are not planned")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="asc-gpu-check-"))
    # Stopped from outside (a command limit, Ctrl-C): the running step's process tree is killed
    # on the way out (run_bounded) and results.json already holds every finished step.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    log.info(planning.describe(plan))
    t0 = time.perf_counter()
    try:
        for step in plan.steps:
            log.info(f"[gpu_check] {step.name} (budget {step.budget_s:g} s) ...")
            cmd = [sys.executable, "-m", "asc_dist.bench", "gpu", "--run-step", step.name,
                   "--work", str(work), "--device", plan.device,
                   "--clips-per-class", str(plan.clips_per_class), "--budget", "1e9",
                   "--backends", ",".join(plan.backends),
                   *(["--quick"] if plan.quick else []), *(["--skip-tests"] if args.skip_tests else [])]
            if step.compares_devices and plan.device == "cpu":
                rec = {"status": "not run", "why": "no accelerator: nothing to compare the CPU with",
                       "seconds": 0.0, "budget_s": step.budget_s}
            else:
                rec = run_bounded(step.name, step.budget_s, cmd, work)
            results["steps"][step.name] = rec
            results["seconds"] = round(time.perf_counter() - t0, 1)
            atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str))
            atomic.write_text(out / "summary.md", summary(results))
            log.info(f"[gpu_check] {step.name}: {rec['status']} ({rec['seconds']} s)"
                     + (f": {rec['why'].splitlines()[0]}" if rec.get("why") else ""))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=str) if args.json else summary(results), end="")
    bad = [n for n in (s.name for s in plan.steps) if results["steps"][n]["status"] in ("failed", "timed_out")]
    log.info(f"[gpu_check] {len(plan.steps)} steps in {results['seconds']} s"
             + (f"; FAILED: {', '.join(bad)}" if bad else "; none failed")
             + f"; wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 1 if bad else 0


# --- the child: one step ------------------------------------------------------------------------

def run_step(args) -> int:
    """Run one step of the plan in this process and write its record for the parent."""
    if not args.work:
        raise ConfigError("--run-step needs --work")
    plan = planning.make_plan(device=args.device, quick=args.quick, budget=1e9,
                              clips_per_class=args.clips_per_class,
                              backends=tuple(args.backends.split(",")),
                              gpu_tests=_count_gpu_tests(), with_tests=not args.skip_tests)
    ctx = Ctx(args.device, args.quick, Path(args.work), plan)
    step = plan.step(args.run_step)
    try:
        rec = {"status": "ok", "settings": _settings(ctx, step.name), **(_do(ctx, step) or {})}
    except Skip as e:
        rec = {"status": "not run", "why": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded for the parent; the other steps still run
        rec = {"status": "failed", "why": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-LOG_TAIL:]}
    atomic.write_text(ctx.work / "records" / f"{step.name}.json", json.dumps(rec, default=str))
    return 0 if rec["status"] != "failed" else 1


def _settings(ctx: Ctx, name: str) -> dict:
    """Set explicitly per step, so no row depends on what ran before it: the throughput rows at
    their fastest (cudnn autotuning, TF32 where float32 remains), the comparisons exact."""
    import torch

    exact = name in ("parity", "inference")
    torch.backends.cudnn.benchmark = not exact
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact
    precision = "fp32" if exact or ctx.device.type != "cuda" else "bf16"
    return {"cudnn_benchmark": not exact, "tf32": not exact, "precision": precision}


def _do(ctx: Ctx, step: planning.Step) -> dict | None:
    from asc_dist.bench import throughput

    if step.name == "gpu-tests":
        return gpu_tests(ctx)
    if step.name == "data":
        return make_data(ctx)
    if not step.name.startswith("loops-"):
        stamp = ctx.work / "data.json"
        if not (ctx.shards / "test" / "manifest.json").is_file() or not stamp.is_file():
            raise Skip(f"no shards in {ctx.shards}: run the data step first (same --work)")
        if json.loads(stamp.read_text()) != _data_stamp(ctx.plan):
            raise Skip(f"the data in {ctx.work} was made for {stamp.read_text()}, not this plan "
                       f"({json.dumps(_data_stamp(ctx.plan))}): run the data step again")
    if step.name == "parity":
        return parity(ctx)
    if step.name == "stop-resume":
        return stop_resume(ctx)
    if step.name == "inference":
        return inference_parity(ctx)
    return {"rows": [throughput.measure(ctx, v) for v in step.variants]}


def make_data(ctx: Ctx) -> dict:
    """Synthetic TUT-layout scenes at the checked input shape, packed into WORK/shards; clips
    beyond a bank of rendered ones per class are hard links (throughput, not learning)."""
    from asc_dist import pack, synth

    plan = ctx.plan
    stamp = ctx.work / "data.json"
    want = _data_stamp(plan)
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (ctx.shards / "test" / "manifest.json").is_file():
        return {"reused": str(ctx.shards), "train_clips": plan.train_clips, "test_clips": plan.test_clips}
    sr = 16000 if plan.quick else 48000
    workers = os.cpu_count() or 1
    ds = synth.generate(ctx.work / "data", clips_per_class=plan.clips_per_class,
                        duration=plan.clip_seconds, sample_rate=sr, channels=1, seed=0,
                        workers=workers, overwrite=True, progress=False, bank=plan.bank)
    pack.pack(ds, ctx.shards, sample_rate=sr, workers=workers, overwrite=True, progress=False,
              verbose=False)
    atomic.write_text(stamp, json.dumps(want))
    return {"shards": str(ctx.shards), "train_clips": plan.train_clips, "test_clips": plan.test_clips}


def _data_stamp(plan: planning.Plan) -> dict:
    return {"clips_per_class": plan.clips_per_class, "quick": plan.quick}


def gpu_tests(ctx: Ctx) -> dict:
    if not TESTS.is_dir():
        raise Skip(f"no tests/ beside the package ({TESTS})")
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Skip("pytest is not installed in this python") from None
    # --quick (a CPU, where they all skip) checks the plumbing on one file, not the whole suite
    where = TESTS / "test_features.py" if ctx.quick else TESTS
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        str(where)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       cwd=TESTS.parent)
    sys.stdout.write(p.stdout[-LOG_TAIL:])  # into the step's log
    last = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode not in (0, 5):
        raise RuntimeError(last)
    return {"summary": last, **{k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected)", last)}}


def _features_by_key(ctx: Ctx, cfg, backend: str, device) -> dict:
    from asc_dist.bench import with_values
    from asc_dist.data import build_source

    with build_source(with_values(cfg, {"data.backend": backend}), "test", train=False, rank=0,
                      world_size=1, device=device, batch_size=8, cache="none") as src:
        return {k: x.float().cpu() for b in src.epoch(0)
                for k, x, ok in zip(b.keys, b.features, b.valid.tolist()) if ok}


def parity(ctx: Ctx) -> dict:
    import torch

    from asc_dist import config

    cfg = config.load([*ctx.features, f"data.shards={ctx.shards}"], world_size=1)
    cpu = torch.device("cpu")
    backends = ctx.plan.backends
    feats = {(b, d.type): _features_by_key(ctx, cfg, b, d) for b in backends for d in {cpu, ctx.device}}

    def max_db(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    out = {}
    for b in backends:
        if ctx.device.type != "cpu":
            out[f"{b}_{ctx.device.type}_vs_cpu_max_db"] = max_db(feats[(b, ctx.device.type)], feats[(b, "cpu")])
    if "dali" in backends:
        out["dali_vs_torch_cpu_max_db"] = max_db(feats[("dali", "cpu")], feats[("torch", "cpu")])
    else:
        out["dali"] = "not installed: DALI comparisons not run"
    worst = max((v for v in out.values() if isinstance(v, float)), default=0.0)
    if worst > 0.01:
        raise RuntimeError(f"front ends differ by {worst:.4f} dB (> 0.01 dB): {out}")
    return out


def stop_resume(ctx: Ctx) -> dict:
    """SIGTERM mid-run (exit 3, checkpoint), then the same command resumes and finishes."""
    from asc_dist import torchrun
    from asc_dist.bench.throughput import train_args

    run_dir = ctx.work / "runs" / "stop-resume"
    steps = ctx.plan.resume_steps
    args = train_args(ctx, run_dir, f"train.max_iters={steps}", "train.log_every=1",
                      f"train.eval_every={steps}", "train.ckpt_every=1000", "resume=auto",
                      f"train.global_batch={ctx.plan.batches[0]}")
    cmd = torchrun.command(args)
    env = dict(os.environ, ASC_LOG_LEVEL="INFO")  # the progress lines this step reads
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in p.stdout:
        sys.stdout.write(line)
        lines.append(line)
        if re.search(rf"step\s+{steps // 3}/", line):
            p.send_signal(signal.SIGTERM)
    if p.wait() != 3:
        raise RuntimeError(f"stopped run exited {p.returncode}, expected 3")
    m = re.search(r"checkpointed at step (\d+)", "".join(lines))
    if m is None:
        raise RuntimeError("the stopped run logged no 'checkpointed at step N'")
    stopped = int(m.group(1))
    again = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sys.stdout.write(again.stdout)
    if again.returncode != 0 or f"at step {stopped}" not in again.stdout:
        raise RuntimeError(f"resume failed (exit {again.returncode})")
    acc = re.search(r"class-wise accuracy: ([\d.]+)", again.stdout)
    return {"precision": "bf16" if ctx.device.type == "cuda" else "fp32 (CPU)",
            "stopped_at": stopped, "finished_at": steps,
            "classwise_accuracy": float(acc.group(1)) if acc else None}


def inference_parity(ctx: Ctx) -> dict:
    """evaluate and predict of the stop/resume run's model on the device vs the CPU, float32."""
    from asc_dist import evaluate, predict
    from asc_dist.validate import read_predictions

    run_dir = ctx.work / "runs" / "stop-resume"
    if not (run_dir / "checkpoints").is_dir():
        raise Skip("the stop/resume run left no checkpoint")
    probs, rows = {}, {}
    wavs = sorted((ctx.work / "data" / "audio").glob("*.wav"))[:8]
    for dev in ("cpu", ctx.device.type):
        out = ctx.work / f"eval-{dev}"
        rc = evaluate.main([str(run_dir), "--split", str(ctx.shards / "test"), "--out", str(out),
                            "--backend", "torch", "--device", dev, "train.precision=fp32", "--quiet"])
        if rc != 0:
            raise RuntimeError(f"evaluate --device {dev} exited {rc}")
        probs[dev] = read_predictions(out / "predictions.tsv")[1]
        tsv = ctx.work / f"predict-{dev}.tsv"
        rc = predict.main([str(run_dir), *map(str, wavs), "--scores", "--device", dev, "--precision", "fp32",
                           "--workers", "0", "--out", str(tsv), "--quiet"])
        if rc != 0:
            raise RuntimeError(f"predict --device {dev} exited {rc}")
        rows[dev] = tsv.read_text().splitlines()[1:]
    dev = ctx.device.type
    diff = max(float(abs(probs["cpu"][k][1] - probs[dev][k][1]).max()) for k in probs["cpu"])
    pdiff = max(abs(float(a) - float(b)) for ra, rb in zip(rows["cpu"], rows[dev])
                for a, b in zip(ra.split("\t")[2:], rb.split("\t")[2:]))
    if diff > 1e-3 or pdiff > 1e-3:
        raise RuntimeError(f"device and CPU disagree: evaluate {diff:.2e}, predict {pdiff:.2e}")
    return {"evaluate_max_prob_diff": diff, "predict_max_prob_diff": pdiff}


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("gpu", help="verify and measure a GPU node end to end (launch/gpu_check.sh)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="results.json and summary.md go here (nothing else)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="toy size (seconds; what the CPU tests run)")
    p.add_argument("--plan", action="store_true", help="print the plan with its budgets; run nothing")
    p.add_argument("--json", action="store_true", help="print JSON (the plan, or the results)")
    p.add_argument("--clips-per-class", type=int, default=None,
                   help="synthetic clips per class (default: enough for 10 streamed steps per epoch)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds the selected steps' budgets may add up to")
    p.add_argument("--only", help="comma list of steps to run (names from --plan; 'trainer-*' prefixes)")
    p.add_argument("--skip", help="comma list of steps not to run")
    p.add_argument("--work", help="synthetic data, shards and runs (default: a temporary folder "
                                  "removed at the end; a given one is kept and reused)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument("--run-step", help=argparse.SUPPRESS)  # the parent's child: one step
    p.add_argument("--backends", default="dali,torch", help=argparse.SUPPRESS)  # the parent's
    p.set_defaults(func=run)
