"""The GPU check's plan: what every step does and how long it may take, known before anything runs.

A GPU is lent for minutes, once: a check that finds out on the machine that a variant cannot run
(too few clips for one batch), that an epoch is shorter than what a streamed row must time, or that
its steps add up to more than the lease, has wasted it. So the check is planned first, from its
arguments alone (no GPU, no data needed: ``bench gpu --plan --device cuda`` works anywhere), and
refused when the plan is not worth running.

A step's budget = the fixed costs of the processes it starts (:class:`Fixed`: imports, CUDA
initialisation, model build, cuDNN autotuning, the trainer's final evaluation, checkpoint and
report) + SAFETY x its work (clips at the :class:`Rates`). The step is killed when it passes its
budget, so a budget is also a timeout. Where the budgets do not fit ``--budget``, the check does
less, in :data:`PRIORITY` order, and plans the rest as ``not run: budget``; steps also run in that
order, so a check stopped from outside has done the most important ones. What a check measures of
the fixed costs goes into its results.json; ``--costs results.json`` plans the next one with them.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict, dataclass, field, fields, replace

from asc_dist.errors import ConfigError

SAFETY = 1.5
DALI = "nvidia-dali-cuda130"
TEST_FRACTION = 0.05  # of the synthetic data: the test split only feeds evaluations


@dataclass(frozen=True)
class Fixed:
    """Seconds a process pays whatever its work. CPU-bound parts measured on the 2-core CI
    machine (BENCHMARKS.md, "GPU check: what a process pays"); the others (:data:`ESTIMATED`)
    are estimates until a GPU check has recorded them (results.json ``fixed_costs``;
    ``--costs``)."""

    python_torch: float  # interpreter start + import torch
    asc_imports: float  # the asc_dist modules a step or the trainer imports
    cuda_init: float  # CUDA context, cuBLAS/cuDNN handles, the first kernel
    dali_init: float  # import DALI + its first pipeline
    model_build: float  # ResNet-50 built and moved to the device
    autotune: float  # a process's first training step: cuDNN autotuning, lazy kernel loading
    loader_start: float  # one source: DataLoader workers started / DALI pipeline + shuffle fill
    pool_start: float  # a spawned process pool (synthesis, packing): its workers' imports
    final_eval: float  # the trainer's forced final evaluation, apart from its clips
    checkpoint: float  # one ResNet-50 checkpoint (282 MB with AdaBound's state), fsynced
    report: float  # report.json/md, confusion and per-class PNGs, the curves PNG
    pytest_start: float  # pytest started and the gpu-marked tests' files collected
    test_fixtures: float  # the session fixtures those tests build (tiny runs, shards, an export)
    compile: float  # a cold Inductor compile of the model, forward and backward

    def parts(self, *names: str) -> dict[str, float]:
        return {n: getattr(self, n) for n in names}


# Measured here (2 busy cores, warm page cache; BENCHMARKS.md "GPU check: what a process pays"):
# python + torch 1.45 s, the asc imports +0.25 s, DALI's import +0.6 s, ResNet-50 built in 1.13 s,
# its checkpoint 0.55 s (ext4), a run's report files 1.1-2.1 s, pytest started with the 8
# gpu-marked files collected ~7 s and their fixtures (tiny runs, shards, an export: built before
# the tests skip) 21 s. Rounded up for a node whose first torch import reads the CUDA libraries
# cold (4 s). Estimates, until a check on a GPU has measured them (--costs): CUDA init, the
# first step's autotuning, a source's and a process pool's start, the final evaluation's fixed
# part, DALI's GPU pipeline, the Inductor compile.
GPU_FIXED = Fixed(python_torch=4.0, asc_imports=0.5, cuda_init=4.0, dali_init=1.5,
                  model_build=1.5, autotune=6.0, loader_start=1.5, pool_start=2.0, final_eval=3.0,
                  checkpoint=1.5, report=3.0, pytest_start=7.0, test_fixtures=25.0,
                  compile=150.0)
# --device cpu at full size (a plan to be refused: ResNet-50 trains at a few clips/s here).
CPU_FIXED = replace(GPU_FIXED, python_torch=2.0, cuda_init=0.0, autotune=2.0, compile=120.0)
# --quick on the 2-core CI machine, which may be busy (the suite runs in two workers beside it):
# two to three times what an idle one measured.
CPU_QUICK_FIXED = Fixed(python_torch=4.0, asc_imports=0.5, cuda_init=0.0, dali_init=1.0,
                        model_build=0.3, autotune=1.0, loader_start=2.0, pool_start=3.0,
                        final_eval=1.0, checkpoint=0.3, report=4.0, pytest_start=10.0,
                        test_fixtures=1.0, compile=60.0)
ESTIMATED = ("cuda_init", "autotune", "loader_start", "pool_start", "final_eval", "compile")


@dataclass(frozen=True)
class Rates:
    """What a machine is expected to do per second (the work part of a budget)."""

    cores: int  # CPU cores assumed for synthesis, packing, CPU evaluation
    synth_clips_per_core_s: float  # distinct clips rendered (the bank)
    pack_clips_per_core_s: float  # decode + checks + encode + write (measured: 40 for 10-s clips)
    train_clips_s: dict[int, float]  # the model's training step, by per-GPU batch
    plain_clips_s: dict[int, float]  # the plain loop's torchvision ResNet, by batch
    decode_clips_per_worker_s: dict[str, float]  # a streamed source's rate per worker / thread
    cache_clips_s: dict[str, float]  # building the feature cache with every core, per backend
    eval_clips_s: float  # the trainer's evaluation on the device
    cpu_eval_clips_per_core_s: float  # evaluate on the CPU, float32 (measured: 26 for ResNet-50)
    cpu_logmel_clips_per_core_s: dict[str, float]  # a backend's log-mel on the CPU (parity)
    gpu_test_s: float  # one gpu-marked test's own work, beyond its fixtures


# An H100/H200 node with 16 cores: ResNet-50 bf16 at half the targets (8,000 / 5,000 clips/s).
# Measured here per core (2 busy cores; BENCHMARKS.md): DALI decodes 1133 10-s 48 kHz 24-bit
# clips/s per thread (700 assumed), a DataLoader worker reads + decodes + checks 171 (150
# assumed: the collate of a 256 batch adds ~1.2 ms per clip), packing 40 clips/s, synthesis ~3,
# ResNet-50 float32 evaluation 26 clips/s (16 cores at 40 % of 16 x that: ~170 clips/s).
GPU = Rates(cores=16, synth_clips_per_core_s=3.0, pack_clips_per_core_s=40.0,
            train_clips_s={64: 2500.0, 256: 4000.0}, plain_clips_s={64: 2500.0, 256: 4000.0},
            decode_clips_per_worker_s={"dali": 700.0, "torch": 150.0},
            cache_clips_s={"dali": 3000.0, "torch": 1000.0}, eval_clips_s=4000.0,
            cpu_eval_clips_per_core_s=26.0 * 0.4,
            cpu_logmel_clips_per_core_s={"dali": 200.0, "torch": 80.0}, gpu_test_s=3.0)
# --quick --device cpu: 1-s 16 kHz clips, the small DCASE 2018 CNN in the trainer (ResNet-18 in
# the plain loop) on 2 cores.
CPU_QUICK = Rates(cores=2, synth_clips_per_core_s=40.0, pack_clips_per_core_s=200.0,
                  train_clips_s={4: 6.0}, plain_clips_s={4: 3.0},
                  decode_clips_per_worker_s={"dali": 100.0, "torch": 60.0},
                  cache_clips_s={"dali": 150.0, "torch": 100.0}, eval_clips_s=40.0,
                  cpu_eval_clips_per_core_s=20.0,
                  cpu_logmel_clips_per_core_s={"dali": 100.0, "torch": 50.0}, gpu_test_s=2.0)
# --device cpu at full size: ResNet-50 on 10-s clips at a few clips/s.
CPU = replace(GPU, cores=2, train_clips_s={64: 5.0, 256: 5.0}, plain_clips_s={64: 5.0, 256: 5.0},
              decode_clips_per_worker_s={"dali": 200.0, "torch": 80.0},
              cache_clips_s={"dali": 40.0, "torch": 20.0}, eval_clips_s=20.0,
              cpu_eval_clips_per_core_s=26.0)


@dataclass(frozen=True)
class Limits:
    """What makes a plan worth running (full size) or a plumbing check (quick)."""

    min_timed_steps: int
    min_trainer_steps_per_epoch: int
    min_streamed_steps_per_epoch: int
    # A streamed row times >= this x workers x prefetch steps (the batches its loader holds
    # ready), all within one epoch: its clips/s and data wait are then the loader's.
    buffer_multiple: int


FULL_LIMITS = Limits(min_timed_steps=20, min_trainer_steps_per_epoch=3,
                     min_streamed_steps_per_epoch=10, buffer_multiple=5)
QUICK_LIMITS = Limits(min_timed_steps=2, min_trainer_steps_per_epoch=1,
                      min_streamed_steps_per_epoch=2, buffer_multiple=1)
# Streamed rows: few workers, so the loader's ready batches (workers x prefetch) are a fraction of
# the timed steps; cached rows build the cache with every core (0 = all).
STREAM_WORKERS, STREAM_PREFETCH = 2, 2
QUICK_STREAM_WORKERS = 1

# What the check does first when the budgets do not all fit (and the order it runs in). "bN-rows"
# are the loops and trainer rows at the smaller batches.
PRIORITY = ("data", "trainer-cached-main", "trainer-streamed-main", "stop-resume", "inference",
            "parity", "loops-main", "bN-rows", "compile", "gpu-tests")


@dataclass
class Variant:
    """One throughput row: a model alone, a plain loop, or the trainer with a backend and mode."""

    variant: str
    batch: int
    kind: str  # model | plain | trainer
    backend: str | None = None
    cache: str | None = None  # device (cached) | none (streamed)
    train_clips: int | None = None
    steps_per_epoch: int | None = None
    warmup_steps: int = 0
    timed_steps: int = 0
    workers: int | None = None  # data.num_threads for the trainer (0: every core)
    prefetch: int | None = None  # data.prefetch
    compile: bool = False  # model.compile


@dataclass
class Step:
    name: str
    does: str
    fixed: dict[str, float]  # the fixed costs of the processes it starts, by part
    work_s: float  # seconds of work at the stated rates, before SAFETY
    variants: list[Variant] = field(default_factory=list)
    group: str = ""  # its PRIORITY entry
    needs: tuple[str, ...] = ()  # packages, beyond what every step needs
    needs_cuda: str | None = None  # why it needs an accelerator, if it does
    after: tuple[str, ...] = ()  # steps whose outputs it uses
    why_not: str | None = None  # planned as not run, and why

    @property
    def fixed_s(self) -> float:
        return round(sum(self.fixed.values()), 1)

    @property
    def budget_s(self) -> float:
        return round(self.fixed_s + SAFETY * self.work_s, 1)

    @property
    def runs(self) -> bool:
        return self.why_not is None

    @property
    def status(self) -> str:
        return "run" if self.runs else f"not run: {self.why_not}"


@dataclass
class Plan:
    device: str
    quick: bool
    clips_per_class: int
    train_clips: int
    test_clips: int
    clip_seconds: float
    batches: tuple[int, ...]
    backends: tuple[str, ...]
    bank: int  # distinct rendered clips per class; the others are hard links to them
    resume_steps: int  # the stop/resume run's length
    fixed: Fixed
    steps: list[Step] = field(default_factory=list)
    budget_limit_s: float = 360.0
    missing: tuple[str, ...] = ()  # project dependencies this python lacks
    measured_costs: tuple[str, ...] = ()  # Fixed fields taken from --costs

    @property
    def budget_s(self) -> float:
        return round(sum(s.budget_s for s in self.steps if s.runs), 1)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def to_json(self) -> dict:
        return {
            "device": self.device, "quick": self.quick, "clips_per_class": self.clips_per_class,
            "train_clips": self.train_clips, "test_clips": self.test_clips,
            "clip_seconds": self.clip_seconds, "batches": list(self.batches),
            "backends": list(self.backends), "safety": SAFETY,
            "steps": [{"name": s.name, "status": s.status, "budget_s": s.budget_s,
                       "fixed_s": s.fixed_s, "work_s": round(s.work_s, 1), "fixed": s.fixed,
                       "does": s.does} for s in self.steps],
            "throughput": [{**asdict(v), "step": s.name, "status": s.status}
                           for s in self.steps for v in s.variants],
            "fixed_costs": asdict(self.fixed), "fixed_costs_measured": list(self.measured_costs),
            "budget_s": self.budget_s, "budget_limit_s": self.budget_limit_s,
            "missing": list(self.missing), "bundle_command": bundle_command(self.missing),
        }


# --- packages ----------------------------------------------------------------------------------

# What every step imports (config, synthesis, packing, digests, the optimizer, plots); DALI is
# needed by the DALI rows alone; torch, torchvision and torchaudio come with the node.
EVERY_STEP = ("omegaconf", "soundfile", "soxr", "xxhash", "numpy", "tqdm", "matplotlib",
              "adabound")
NODE_TORCH = ("torch", "torchvision", "torchaudio")
DEV = ("pytest",)  # not a dependency: the gpu-tests step's (the bundle's dev extra)


def _module(package: str) -> str:
    return "nvidia.dali" if package.startswith("nvidia-dali") else package.replace("-", "_")


def project_dependencies() -> list[str]:
    """The project's dependencies by name (pyproject.toml in a checkout, else the installed
    distribution's metadata)."""
    from asc_dist import bundle

    try:
        return [bundle.name_of(r) for r in bundle.requirements(bundle.read_project(), dev=False)
                if bundle.name_of(r) != "setuptools"]
    except bundle.BundleError:
        from importlib import metadata

        return [bundle.name_of(r) for r in metadata.requires("asc-dist") or []
                if "extra ==" not in r]


def missing_packages(deps: list[str] | None = None,
                     find=importlib.util.find_spec) -> tuple[str, ...]:
    """The project dependencies (and pytest, for the gpu-tests step) that this python cannot
    import, found without importing them."""
    out = []
    for name in [*(project_dependencies() if deps is None else deps), *DEV]:
        try:
            found = find(_module(name)) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return tuple(out)


def bundle_command(missing: tuple[str, ...] | list[str],
                   deps: list[str] | None = None) -> str | None:
    """The offline-bundle command that fetches exactly ``missing`` (and what they need) for this
    python: every other dependency skipped, the node's own torch among them; pytest comes with
    the dev extra (``--dev``)."""
    if not missing:
        return None
    deps = project_dependencies() if deps is None else deps
    skip = list(NODE_TORCH) + [d for d in deps if d not in missing and d not in NODE_TORCH]
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dev = " --dev" if any(m in DEV for m in missing) else ""
    return f"python -m asc_dist.bundle BUNDLE_DIR --python {py}{dev} --skip {','.join(skip)}"


def missing_line(missing: tuple[str, ...] | list[str]) -> str | None:
    if not missing:
        return None
    dev = (" (--dev: pytest for the gpu-tests step, with the dev extra's librosa and ruff)"
           if any(m in DEV for m in missing) else "")
    return (f"missing here: {', '.join(missing)}; fetch exactly those on a machine with internet: "
            f"{bundle_command(missing)}{dev}")


# --- making the plan ---------------------------------------------------------------------------


def step_name(v: Variant) -> str:
    if v.kind != "trainer":
        return f"loops-b{v.batch}"
    mode = "cached" if v.cache == "device" else "streamed"
    return f"trainer-{v.backend}-{mode}-b{v.batch}" + ("-compiled" if v.compile else "")


def variants(quick: bool, batches: tuple[int, ...], train_clips: int,
             backends: tuple[str, ...], cached_backend: str) -> list[Variant]:
    """The throughput rows. Per batch: the model alone and a plain loop (one process), the
    trainer cached (the features resident: which backend built them does not matter once they
    are, so one backend) and streamed (each backend at the largest batch, the cached one's at
    the others); the cached trainer compiled at the largest batch."""
    warmup, timed = (2, 3) if quick else (10, 30)
    limits = QUICK_LIMITS if quick else FULL_LIMITS
    workers = QUICK_STREAM_WORKERS if quick else STREAM_WORKERS
    stream_timed = max(limits.min_timed_steps, limits.buffer_multiple * workers * STREAM_PREFETCH)
    stream_warmup = max(warmup, workers * STREAM_PREFETCH)
    arch = "resnet18" if quick else "resnet50"
    out = []
    for batch in batches:
        main = batch == max(batches)
        out.append(Variant("model only (resident batch)", batch, "model", warmup_steps=warmup,
                           timed_steps=timed))
        out.append(Variant(f"plain PyTorch loop ({arch})", batch, "plain", warmup_steps=warmup,
                           timed_steps=timed))
        out.append(Variant(f"trainer {cached_backend}, cached", batch, "trainer", cached_backend,
                           "device", train_clips, train_clips // batch, warmup, timed, workers=0,
                           prefetch=2))
        for backend in backends if main else (cached_backend,):
            out.append(Variant(f"trainer {backend}, streamed", batch, "trainer", backend, "none",
                               train_clips, train_clips // batch, stream_warmup, stream_timed,
                               workers=workers, prefetch=STREAM_PREFETCH))
    b = max(batches)
    out.append(Variant(f"trainer {cached_backend}, cached, compiled", b, "trainer",
                       cached_backend, "device", train_clips, train_clips // b, warmup, timed,
                       workers=0, prefetch=2, compile=True))
    return out


def default_clips_per_class(quick: bool, batches: tuple[int, ...]) -> int:
    """Enough for every streamed row's warm-up and timed steps within one epoch (and the
    streamed minimum) at the largest batch."""
    from asc_dist.synth import split_sizes

    limits = QUICK_LIMITS if quick else FULL_LIMITS
    streamed = [v for v in variants(quick, batches, 0, ("dali", "torch"), "dali")
                if v.cache == "none" and v.batch == max(batches)]
    steps = max([limits.min_streamed_steps_per_epoch]
                + [v.warmup_steps + v.timed_steps for v in streamed])
    need = steps * max(batches)
    lo, hi = 2, 2  # the train split grows with the clips per class: double, then bisect
    while split_sizes(hi, test_fraction=TEST_FRACTION)[0] < need:
        lo, hi = hi, 2 * hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if split_sizes(mid, test_fraction=TEST_FRACTION)[0] < need \
            else (lo, mid)
    return hi


def _trainer_fixed(f: Fixed, backend: str, *, evaluates: bool = True, compiled: bool = False,
                   prefix: str = "trainer") -> dict[str, float]:
    """One trainer process: it starts, builds, tunes, trains; at its end evaluates, checkpoints
    and reports (a stopped one checkpoints and draws its curves, without evaluating)."""
    parts = f.parts("python_torch", "asc_imports", "cuda_init", "model_build", "autotune",
                    "checkpoint", "report")
    parts["loader_start"] = f.loader_start * (2 if evaluates else 1)
    if backend == "dali":
        parts["dali_init"] = f.dali_init
    if evaluates:
        parts["final_eval"] = f.final_eval
    if compiled:
        parts["compile"] = f.compile
    return {f"{prefix}.{k}": v for k, v in parts.items() if v}


def _step_fixed(f: Fixed, *, device: bool, dali: bool = False) -> dict[str, float]:
    """The step's own process (its imports; CUDA when it uses the device itself)."""
    parts = f.parts("python_torch", "asc_imports")
    if device:
        parts["cuda_init"] = f.cuda_init
    if dali:
        parts["dali_init"] = f.dali_init
    return {f"step.{k}": v for k, v in parts.items() if v}


def make_plan(*, device: str, quick: bool, clips_per_class: int | None = None,
              budget: float = 360.0, backends: tuple[str, ...] = ("dali", "torch"),
              gpu_test_files: int = 8, gpu_tests: int = 9, with_tests: bool = True,
              missing: tuple[str, ...] = (), costs: dict[str, float] | None = None) -> Plan:
    """The whole check for these arguments, each step planned to run or not (and why);
    :func:`validate` says whether it is worth running."""
    from asc_dist.synth import split_sizes

    rates = CPU_QUICK if quick else CPU if device == "cpu" else GPU
    fixed = CPU_QUICK_FIXED if quick else CPU_FIXED if device == "cpu" else GPU_FIXED
    known = {f.name for f in fields(Fixed)}
    measured = {k: float(v) for k, v in (costs or {}).items() if k in known and v is not None}
    fixed = replace(fixed, **measured)
    batches = (4,) if quick else (64, 256)
    clip_seconds = 1.0 if quick else 10.0
    if clips_per_class is None:
        clips_per_class = default_clips_per_class(quick, batches)
    train, test = split_sizes(clips_per_class, test_fraction=TEST_FRACTION)
    total = train + test
    bank = min(clips_per_class, 8)
    resume_steps = 8 if quick else 30
    cached_backend = next((b for b in backends if b == "torch" or DALI not in missing), "torch")
    plan = Plan(device, quick, clips_per_class, train, test, clip_seconds, batches, backends, bank,
                resume_steps, fixed, budget_limit_s=budget, missing=missing,
                measured_costs=tuple(sorted(measured)))
    f, r, cores = fixed, rates, rates.cores
    main = max(batches)
    b0 = batches[0]
    steps = [Step(
        "data", f"{total} synthetic {clip_seconds:g}-s clips ({train} train, {test} test) "
                f"assembled from {10 * bank} rendered ones, packed",
        {**_step_fixed(f, device=False), "pools": 2 * f.pool_start},
        10 * bank / (r.synth_clips_per_core_s * cores) + total / (r.pack_clips_per_core_s * cores),
        group="data")]

    def trainer_step(v: Variant) -> Step:
        steps_run = v.warmup_steps + v.timed_steps
        work = steps_run * v.batch / r.train_clips_s[v.batch]
        if v.cache == "device":
            work += total / r.cache_clips_s[v.backend] + test / r.eval_clips_s
        else:
            stream = v.workers * r.decode_clips_per_worker_s[v.backend]
            work = max(work, steps_run * v.batch / stream) + test / min(stream, r.eval_clips_s)
        group = ("compile" if v.compile else
                 f"trainer-{'cached' if v.cache == 'device' else 'streamed'}-main"
                 if v.batch == main else "bN-rows")
        extra = (f"; workers {v.workers or 'all'} x prefetch {v.prefetch}"
                 if v.cache == "none" else "")
        return Step(step_name(v), v.variant + extra,
                    {**_step_fixed(f, device=False),
                     **_trainer_fixed(f, v.backend, compiled=v.compile)},
                    work, [v], group=group, needs=(DALI,) if v.backend == "dali" else (),
                    needs_cuda="a GPU number: train.compile on vs off" if v.compile else None,
                    after=("data",))

    rows = variants(quick, batches, train, backends, cached_backend)
    for v in rows:
        if v.kind == "trainer":
            steps.append(trainer_step(v))
    cache_once = total / min(r.cache_clips_s.values())
    steps.append(Step(
        "stop-resume", f"{'bf16' if device == 'cuda' else 'fp32'} training at batch {b0}, "
                       f"SIGTERM at step {resume_steps // 3}, resumed to {resume_steps}",
        {**_step_fixed(f, device=False),
         **_trainer_fixed(f, cached_backend, evaluates=False, prefix="stopped"),
         **_trainer_fixed(f, cached_backend, prefix="resumed")},
        cache_once + resume_steps * b0 / r.train_clips_s[b0] + test / r.eval_clips_s,
        group="stop-resume", after=("data",)))
    cpu_eval = r.cpu_eval_clips_per_core_s * cores
    steps.append(Step(
        "inference", "evaluate and predict on the device vs the CPU (float32)",
        {**_step_fixed(f, device=True), "model_build": 2 * f.model_build,
         "loader_start": 2 * f.loader_start},
        test / cpu_eval + 3 * test / r.eval_clips_s, group="inference",
        needs_cuda="nothing to compare the CPU with", after=("stop-resume",)))
    steps.append(Step(
        "parity", "DALI and torch log-mel on the device vs the CPU",
        {**_step_fixed(f, device=True, dali=DALI not in missing),
         "loader_start": 2 * len(backends) * f.loader_start},
        sum(test / (r.cpu_logmel_clips_per_core_s[b] * cores)
            + test / min(r.eval_clips_s, cores * r.decode_clips_per_worker_s[b])
            for b in backends), group="parity", after=("data",)))
    for batch in batches:
        loops = [v for v in rows if v.kind in ("model", "plain") and v.batch == batch]
        steps.append(Step(
            f"loops-b{batch}", "; ".join(v.variant for v in loops)
            + "; augment + KD per step; host-to-device copies",
            {**_step_fixed(f, device=True), "model_build": 2 * f.model_build,
             "autotune": 2 * f.autotune},
            sum((v.warmup_steps + v.timed_steps) * batch
                / (r.plain_clips_s if v.kind == "plain" else r.train_clips_s)[batch] for v in loops)
            + (0 if quick else 2.0), loops, group="loops-main" if batch == main else "bN-rows"))
    steps.append(Step(
        "gpu-tests", f"the gpu-marked tests ({gpu_tests} marks in {gpu_test_files} files; "
                     f"pytest -m gpu --durations=0)" if not quick else
                     "the gpu-marked test of tests/test_features.py (the plumbing)",
        {**f.parts("pytest_start", "test_fixtures"),
         **({"compile": f.compile / 3} if device == "cuda" and not quick else {})},
        (1 if quick else gpu_tests) * r.gpu_test_s, group="gpu-tests", needs=DEV))
    if not with_tests:
        steps[-1].why_not = "--skip-tests"
    order = {g: i for i, g in enumerate(PRIORITY)}
    plan.steps = sorted(steps, key=lambda s: order[s.group])  # stable within a group
    for s in plan.steps:
        absent = [p for p in (*EVERY_STEP, *s.needs) if p in missing]
        if absent and s.runs:
            s.why_not = f"{', '.join(absent)} missing"
        elif s.needs_cuda and device != "cuda" and s.runs:
            s.why_not = f"GPU-only ({s.needs_cuda})"
    fit(plan)
    return plan


def fit(plan: Plan) -> None:
    """In priority order, each step that still fits the budget runs; the others are planned as
    ``not run: budget``, and so is a step whose input a step not run would have made."""
    used = 0.0
    for s in plan.steps:
        gone = [a for a in s.after if a in {t.name for t in plan.steps if not t.runs}]
        if s.runs and gone:
            s.why_not = f"needs {', '.join(gone)}, not run"
        if not s.runs:
            continue
        if used + s.budget_s > plan.budget_limit_s:
            s.why_not = "budget"
        else:
            used += s.budget_s


def validate(plan: Plan) -> None:
    """Refuse a plan not worth a GPU lease, naming the variant or the budget at fault."""
    validate_variants(plan)
    validate_budget(plan)


def validate_variants(plan: Plan) -> None:
    """The worst variant first: one that cannot run at all before one that runs too short."""
    limits = QUICK_LIMITS if plan.quick else FULL_LIMITS
    faults = []  # (how far below the need, message)
    for step, v in [(s, v) for s in plan.steps for v in s.variants]:
        at = f"{step.name} ({v.variant}, batch {v.batch})"
        if v.timed_steps < limits.min_timed_steps:
            faults.append((v.timed_steps / limits.min_timed_steps,
                           f"{at}: {v.timed_steps} timed steps, need >= {limits.min_timed_steps}"))
        if v.kind != "trainer":
            continue
        streamed = v.cache == "none"
        need = (limits.min_streamed_steps_per_epoch if streamed
                else limits.min_trainer_steps_per_epoch)
        if streamed:  # warm-up and timed steps within one epoch
            need = max(need, v.warmup_steps + v.timed_steps)
            ready = limits.buffer_multiple * v.workers * v.prefetch
            if v.timed_steps < ready:
                faults.append((v.timed_steps / ready, (
                    f"{at}: {v.timed_steps} timed steps, need >= {ready} "
                    f"({limits.buffer_multiple} x {v.workers} workers x prefetch {v.prefetch}: "
                    f"fewer would time the prefetch buffer, not the loader)")))
        if v.steps_per_epoch < need:
            faults.append((v.steps_per_epoch / need, (
                f"{at}: {v.train_clips} train clips give {v.steps_per_epoch} steps per epoch, "
                f"need >= {need}: raise --clips-per-class (now {plan.clips_per_class})")))
    if faults:
        faults.sort(key=lambda f: f[0])
        more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
        raise ConfigError(faults[0][1] + more)


def validate_budget(plan: Plan) -> None:
    """Every step runs or says why not; a budget that leaves nothing that could run is refused."""
    if not any(s.runs for s in plan.steps) and any(s.why_not == "budget" for s in plan.steps):
        first = next(s for s in plan.steps if s.why_not == "budget")
        raise ConfigError(f"--budget {plan.budget_limit_s:.0f} s leaves no step to run "
                          f"({first.name} alone needs {first.budget_s:.0f} s): raise --budget")


def select(plan: Plan, only: list[str] | None, skip: list[str] | None) -> Plan:
    """The plan restricted to ``--only`` / without ``--skip`` (step names, or prefixes ending in
    '-' or '*', e.g. ``trainer-*``); an unknown name is refused listing the known ones. The
    budget is then fitted to what is left."""
    names = [s.name for s in plan.steps]

    def match(pattern: str) -> list[str]:
        hits = [n for n in names if n == pattern or (pattern.endswith(("*", "-"))
                                                     and n.startswith(pattern.rstrip("*")))]
        if not hits:
            raise ConfigError(f"no step named {pattern!r}; steps: {', '.join(names)}")
        return hits

    keep = set(names)
    if only:
        keep = {n for p in only for n in match(p)}
    for p in skip or []:
        keep -= set(match(p))
    if not keep:
        raise ConfigError(f"--only/--skip leave no step to run; steps: {', '.join(names)}")
    plan.steps = [s for s in plan.steps if s.name in keep]
    for s in plan.steps:
        if s.why_not == "budget" or (s.why_not or "").startswith("needs "):
            s.why_not = None
        s.after = tuple(a for a in s.after if a in keep)  # the others ran in an earlier call
    fit(plan)
    return plan


def describe(plan: Plan) -> str:
    """The plan as a table: each step's fixed costs and work (the two parts of its budget)."""
    lines = [missing_line(plan.missing) or "missing here: nothing",
             (f"GPU check plan ({plan.device}{', quick' if plan.quick else ''}): "
              f"{plan.clips_per_class} clips per class = {plan.train_clips} train + "
              f"{plan.test_clips} test clips of {plan.clip_seconds:g} s"),
             "", "| step | fixed s | work s | budget s | status | what |",
             "|---|---:|---:|---:|---|---|"]

    def detail(s: Step) -> str:
        v = s.variants[-1] if s.variants else None
        if v is None:
            return ""
        per_epoch = f"; {v.steps_per_epoch} steps/epoch" if v.steps_per_epoch else ""
        return f"; batch {v.batch}{per_epoch}; {v.warmup_steps} + {v.timed_steps} timed steps"

    lines += [f"| {s.name} | {s.fixed_s:.1f} | {SAFETY:g} x {s.work_s:.1f} | {s.budget_s:.0f} | "
              f"{s.status} | {s.does}{detail(s)} |" for s in plan.steps]
    skipped = [s.name for s in plan.steps if s.why_not == "budget"]
    lines += ["", f"total budget {plan.budget_s:.0f} s (limit --budget {plan.budget_limit_s:.0f} s)"
              + (f"; not run for the budget: {', '.join(skipped)}" if skipped else "")]
    stated = ", ".join(
        f"{k} {v:g}" + (" (measured)" if k in plan.measured_costs else
                        " (estimate)" if k in ESTIMATED and plan.device == "cuda" else "")
        for k, v in asdict(plan.fixed).items())
    lines.append(f"fixed costs per process part, s: {stated}")
    return "\n".join(lines)
