"""The steps of ``bench gpu``, each run by the runner (asc_dist.bench.gpu) as a child process:

    python -m asc_dist.bench gpu --run-step NAME --work DIR --deadline T [the plan's arguments]

A step rebuilds the plan from the same arguments, does its part and writes its record to
``WORK/records/NAME.json`` (atomically) as its results come: a loops step after each row, so a
step killed at its budget still leaves every row it had measured. A step's own children (the
trainer, pytest) stop 10 s before the step's deadline, so the step's kill never comes first and
their partial results are summarised; their output goes into the step's log line by line.

- ``gpu-tests``: the ``gpu``-marked tests, only their files (``--durations=0``);
- ``data``: synthetic scenes at the paper's input shape, packed (in ``--work``, reused);
- ``parity``: the DALI and torch log-mel on the device vs the CPU (max dB);
- ``stop-resume``: a training run stopped by SIGTERM and resumed (from an empty run dir);
- ``inference``: evaluate and predict on the device vs the CPU (float32, TF32 off);
- ``loops-bN``: our model alone, a plain PyTorch loop, the augment/KD costs, host-to-device GB/s;
- ``trainer-...``: the real trainer (asc_dist.bench.throughput.trainer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

from asc_dist import atomic
from asc_dist.bench import plan as planning
from asc_dist.bench import probe
from asc_dist.bench.procs import LOG_TAIL, run_child
from asc_dist.errors import ConfigError

PAPER_FEATURES = ["features.clip_seconds=10.0", "features.frames=320"]
QUICK_FEATURES = ["features.sample_rate=16000", "features.n_fft=512", "features.win_length=512",
                  "features.hop_length=500", "features.f_max=8000", "features.clip_seconds=1.0",
                  "features.frames=32"]
TESTS = Path(__file__).resolve().parents[2] / "tests"
# A step's children stop this long before the step's own deadline (at toy size, whose budgets
# are seconds, less), so the step outlives them and keeps what they measured.
CHILD_MARGIN_S, QUICK_CHILD_MARGIN_S = 10.0, 2.0


class Skip(Exception):
    """A step that cannot run here (no pytest, no data): recorded as 'not run' with the reason."""


class Ctx:
    """What a step needs: the device, the size, the work folder, the plan, its deadline."""

    def __init__(self, device: str, quick: bool, work: Path, plan: planning.Plan,
                 deadline: float | None = None, name: str = "") -> None:
        import torch

        self.device, self.quick, self.work, self.plan = torch.device(device), quick, work, plan
        self.deadline, self.name = deadline, name
        self.features = QUICK_FEATURES if quick else PAPER_FEATURES
        # Toy size: the small DCASE 2018 CNN (the trainer is the same for every model)
        self.model = "model.name=dcase_baseline" if quick else "model.name=resnet50"
        self.shards = work / "shards"
        self.clip_samples = (16000 if quick else 48000) * plan.clip_seconds
        self.rec: dict = {}

    @property
    def available(self) -> tuple[str, ...]:
        """The plan's backends that this python has."""
        return tuple(b for b in self.plan.backends
                     if not (b == "dali" and planning.DALI in self.plan.missing))

    def child_timeout(self) -> float | None:
        """Seconds a child of this step may run: until 10 s before the step's deadline."""
        if self.deadline is None:
            return None
        margin = QUICK_CHILD_MARGIN_S if self.quick else CHILD_MARGIN_S
        left = self.deadline - time.time() - margin
        if left <= 0:
            raise TimeoutError(f"no time left for a child process ({margin:g} s before the "
                               f"step's deadline)")
        return left

    def save(self, **values) -> None:
        """Merge ``values`` into the step's record and write it now (the runner reads it even
        when it has to kill the step)."""
        self.rec.update(values)
        path = self.work / "records" / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(self.rec, default=str))


def run_step(args) -> int:
    """Run one step of the plan in this process and write its record for the runner."""
    if not args.work:
        raise ConfigError("--run-step needs --work")
    started = time.time()
    plan = planning.make_plan(device=args.device, quick=args.quick, budget=1e9,
                              clips_per_class=args.clips_per_class,
                              missing=tuple(m for m in args.missing.split(",") if m),
                              with_tests=not args.skip_tests)
    ctx = Ctx(args.device, args.quick, Path(args.work), plan, args.deadline, args.run_step)
    step = plan.step(args.run_step)
    # this process's start: the interpreter and its imports, from the runner's clock
    ctx.save(status="running", process={"start_s": round(started - (args.launched or started), 2)})
    try:
        ctx.save(**(_do(ctx, step) or {}))
        partial = [r["variant"] for r in ctx.rec.get("rows", []) if r.get("status") == "partial"]
        ctx.rec["status"] = "partial" if partial else "ok"
        if partial:
            ctx.rec["why"] = f"cut short, summarised from what was logged: {', '.join(partial)}"
    except Skip as e:
        ctx.rec.update(status="not run", why=str(e))
    except Exception as e:  # noqa: BLE001 - recorded for the runner; the other steps still run
        ctx.rec.update(status="failed", why=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc()[-LOG_TAIL:])
    ctx.save()
    return 0 if ctx.rec["status"] != "failed" else 1


def _cuda_init(ctx: Ctx) -> None:
    """This process's CUDA start, recorded (a step that uses the device itself)."""
    import torch

    if ctx.device.type == "cuda":
        t0 = time.perf_counter()
        torch.zeros(1, device=ctx.device).add_(1)
        torch.cuda.synchronize()
        ctx.save(process={**ctx.rec.get("process", {}), "cuda_init_s": time.perf_counter() - t0})


def _settings(ctx: Ctx, exact: bool) -> dict:
    """Set explicitly per step, so no row depends on what ran before it: the throughput rows at
    their fastest (cudnn autotuning, TF32 where float32 remains), the comparisons exact. The
    trainer's rows pass theirs to the trainer's process (asc_dist.bench.probe)."""
    import torch

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
    if step.name.startswith("loops-"):
        return loops(ctx, step)
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
    (v,) = step.variants
    return {"rows": [throughput.trainer(ctx, v, ctx.child_timeout())]}


def loops(ctx: Ctx, step: planning.Step) -> dict:
    """The model alone and the plain loop (each row saved as soon as it is measured), then what
    augmentation + KD cost per step and the host-to-device bandwidth at this batch."""
    from asc_dist.bench import throughput

    _cuda_init(ctx)
    ctx.save(settings=_settings(ctx, exact=False), rows=[])
    for v in step.variants:
        ctx.save(rows=[*ctx.rec["rows"], throughput.measure(ctx, v)])
    batch = step.variants[0].batch
    ctx.save(augment_kd=throughput.augment_kd_cost(ctx, batch))
    ctx.save(h2d=throughput.h2d_bandwidth(ctx, batch, int(ctx.clip_samples)))
    return {}


def make_data(ctx: Ctx) -> dict:
    """Synthetic TUT-layout scenes at the checked input shape, packed into WORK/shards; clips
    beyond a bank of rendered ones per class are hard links (throughput, not learning)."""
    from asc_dist import pack, synth

    plan = ctx.plan
    stamp = ctx.work / "data.json"
    want = _data_stamp(plan)
    if (stamp.is_file() and json.loads(stamp.read_text()) == want
            and (ctx.shards / "test" / "manifest.json").is_file()):
        return {"reused": str(ctx.shards), "train_clips": plan.train_clips,
                "test_clips": plan.test_clips}
    stamp.unlink(missing_ok=True)
    sr = 16000 if plan.quick else 48000
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    ds = synth.generate(ctx.work / "data", clips_per_class=plan.clips_per_class,
                        duration=plan.clip_seconds, sample_rate=sr, channels=1, seed=0,
                        workers=workers, overwrite=True, progress=False, bank=plan.bank,
                        test_fraction=planning.TEST_FRACTION)
    t1 = time.perf_counter()
    pack.pack(ds, ctx.shards, sample_rate=sr, workers=workers, overwrite=True, progress=False,
              verbose=False)
    t2 = time.perf_counter()
    atomic.write_text(stamp, json.dumps(want))
    total = plan.train_clips + plan.test_clips
    return {"shards": str(ctx.shards), "train_clips": plan.train_clips,
            "test_clips": plan.test_clips, "synth_s": round(t1 - t0, 1),
            "pack_s": round(t2 - t1, 1), "pack_clips_per_core_s": total / (t2 - t1) / workers}


def _data_stamp(plan: planning.Plan) -> dict:
    return {"clips_per_class": plan.clips_per_class, "quick": plan.quick,
            "test_fraction": planning.TEST_FRACTION}


def gpu_test_files(quick: bool) -> list[Path]:
    """The files holding gpu-marked tests (--quick: one, the plumbing on a CPU where they skip)."""
    if not TESTS.is_dir():
        return []
    if quick:
        return [TESTS / "test_features.py"]
    return sorted(f for f in TESTS.glob("test_*.py") if "pytest.mark.gpu" in f.read_text())


def count_gpu_tests() -> tuple[int, int]:
    """(files, tests) of the gpu-marked tests, for the plan (a parametrized one counts once)."""
    files = gpu_test_files(quick=False)
    return len(files), sum(f.read_text().count("pytest.mark.gpu") for f in files)


def gpu_tests(ctx: Ctx) -> dict:
    files = gpu_test_files(ctx.quick)
    if not files:
        raise Skip(f"no tests/ beside the package ({TESTS})")
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Skip("pytest is not installed in this python") from None
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "--durations=0", "--durations-min=0", *map(str, files)]
    t0 = time.perf_counter()
    rc, tail = run_child(cmd, ctx.child_timeout(), env=None, keep=400)
    wall = time.perf_counter() - t0
    text = "".join(tail)
    last = next((ln.strip() for ln in reversed(tail) if re.search(r"\d+ (passed|skipped|failed|"
                                                                  r"deselected)", ln)), "")
    durations = [(float(s), kind) for s, kind in re.findall(r"^([\d.]+)s (setup|call|teardown)",
                                                           text, flags=re.MULTILINE)]
    setup = sum(s for s, kind in durations if kind == "setup")
    out = {"summary": last, "files": [f.name for f in files], "wall_s": round(wall, 1),
           "fixtures_s": round(setup, 1),
           "start_s": round(max(0.0, wall - sum(s for s, _ in durations)), 1),
           **{k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected)", last)}}
    if rc is None:
        raise TimeoutError(f"pytest passed the step's time: {last or 'no summary yet'}")
    if rc not in (0, 5):
        raise RuntimeError(last or f"pytest exited {rc}")
    return out


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

    _cuda_init(ctx)
    ctx.save(settings=_settings(ctx, exact=True))
    cfg = config.load([*ctx.features, f"data.shards={ctx.shards}"], world_size=1)
    cpu = torch.device("cpu")
    backends = ctx.available
    feats = {(b, d.type): _features_by_key(ctx, cfg, b, d) for b in backends
             for d in {cpu, ctx.device}}

    def max_db(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    out = {}
    for b in backends:
        if ctx.device.type != "cpu":
            out[f"{b}_{ctx.device.type}_vs_cpu_max_db"] = max_db(feats[(b, ctx.device.type)],
                                                                  feats[(b, "cpu")])
    if "dali" in backends:
        out["dali_vs_torch_cpu_max_db"] = max_db(feats[("dali", "cpu")], feats[("torch", "cpu")])
    else:
        out["dali"] = f"not run: {planning.DALI} missing"
    worst = max((v for v in out.values() if isinstance(v, float)), default=0.0)
    if worst > 0.01:
        raise RuntimeError(f"front ends differ by {worst:.4f} dB (> 0.01 dB): {out}")
    return out


def stop_resume(ctx: Ctx) -> dict:
    """SIGTERM mid-run (exit 3, checkpoint), then the same command resumes and finishes; from an
    empty run dir, so a rerun in the same --work repeats it."""
    from asc_dist.bench.throughput import precision, train_args

    run_dir = ctx.work / "runs" / "stop-resume"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = ctx.plan.resume_steps
    args = train_args(ctx, run_dir, f"train.max_iters={steps}", "train.log_every=1",
                      f"train.eval_every={steps}", "train.ckpt_every=1000", "resume=auto",
                      f"train.global_batch={ctx.plan.batches[0]}")
    env = {**os.environ, "ASC_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}  # the progress lines

    def run(part: str, on_line=None) -> tuple[int | None, str, dict]:
        out = ctx.work / "runs" / f"stop-resume.{part}.probe.jsonl"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "asc_dist.bench.probe", str(out), "--launched",
               str(time.time()), "--device", ctx.device.type, "--", *args]
        rc, tail = run_child(cmd, ctx.child_timeout(), on_line=on_line, env=env, keep=2000)
        if rc is None:
            raise TimeoutError(f"the {part} run passed the step's time")
        return rc, "".join(tail), probe.read(out)

    def stop_at(line, p):
        if re.search(rf"step\s+{steps // 3}/", line):
            p.send_signal(15)

    rc, text, first = run("stopped", stop_at)
    if rc != 3:
        raise RuntimeError(f"stopped run exited {rc}, expected 3")
    m = re.search(r"checkpointed at step (\d+)", text)
    if m is None:
        raise RuntimeError("the stopped run logged no 'checkpointed at step N'")
    stopped = int(m.group(1))
    ctx.save(stopped_at=stopped, phases={"stopped": _phases(first)})
    rc, text, second = run("resumed")
    if rc != 0 or f"at step {stopped}" not in text:
        raise RuntimeError(f"resume failed (exit {rc})")
    acc = re.search(r"class-wise accuracy: ([\d.]+)", text)
    return {"precision": precision(ctx), "stopped_at": stopped, "finished_at": steps,
            "classwise_accuracy": float(acc.group(1)) if acc else None,
            "phases": {"stopped": _phases(first), "resumed": _phases(second)}}


def _phases(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if k.endswith("_s") or k == "rc"}


def inference_parity(ctx: Ctx) -> dict:
    """evaluate and predict of the stop/resume run's model on the device vs the CPU, float32."""
    from asc_dist import evaluate, predict
    from asc_dist.validate import read_predictions

    _cuda_init(ctx)
    ctx.save(settings=_settings(ctx, exact=True))
    run_dir = ctx.work / "runs" / "stop-resume"
    if not (run_dir / "checkpoints").is_dir():
        raise Skip("the stop/resume run left no checkpoint")
    probs, rows, seconds = {}, {}, {}
    wavs = sorted((ctx.work / "data" / "audio").glob("*.wav"))[:8]
    for dev in ("cpu", ctx.device.type):
        out = ctx.work / f"eval-{dev}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rc = evaluate.main([str(run_dir), "--split", str(ctx.shards / "test"), "--out", str(out),
                            "--backend", "torch", "--device", dev, "train.precision=fp32",
                            "--quiet"])
        seconds[f"evaluate_{dev}_s"] = round(time.perf_counter() - t0, 2)
        if rc != 0:
            raise RuntimeError(f"evaluate --device {dev} exited {rc}")
        probs[dev] = read_predictions(out / "predictions.tsv")[1]
        tsv = ctx.work / f"predict-{dev}.tsv"
        rc = predict.main([str(run_dir), *map(str, wavs), "--scores", "--device", dev,
                           "--precision", "fp32", "--workers", "0", "--out", str(tsv), "--quiet"])
        if rc != 0:
            raise RuntimeError(f"predict --device {dev} exited {rc}")
        rows[dev] = tsv.read_text().splitlines()[1:]
    dev = ctx.device.type
    diff = max(float(abs(probs["cpu"][k][1] - probs[dev][k][1]).max()) for k in probs["cpu"])
    pdiff = max(abs(float(a) - float(b)) for ra, rb in zip(rows["cpu"], rows[dev])
                for a, b in zip(ra.split("\t")[2:], rb.split("\t")[2:]))
    if diff > 1e-3 or pdiff > 1e-3:
        raise RuntimeError(f"device and CPU disagree: evaluate {diff:.2e}, predict {pdiff:.2e}")
    return {"evaluate_max_prob_diff": diff, "predict_max_prob_diff": pdiff,
            "test_clips": ctx.plan.test_clips, **seconds}
