"""``bench gpu [OUT_DIR]``: verify a GPU node end to end and measure it, planned and bounded.

``launch/gpu_check.sh OUT_DIR`` runs this in the python it is given. This module is the runner:
it plans the check (asc_dist.bench.plan: every step's budget from the fixed costs of its processes
and its work, refused when not worth a lease, the rest fitted to ``--budget`` by priority;
``--plan`` prints it and runs nothing), then runs each step (asc_dist.bench.gpu_steps) as a child
process in its own process group, killed when it passes its budget, and keeps the results:
``OUT_DIR/results.json`` and ``OUT_DIR/summary.md`` (asc_dist.bench.gpu_results), rewritten after
every step, so a check killed at any moment leaves valid files with every finished step. A step
writes its record as its results come, so even a killed one keeps what it had measured.

The project dependencies missing from this python are named first, in one line, with the
offline-bundle command that fetches exactly those; the rows that need one are planned as
``not run: <package> missing``. ``--only``/``--skip`` split the check over several calls sharing
one ``--work`` folder (the data is built once); each call merges its steps into OUT_DIR's
results, and a rerun repeats each step from scratch. It needs no network and changes no
environment. ``--device cpu --quick`` runs it all at toy size on a CPU (the tests do).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from asc_dist import atomic
from asc_dist.bench import gpu_results
from asc_dist.bench import plan as planning
from asc_dist.bench.procs import run_bounded
from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)


def _plan_from(args) -> planning.Plan:
    from asc_dist.bench.gpu_steps import count_gpu_tests

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    files, tests = count_gpu_tests()
    p = planning.make_plan(device=device, quick=args.quick, clips_per_class=args.clips_per_class,
                           budget=args.budget, missing=planning.missing_packages(),
                           gpu_test_files=files, gpu_tests=tests, with_tests=not args.skip_tests,
                           costs=_costs(args.costs, device, args.quick))
    planning.validate_variants(p)  # the whole check's variants, whatever --only selects
    planning.select(p, _names(args.only), _names(args.skip))
    planning.validate_budget(p)
    return p


def _costs(path: str | None, device: str, quick: bool) -> dict | None:
    """The fixed costs an earlier check measured (its results.json), for this plan."""
    if not path:
        return None
    try:
        prev = json.loads(Path(path).read_text())
        costs = prev["fixed_costs"]["measured"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--costs {path}: not a GPU check's results.json ({e})") from None
    if (prev.get("device"), prev.get("quick")) != (device, quick):
        raise ConfigError(f"--costs {path} was measured with --device {prev.get('device')}"
                          f"{' --quick' if prev.get('quick') else ''}, not this plan's")
    return costs


def _names(s: str | None) -> list[str] | None:
    return [n for n in s.split(",") if n] if s else None


def _merge_previous(out: Path, results: dict) -> None:
    """A split check: this call's steps join the earlier calls' ones (same device and size)."""
    old = out / "results.json"
    if not old.is_file():
        return
    try:
        prev = json.loads(old.read_text())
        if (prev.get("device"), prev.get("quick")) == (results["device"], results["quick"]):
            results["steps"] = prev.get("steps", {})
    except (OSError, ValueError):
        log.warning(f"[gpu_check] {old} is unreadable: starting a new one")


def _write(out: Path, results: dict, t0: float) -> None:
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["gpu_user"] = gpu_results.gpu_user(results)
    results["fixed_costs"]["measured"] = gpu_results.measured_costs(results)
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic.write_text(out / "summary.md", gpu_results.summary(results))


def _step_command(args, plan: planning.Plan, step: planning.Step, work: Path) -> list[str]:
    return [sys.executable, "-m", "asc_dist.bench", "gpu", "--run-step", step.name,
            "--work", str(work), "--device", plan.device,
            "--clips-per-class", str(plan.clips_per_class), "--missing", ",".join(plan.missing),
            "--launched", repr(time.time()), "--deadline", repr(time.time() + step.budget_s),
            *(["--quick"] if plan.quick else []), *(["--skip-tests"] if args.skip_tests else [])]


def run(args) -> int:
    if args.run_step:
        from asc_dist.bench.gpu_steps import run_step

        return run_step(args)
    plan = _plan_from(args)
    if args.plan:
        print(json.dumps(plan.to_json(), indent=2) if args.json else planning.describe(plan))
        return 0
    if not args.out_dir:
        raise ConfigError("OUT_DIR is required unless --plan (where results.json and summary.md "
                          "go)")
    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available on this machine")
    from asc_dist.bench import machine

    missing = planning.missing_line(plan.missing)
    first, rest = planning.describe(plan).split("\n", 1)  # what is missing, said first
    (log.warning if missing else log.info)(first)
    log.info(rest)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "device": plan.device, "quick": plan.quick,
               "torch": torch.__version__, "missing": list(plan.missing),
               "missing_line": missing, "bundle_command": planning.bundle_command(plan.missing),
               "plan": plan.to_json(), "steps": {}, "seconds": 0.0,
               "fixed_costs": {"planned": plan.to_json()["fixed_costs"], "measured": {}}}
    _merge_previous(out, results)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="asc-gpu-check-"))
    # Stopped from outside (a command limit, Ctrl-C): the running step's process tree is killed
    # on the way out (run_bounded) and results.json already holds every finished step.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.perf_counter()
    try:
        for step in plan.steps:
            # a step whose input a step of this call did not make is not started
            unmet = [a for a in step.after if results["steps"][a]["status"] != "ok"]
            if not step.runs or unmet:
                why = step.why_not or f"{', '.join(unmet)} did not finish: nothing to start from"
                rec = {"status": "not run", "why": why, "seconds": 0.0, "budget_s": step.budget_s}
            else:
                log.info(f"[gpu_check] {step.name} (budget {step.budget_s:g} s) ...")
                rec = run_bounded(step.name, step.budget_s,
                                  _step_command(args, plan, step, work), work)
            results["steps"][step.name] = rec
            _write(out, results, t0)
            log.info(f"[gpu_check] {step.name}: {rec['status']} ({rec['seconds']} s)"
                     + (f": {rec['why'].splitlines()[0]}" if rec.get("why") else ""))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=str) if args.json
          else gpu_results.summary(results), end="")
    bad = [s.name for s in plan.steps
           if results["steps"][s.name]["status"] in ("failed", "timed_out", "partial")]
    log.info(f"[gpu_check] {len(plan.steps)} steps in {results['seconds']} s"
             + (f"; FAILED or cut short: {', '.join(bad)}" if bad else "; none failed")
             + f"; wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 1 if bad else 0


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("gpu", help="verify and measure a GPU node end to end (launch/gpu_check.sh)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="results.json and summary.md go here (nothing else)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true",
                   help="toy size (seconds; what the CPU tests run)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan with its budgets; run nothing")
    p.add_argument("--json", action="store_true", help="print JSON (the plan, or the results)")
    p.add_argument("--clips-per-class", type=int, default=None,
                   help="synthetic clips per class (default: enough for every streamed row's "
                        "steps within one epoch)")
    p.add_argument("--budget", type=float, default=360.0,
                   help="seconds the steps' budgets may add up to; what does not fit, in "
                        "priority order, is planned as 'not run: budget'")
    p.add_argument("--costs", help="an earlier check's results.json: plan with the fixed costs "
                                   "it measured")
    p.add_argument("--only", help="comma list of steps to run (names from --plan; 'trainer-*' "
                                  "prefixes)")
    p.add_argument("--skip", help="comma list of steps not to run")
    p.add_argument("--work", help="synthetic data, shards and runs (default: a temporary folder "
                                  "removed at the end; a given one is kept and reused)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    # the runner's child, one step: its arguments
    p.add_argument("--run-step", help=argparse.SUPPRESS)
    p.add_argument("--missing", default="", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
