"""The trainer as the GPU check runs it, measured from inside its own process.

    python -m asc_dist.bench.probe OUT.jsonl --warmup N [--settings JSON] [--launched T] -- ARGS

sets the row's cuDNN/TF32 settings, then runs ``asc_dist.train.main(ARGS)`` in this process with
its phases timed: each is appended to OUT.jsonl as one JSON line as soon as it is known, so a run
killed at its timeout still leaves what it had measured. The lines (``ev``):

- ``start``: the interpreter and torch (from ``--launched``, the parent's clock), the asc_dist
  imports, DALI's import, CUDA initialisation (a context and one kernel);
- ``build``: the trainer's build (sources, feature cache, statistics, model), the model's part;
- ``settings``: what the run uses, read inside it after its build: cudnn.benchmark, TF32,
  float32 matmul precision, precision and autocast, compile, channels_last, backend, cached,
  workers, prefetch, pin memory;
- ``first_step``: its seconds (synchronised: autotuning, compilation, lazy loading) and the time
  from launch to the end of the first step;
- ``step``: each timed step (after ``--warmup``): host ms (the call's wall time, which on a GPU is
  the time to queue the step), device ms and the idle gap before it (CUDA events, read when ready,
  never waited for);
- ``peak``: after the last step, the peaks since the warm-up (reset then, so autotuning's
  workspaces are not counted): device memory allocated; pinned host memory; host memory of the
  process and its workers; /dev/shm; device memory outside torch's allocator (DALI's);
- ``eval``, ``checkpoint``, ``report``: seconds (and clips) of the final evaluation, each checkpoint
  and the report files; ``end``: the exit code.

The instrumentation wraps names that ``asc_dist.train`` calls (build, build_model, prepare_model,
train_step, evaluate, Checkpointer, write_report, plots.plot_curves): the trainer's code is the one
users run, unchanged; a missing name fails at once, naming it (tests/test_gpu_probe.py runs it).
"""

from __future__ import annotations

import time

_T_MAIN = time.time()  # before the other imports: what the interpreter itself cost

import argparse
import contextlib
import json
import os
import sys
import threading
from pathlib import Path

MB = 2**20


class Recorder:
    """Appends one JSON line per event, flushed at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run
        self._lock = threading.Lock()

    def put(self, ev: str, **values) -> None:
        with self._lock:
            self._f.write(json.dumps({"ev": ev, **values}, default=str) + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def read(path: Path) -> dict:
    """OUT.jsonl as one dict: the last value of every key, plus ``steps`` (every step line)."""
    out: dict = {"steps": []}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        ev = rec.pop("ev", None)
        if ev == "step":
            out["steps"].append(rec)
        else:
            out.update(rec)
    return out


def apply_settings(settings: dict) -> None:
    """The row's backend settings, set before the trainer starts (it may change them: what it ran
    with is read at its first step)."""
    import torch

    if "cudnn_benchmark" in settings:
        torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
    if "tf32" in settings:
        torch.backends.cuda.matmul.allow_tf32 = bool(settings["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(settings["tf32"])


def settings_in_use(cfg, parts) -> dict:
    import torch

    ac = parts.autocast
    src = parts.train_src
    stream = getattr(src, "stream", src)  # a cached source keeps the one that filled it
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "precision": str(cfg.train.precision),
        "autocast": str(getattr(ac, "fast_dtype", None) or type(ac).__name__),
        "compile": bool(cfg.model.compile), "channels_last": bool(cfg.model.channels_last),
        "backend": getattr(src, "backend", None), "cached": bool(getattr(src, "cached", False)),
        "workers": getattr(stream, "num_threads", None), "prefetch": int(cfg.data.prefetch),
        "pin_memory": getattr(stream, "device", torch.device("cpu")).type == "cuda",
    }


class _Memory(threading.Thread):
    """Peaks sampled every ``every`` seconds: host memory of this process and its children,
    /dev/shm, and device memory outside torch's allocator (DALI's)."""

    def __init__(self, rec: Recorder, cuda: bool, every: float = 0.25) -> None:
        super().__init__(daemon=True, name="probe-memory")
        self.rec, self.cuda, self.every = rec, cuda, every
        self.stop = threading.Event()
        self.shm0 = _shm_used()
        self.outside0 = _outside_torch() if cuda else None
        self.reset()

    def reset(self) -> None:
        self.host = self.shm = self.outside = 0

    def sample(self) -> None:
        self.host = max(self.host, _tree_rss())
        self.shm = max(self.shm, _shm_used() - self.shm0)
        if self.cuda:
            self.outside = max(self.outside, _outside_torch() - self.outside0)

    def peaks(self) -> dict:
        self.sample()
        return {"peak_host_gb": self.host / 2**30, "peak_shared_gb": self.shm / 2**30,
                "outside_torch_gb": self.outside / 2**30 if self.cuda else None}

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.sample()
            except (OSError, RuntimeError, ValueError):  # a vanished worker, a closing context
                pass


def _tree_rss() -> int:
    from asc_dist.bench.procs import _descendants

    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def _shm_used() -> int:
    try:
        s = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def _outside_torch() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


class _Steps:
    """train_step timed: the first synchronised, the timed ones by CUDA events read when ready."""

    def __init__(self, rec: Recorder, warmup: int, launched: float, memory: _Memory,
                 cuda: bool) -> None:
        self.rec, self.warmup, self.launched, self.memory = rec, warmup, launched, memory
        self.cuda = cuda
        self.k = 0
        self.last = None  # the run's last step (max_iters), known after build
        self.log_every = 1
        self.pending: list[tuple] = []  # (step, host s, start event, end event, after a sync)
        self.prev_end = None
        self.synced = True  # the queue was drained before the next step (a log step read)

    def wrap(self, orig):
        import torch

        def train_step(p, batch, *args, **kw):
            self.k += 1
            k = self.k
            start = end = None
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = orig(p, batch, *args, **kw)
            host = time.perf_counter() - t0
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            if k == 1:
                self._sync()
                self.rec.put("first_step", first_step_s=time.perf_counter() - t0,
                             time_to_first_step_s=time.time() - self.launched)
            if k == self.warmup:  # peaks from here on: autotuning's workspaces are not counted
                self._sync()
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.reset_peak_host_memory_stats()
                self.memory.reset()
            if k > self.warmup:
                self.pending.append((k, host, start, end, self.synced))
                self._resolve(wait=k == self.last)
            self.synced = k % self.log_every == 0  # the trainer reads the loss there: a sync
            if k == self.last:
                self._peaks()
            return out

        return train_step

    def _sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def _resolve(self, wait: bool) -> None:
        while self.pending:
            k, host, start, end, synced = self.pending[0]
            if end is not None and not (wait or end.query()):
                return
            if end is not None:
                end.synchronize()
            self.pending.pop(0)
            device = start.elapsed_time(end) if end is not None else None
            gap = (self.prev_end.elapsed_time(start)
                   if end is not None and self.prev_end is not None else None)
            self.prev_end = end
            self.rec.put("step", k=k, host_ms=1000 * host, device_ms=device, gap_ms=gap,
                         after_sync=synced)

    def _peaks(self) -> None:
        import torch

        self._sync()
        peaks = self.memory.peaks()
        if self.cuda:
            peaks["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
            stats = torch.cuda.host_memory_stats()
            peaks["peak_pinned_gb"] = stats.get("allocated_bytes.peak", 0) / 2**30
        else:
            peaks.update(peak_device_gb=None, peak_pinned_gb=None)
        self.rec.put("peak", **peaks)


def _timed(rec: Recorder, key: str, orig, clips=None):
    def call(*args, **kw):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kw)
        finally:
            extra = {} if clips is None else {f"{key}_clips": clips(*args)}
            rec.put(key, **{f"{key}_s": time.perf_counter() - t0}, **extra)
    return call


# What the probe wraps in asc_dist.train (looked up there by name at each call)
WRAPPED = ("build", "build_model", "prepare_model", "train_step", "evaluate", "Checkpointer",
           "write_report")


def _summed(orig, total: list[float], then=None):
    """``orig`` with its seconds added to ``total[0]`` (and ``then()`` called after each call)."""
    def call(*args, **kw):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kw)
        finally:
            total[0] += time.perf_counter() - t0
            if then is not None:
                then()
    return call


@contextlib.contextmanager
def instrumented(rec: Recorder, warmup: int, launched: float, cuda: bool):
    """asc_dist.train with its phases timed into ``rec``; everything restored on exit."""
    import asc_dist.train as tr
    from asc_dist import plots

    absent = [n for n in WRAPPED if not hasattr(tr, n)]
    if absent:
        raise RuntimeError(f"asc_dist.train has no {', '.join(absent)}: update "
                           f"asc_dist/bench/probe.py")
    saved = {n: getattr(tr, n) for n in WRAPPED}
    saved_curves = plots.plot_curves
    memory = _Memory(rec, cuda)
    steps = _Steps(rec, warmup, launched, memory, cuda)
    model_s, report_s = [0.0], [0.0]

    def build(cfg, env, *args, **kw):
        steps.last, steps.log_every = int(cfg.train.max_iters), int(cfg.train.log_every)
        t0 = time.perf_counter()
        parts = saved["build"](cfg, env, *args, **kw)
        rec.put("build", build_s=time.perf_counter() - t0, model_build_s=model_s[0],
                train_clips=parts.train_src.num_samples, test_clips=parts.test_src.num_samples)
        # after dist.init (which turns cudnn.benchmark on for CUDA): what the steps run with
        rec.put("settings", settings=settings_in_use(cfg, parts))
        return parts

    class TimedCheckpointer(saved["Checkpointer"]):
        def save(self, *args, **kw):
            t0 = time.perf_counter()
            try:
                return super().save(*args, **kw)
            finally:
                rec.put("checkpoint", checkpoint_s=time.perf_counter() - t0)

    def reported() -> None:
        rec.put("report", report_s=report_s[0])

    tr.build = build
    tr.build_model = _summed(saved["build_model"], model_s)
    tr.prepare_model = _summed(saved["prepare_model"], model_s)
    tr.train_step = steps.wrap(saved["train_step"])
    tr.evaluate = _timed(rec, "eval", saved["evaluate"], clips=lambda m, src, *a: src.num_samples)
    tr.Checkpointer = TimedCheckpointer
    tr.write_report = _summed(saved["write_report"], report_s, reported)
    plots.plot_curves = _summed(saved_curves, report_s, reported)
    memory.start()
    try:
        yield steps
    finally:
        memory.stop.set()
        for n, v in saved.items():
            setattr(tr, n, v)
        plots.plot_curves = saved_curves


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    own, args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m asc_dist.bench.probe",
                                usage=__doc__.split("\n\n")[1])
    p.add_argument("out", type=Path, help="the JSON lines file")
    p.add_argument("--warmup", type=int, default=0, help="steps before the timed ones")
    p.add_argument("--settings", default="{}", help="JSON: cudnn_benchmark, tf32")
    p.add_argument("--launched", type=float, default=None, help="the parent's time.time() at start")
    p.add_argument("--device", default="cpu", help="cuda: CUDA events and device memory")
    a = p.parse_args(own)
    rec = Recorder(a.out)
    launched = a.launched if a.launched is not None else _T_MAIN
    try:
        import torch

        t1 = time.time()
        import asc_dist.train as tr

        t2 = time.time()
        # the interpreter and torch (which the bench package imports before this module runs)
        start = {"python_torch_s": max(0.0, t1 - launched), "asc_imports_s": t2 - t1}
        if "data.backend=dali" in args:
            from asc_dist.data import dali_available

            dali_available()  # DALI's import, here rather than inside the build
            start["dali_init_s"] = time.time() - t2
        cuda = a.device == "cuda"
        if cuda:
            t3 = time.perf_counter()
            torch.cuda.init()
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
            start["cuda_init_s"] = time.perf_counter() - t3
        rec.put("start", **start)
        apply_settings(json.loads(a.settings))
        with instrumented(rec, a.warmup, launched, cuda):
            rc = tr.main(args)
        rec.put("end", rc=rc, wall_s=time.time() - launched)
        return rc
    finally:
        rec.close()


if __name__ == "__main__":
    raise SystemExit(main())
