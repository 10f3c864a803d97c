"""What the GPU check's records say: the numbers a GPU user asks for, the fixed costs it met (for
the next plan: ``--costs``) and ``summary.md``. Pure functions of results.json's ``steps``.

The GPU-user numbers are always present, as fields of results.json (``gpu_user``) and lines of
summary.md; the ones that need CUDA are null on a CPU and said to be GPU-only (:data:`GPU_ONLY`).
"""

from __future__ import annotations

from asc_dist.bench.plan import Fixed

# field -> why it needs CUDA (null on a CPU)
GPU_ONLY = {
    "compile": "train.compile on vs off is planned on a GPU only",
    "gpu_idle": "CUDA events",
    "h2d": "host-to-device copies",
    "dali_device_memory": "device memory outside torch's allocator",
    "launch_bound": "device ms from CUDA events",
}
# fields measured on a CPU too, with parts that need CUDA
PARTLY_GPU = {
    "time_to_first_step": "CUDA init",
    "peak_memory": "pinned and device memory",
    "augment_kd": "device ms (CUDA events)",
}
LABELS = {
    "time_to_first_step": "time to first training step, per trainer process",
    "compile": "train.compile on vs off (trainer, batch 256)",
    "gpu_idle": "GPU idle between steps",
    "h2d": "host-to-device bandwidth",
    "peak_memory": "peak host / pinned / shared / device memory after the warm-up",
    "dali_device_memory": "DALI's device memory",
    "eval_and_checkpoint": "evaluation clips/s and checkpoint seconds",
    "augment_kd": "Frequency-MixStyle + masks + roll, and KD lookups, per step",
    "launch_bound": "launch-bound at the small batch (host ms to issue a step vs device ms)",
}


def _trainer_rows(results: dict) -> dict[str, dict]:
    return {name: rec["rows"][0] for name, rec in results["steps"].items()
            if name.startswith("trainer-") and rec.get("rows")}


def gpu_user(results: dict) -> dict:
    """Each number, by the step that measured it ({} or None where nothing measured it)."""
    rows = _trainer_rows(results)
    loops = {n: r for n, r in results["steps"].items() if n.startswith("loops-")}
    out: dict = {"time_to_first_step": {}, "gpu_idle": {}, "peak_memory": {},
                 "dali_device_memory": {}, "eval_and_checkpoint": {}, "launch_bound": {},
                 "h2d": {}, "augment_kd": {}, "compile": None}
    for name, r in rows.items():
        ph = r.get("phases", {})
        imports = [ph.get(k) for k in ("python_torch_s", "asc_imports_s", "dali_init_s")]
        out["time_to_first_step"][name] = {
            "imports_s": sum(x for x in imports if x is not None) if ph else None,
            "cuda_init_s": ph.get("cuda_init_s"), "build_s": ph.get("build_s"),
            "first_step_s": ph.get("first_step_s"), "total_s": ph.get("time_to_first_step_s"),
            "compile_s": None}
        out["gpu_idle"][name] = r.get("gpu_idle_pct")
        out["peak_memory"][name] = {"host_gb": r.get("peak_host_gb"),
                                    "pinned_gb": r.get("peak_pinned_gb"),
                                    "shared_gb": r.get("peak_shared_gb"),
                                    "device_gb": r.get("peak_mem_gb")}
        if "dali" in name:
            out["dali_device_memory"][name] = r.get("outside_torch_gb")
        out["eval_and_checkpoint"][name] = {"eval_clips_per_s": r.get("eval_clips_per_s"),
                                            "checkpoint_s": ph.get("checkpoint_s")}
        if "streamed" in name:
            out["h2d"][f"{name} (needed)"] = r.get("h2d_needed_gbps")
    eager = [n for n in rows if not n.endswith("-compiled")]
    smallest = min((rows[n]["batch"] for n in eager), default=None)
    for n in eager:  # the step's own host and device ms, cached or streamed alike
        r = rows[n]
        if r["batch"] == smallest:
            out["launch_bound"][n] = {"host_ms": r.get("host_ms"), "device_ms": r.get("device_ms"),
                                      "launch_bound": r.get("launch_bound")}
    for name, rec in loops.items():
        if (rec.get("h2d") or {}).get("pinned_gbps") is not None:
            out["h2d"][name] = rec["h2d"]
        if rec.get("augment_kd"):
            out["augment_kd"][name] = rec["augment_kd"]
    compiled = next((n for n in rows if n.endswith("-compiled")), None)
    base = compiled and rows.get(compiled.removesuffix("-compiled"))
    if compiled and base:
        c, e = rows[compiled], base
        fc, fe = c["phases"].get("first_step_s"), e["phases"].get("first_step_s")
        out["compile"] = {
            "compile_s": fc - fe if fc is not None and fe is not None else None,
            "speedup": (c["clips_per_s"] / e["clips_per_s"]
                        if c.get("clips_per_s") and e.get("clips_per_s") else None),
            "eager_clips_per_s": e.get("clips_per_s"), "compiled_clips_per_s": c.get("clips_per_s")}
        out["time_to_first_step"][compiled]["compile_s"] = out["compile"]["compile_s"]
    out["gpu_only"] = GPU_ONLY
    return out


def measured_costs(results: dict) -> dict[str, float]:
    """The fixed costs this check met, per :class:`~asc_dist.bench.plan.Fixed` part (the worst
    seen): ``--costs results.json`` plans the next check with them."""
    seen: dict[str, list[float]] = {}

    def add(key: str, value) -> None:
        if value is not None:
            seen.setdefault(key, []).append(float(value))

    def from_phases(ph: dict, compiled: bool = False) -> None:
        for key, part in (("python_torch_s", "python_torch"), ("asc_imports_s", "asc_imports"),
                          ("dali_init_s", "dali_init"),
                          ("cuda_init_s", "cuda_init"), ("model_build_s", "model_build"),
                          ("eval_s", "final_eval"), ("checkpoint_s", "checkpoint"),
                          ("report_s", "report")):
            add(part, ph.get(key))
        if not compiled:
            add("autotune", ph.get("first_step_s"))

    for name, r in _trainer_rows(results).items():
        from_phases(r.get("phases", {}), compiled=name.endswith("-compiled"))
    sr = results["steps"].get("stop-resume", {})
    for ph in sr.get("phases", {}).values():
        from_phases(ph)
    for rec in results["steps"].values():
        add("cuda_init", rec.get("process", {}).get("cuda_init_s"))
    tests = results["steps"].get("gpu-tests", {})
    if tests.get("status") == "ok":
        add("pytest_start", tests.get("start_s"))
        add("test_fixtures", tests.get("fixtures_s"))
    compile_s = (gpu_user(results).get("compile") or {}).get("compile_s")
    add("compile", compile_s)
    known = set(Fixed.__dataclass_fields__)
    return {k: round(max(v), 2) for k, v in sorted(seen.items()) if k in known}


def comparisons(results: dict) -> dict:
    """The trainer's best against the plain loop at each batch, and the recipe's projected time."""
    rows = [r for rec in results["steps"].values() for r in rec.get("rows", [])
            if r.get("clips_per_s")]
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        at = [r for r in rows if r["batch"] == batch]
        plain = next((r for r in at if r["variant"].startswith("plain")), None)
        best = max((r for r in at if r["variant"].startswith("trainer")), default=None,
                   key=lambda r: r["clips_per_s"])
        if plain and best:
            out[f"trainer_vs_plain_loop_batch{batch}"] = best["clips_per_s"] / plain["clips_per_s"]
        if best and batch == 64 and best.get("step_ms"):
            out["projected_5000_iterations_s"] = 5000 * best["step_ms"] / 1000
    return out


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _empty(v) -> bool:
    return all(_empty(x) for x in v.values()) if isinstance(v, dict) else v is None


def _render(value) -> str:
    """``k v, k v`` for a dict of numbers; ``name: k v, ...; name2: ...`` for one by step."""
    if not isinstance(value, dict):
        return _fmt(value)
    if any(isinstance(v, dict) for v in value.values()):
        return "; ".join(f"{name}: {_render(v)}" for name, v in value.items() if not _empty(v))
    return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if v is not None)


def _line(field: str, value, cuda: bool) -> str:
    if _empty(value):
        if not cuda and field in GPU_ONLY:
            return f"- {LABELS[field]}: GPU only ({GPU_ONLY[field]}): null on a CPU"
        return f"- {LABELS[field]}: not measured (its step did not run)"
    note = ""
    if not cuda and (field in GPU_ONLY or field in PARTLY_GPU):
        note = f" ({GPU_ONLY.get(field) or PARTLY_GPU[field]}: GPU only, null on a CPU)"
    return f"- {LABELS[field]}: {_render(value)}{note}"


def summary(results: dict) -> str:
    cuda = results["device"] == "cuda"
    lines = [f"# GPU check ({results['device']}{', quick' if results['quick'] else ''})", "",
             f"machine: {results['machine']}; torch {results['torch']}", "",
             results.get("missing_line") or "missing here: nothing", "",
             "| step | status | seconds | budget s | details |", "|---|---|---:|---:|---|"]
    for name, rec in results["steps"].items():
        details = rec.get("why") or ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("status", "seconds", "budget_s", "traceback", "log_tail", "rows",
                         "settings", "process", "phases", "h2d", "augment_kd", "files"))
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', 0)} | "
                     f"{rec.get('budget_s', 0):g} | {details.splitlines()[0] if details else ''} |")
    lines += ["", ("| variant | batch | steps/epoch | workers x prefetch | clips/s | step ms | "
                   "data wait % | peak GiB | MFU | status |"),
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for rec in results["steps"].values():
        for r in rec.get("rows", []):
            wp = (f"{r['workers'] if r['workers'] else 'all'} x {r['prefetch']}"
                  if r.get("prefetch") else "—")
            lines.append(
                f"| {r['variant']} | {r['batch']} | {_fmt(r.get('steps_per_epoch'), 'd')} | {wp} | "
                f"{_fmt(r.get('clips_per_s'), '.0f')} | {_fmt(r.get('step_ms'), '.1f')} | "
                f"{_fmt(r.get('data_wait_pct'), '.1f')} | {_fmt(r.get('peak_mem_gb'), '.2f')} | "
                f"{_fmt(r.get('mfu'), '.1%')} | {r.get('status', 'ok')} |")
    lines += ["", "Numbers a GPU user asks for (results.json `gpu_user`):", ""]
    user = results.get("gpu_user") or gpu_user(results)
    lines += [_line(field, user[field], cuda) for field in LABELS]
    ratios = comparisons(results)
    if ratios:
        lines += [""] + [f"- {k}: {v:.3g}" for k, v in ratios.items()]
    costs = results.get("fixed_costs", {}).get("measured") or {}
    if costs:
        lines += ["", "fixed costs met, s (worst; `--costs results.json` plans with them): "
                  + ", ".join(f"{k} {v:g}" for k, v in costs.items())]
    return "\n".join(lines) + "\n"
