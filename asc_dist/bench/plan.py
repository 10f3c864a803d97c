"""The GPU check's plan: what every step does and how long it may take, known before anything runs.

A GPU is lent for minutes, once: a check that finds out on the machine that a variant cannot run
(too few clips for one batch), that an epoch is shorter than the pipeline's prefetch, or that the
steps add up to more than the lease, has wasted it. So the check is planned first, from its
arguments alone (no GPU, no data needed: ``bench gpu --plan --device cuda`` works anywhere), and
refused when the plan is not worth running.

Each step's budget follows from its work and the rates below (stated, conservative: about half
of what the targets ask of an H100/H200), times a safety factor, plus a process start-up: the
step is killed when it runs past its budget, so a budget is also a timeout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from asc_dist.errors import ConfigError


@dataclass(frozen=True)
class Rates:
    """What a machine is expected to do per second (budget = work / rate x SAFETY + start-up)."""

    startup_s: float  # a fresh python: torch import, CUDA/DALI initialisation
    cores: int  # CPU cores assumed for synthesis and packing
    synth_clips_per_core_s: float  # distinct clips rendered (the bank)
    pack_clips_per_core_s: float  # decode + resample + encode + write
    train_clips_s: dict[int, float]  # the model's training step, by per-GPU batch
    stream_clips_s: dict[str, float]  # a streaming backend's decode + log-mel, per backend
    cache_clips_s: dict[str, float]  # building the feature cache, per backend
    gpu_test_s: float  # one gpu-marked test, fixtures included
    eval_clips_s: float  # evaluate / predict at float32
    report_s: float  # a run's end: report, plots, checkpoint


# An H100/H200 node with 16 cores: ResNet-50 bf16 at half the targets (8,000 / 5,000 clips/s);
# one core decodes ~700-1400 10-s WAVs/s.
GPU = Rates(startup_s=15.0, cores=16, synth_clips_per_core_s=4.0, pack_clips_per_core_s=40.0,
            train_clips_s={64: 2500.0, 256: 4000.0}, stream_clips_s={"dali": 4000.0, "torch": 1500.0},
            cache_clips_s={"dali": 3000.0, "torch": 1000.0}, gpu_test_s=10.0, eval_clips_s=1000.0,
            report_s=5.0)
# --quick --device cpu: 1-s 16 kHz clips, the small DCASE 2018 CNN in the trainer (ResNet-18 in
# the plain loop) on 2 cores (the CI machine, which may be busy: the start-up allows for a
# trainer process inside the step's own, both importing torch).
CPU_QUICK = Rates(startup_s=20.0, cores=2, synth_clips_per_core_s=40.0, pack_clips_per_core_s=200.0,
                  train_clips_s={4: 15.0}, stream_clips_s={"dali": 100.0, "torch": 60.0},
                  cache_clips_s={"dali": 150.0, "torch": 100.0}, gpu_test_s=2.0,
                  eval_clips_s=40.0, report_s=3.0)
# --device cpu at full size: ResNet-50 on 10-s clips at a few clips/s (a plan to be refused).
CPU = Rates(startup_s=8.0, cores=2, synth_clips_per_core_s=1.0, pack_clips_per_core_s=20.0,
            train_clips_s={64: 5.0, 256: 5.0}, stream_clips_s={"dali": 40.0, "torch": 20.0},
            cache_clips_s={"dali": 40.0, "torch": 20.0}, gpu_test_s=2.0, eval_clips_s=20.0,
            report_s=3.0)
SAFETY = 1.5


@dataclass(frozen=True)
class Limits:
    """What makes a plan worth running (full size) or a plumbing check (quick)."""

    min_timed_steps: int
    min_trainer_steps_per_epoch: int
    min_streamed_steps_per_epoch: int


FULL_LIMITS = Limits(min_timed_steps=20, min_trainer_steps_per_epoch=3, min_streamed_steps_per_epoch=10)
QUICK_LIMITS = Limits(min_timed_steps=2, min_trainer_steps_per_epoch=1, min_streamed_steps_per_epoch=2)


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


@dataclass
class Step:
    name: str
    budget_s: float
    does: str
    variants: list[Variant] = field(default_factory=list)
    compares_devices: bool = False  # nothing to run on a CPU-only check


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
    steps: list[Step] = field(default_factory=list)
    budget_limit_s: float = 420.0

    @property
    def budget_s(self) -> float:
        return round(sum(s.budget_s for s in self.steps), 1)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def to_json(self) -> dict:
        return {
            "device": self.device, "quick": self.quick, "clips_per_class": self.clips_per_class,
            "train_clips": self.train_clips, "test_clips": self.test_clips,
            "clip_seconds": self.clip_seconds, "batches": list(self.batches),
            "backends": list(self.backends),
            "steps": [{"name": s.name, "budget_s": s.budget_s, "does": s.does} for s in self.steps],
            "throughput": [{**asdict(v), "step": s.name} for s in self.steps for v in s.variants],
            "budget_s": self.budget_s, "budget_limit_s": self.budget_limit_s,
        }


def step_name(v: Variant) -> str:
    if v.kind != "trainer":
        return f"loops-b{v.batch}"
    return f"trainer-{v.backend}-{'cached' if v.cache == 'device' else 'streamed'}-b{v.batch}"


def _budget(rates: Rates, seconds_of_work: float) -> float:
    return round(rates.startup_s + SAFETY * seconds_of_work, 1)


def variants(quick: bool, batches: tuple[int, ...], train_clips: int,
             backends: tuple[str, ...]) -> list[Variant]:
    """The throughput rows, per batch: the model alone and a plain loop (one step, one process),
    then the trainer cached (the features resident: which backend built them does not matter
    once they are, so the first backend only) and streamed with each backend at the first batch,
    with the first backend at the others (what the lease affords)."""
    warmup, timed = (2, 3) if quick else (10, 30)
    arch = "resnet18" if quick else "resnet50"
    out = []
    for i, batch in enumerate(batches):
        out.append(Variant("model only (resident batch)", batch, "model", warmup_steps=warmup,
                           timed_steps=timed))
        out.append(Variant(f"plain PyTorch loop ({arch})", batch, "plain", warmup_steps=warmup,
                           timed_steps=timed))
        pairs = [(backends[0], "device")] + [(b, "none") for b in (backends if i == 0 else backends[:1])]
        for backend, cache in pairs:
            mode = "cached" if cache == "device" else "streamed"
            out.append(Variant(f"trainer {backend}, {mode}", batch, "trainer", backend, cache,
                               train_clips, train_clips // batch, warmup, timed))
    return out


def make_plan(*, device: str, quick: bool, clips_per_class: int | None = None,
              budget: float = 420.0, backends: tuple[str, ...] = ("dali", "torch"),
              gpu_tests: int = 8, with_tests: bool = True) -> Plan:
    """The whole check for these arguments; :func:`validate` says whether it is worth running."""
    from asc_dist.synth import split_sizes

    rates = CPU_QUICK if quick else CPU if device == "cpu" else GPU
    batches = (4,) if quick else (64, 256)
    clip_seconds = 1.0 if quick else 10.0
    if clips_per_class is None:  # enough for the streamed minimum at the largest batch
        limits = QUICK_LIMITS if quick else FULL_LIMITS
        need = limits.min_streamed_steps_per_epoch * max(batches)
        clips_per_class = next(c for c in range(2, 100_000) if split_sizes(c)[0] >= need)
    train, test = split_sizes(clips_per_class)
    total = train + test
    bank = min(clips_per_class, 8)
    resume_steps = 8 if quick else 30
    plan = Plan(device, quick, clips_per_class, train, test, clip_seconds, batches, backends, bank,
                resume_steps, budget_limit_s=budget)
    if with_tests:
        plan.steps.append(Step("gpu-tests", _budget(rates, gpu_tests * rates.gpu_test_s),
                               f"the {gpu_tests} gpu-marked tests (pytest -m gpu)"))
    plan.steps.append(Step(
        "data", _budget(rates, 10 * bank / (rates.synth_clips_per_core_s * rates.cores)
                        + total / (rates.pack_clips_per_core_s * rates.cores)),
        f"{total} synthetic {clip_seconds:g}-s clips ({train} train, {test} test) assembled from "
        f"{10 * bank} rendered ones, packed"))
    plan.steps.append(Step("parity", _budget(rates, 2 * test / min(rates.stream_clips_s.values())),
                           "DALI and torch log-mel on the device vs the CPU"))
    b0 = batches[0]
    plan.steps.append(Step(
        "stop-resume", round(2 * _budget(rates, resume_steps * b0 / rates.train_clips_s[b0]
                                         + train / min(rates.cache_clips_s.values())
                                         + test / rates.eval_clips_s) + rates.report_s, 1),
        f"bf16 training at batch {b0}, SIGTERM at step {resume_steps // 3}, resumed to "
        f"{resume_steps}"))
    plan.steps.append(Step("inference", _budget(rates, 4 * test / rates.eval_clips_s),
                           "evaluate and predict on the device vs the CPU (float32)",
                           compares_devices=True))
    for v in variants(quick, batches, train, backends):
        steps = v.warmup_steps + v.timed_steps
        work = steps * v.batch / rates.train_clips_s[v.batch]
        if v.kind == "trainer":
            if v.cache == "device":
                work += (train + test) / rates.cache_clips_s[v.backend]
            else:
                work = max(work, steps * v.batch / rates.stream_clips_s[v.backend])
                work += test / rates.stream_clips_s[v.backend]  # the final evaluation
            work += rates.report_s
        name = step_name(v)
        if plan.steps[-1].name == name:  # the plain loop joins the model alone in one process
            plan.steps[-1].variants.append(v)
            plan.steps[-1].budget_s = round(plan.steps[-1].budget_s + SAFETY * work, 1)
            plan.steps[-1].does += f"; {v.variant}"
        else:
            plan.steps.append(Step(name, _budget(rates, work), v.variant, [v]))
    return plan


def validate(plan: Plan) -> None:
    """Refuse a plan not worth a GPU lease, naming the variant or the budget at fault."""
    validate_variants(plan)
    validate_budget(plan)


def validate_variants(plan: Plan) -> None:
    """The worst variant first: one that cannot run at all before one that runs too short."""
    limits = QUICK_LIMITS if plan.quick else FULL_LIMITS
    faults = []  # (how far below the need, message)
    for s, v in ((s, v) for s in plan.steps for v in s.variants):
        if v.timed_steps < limits.min_timed_steps:
            faults.append((v.timed_steps / limits.min_timed_steps,
                           f"{s.name} ({v.variant}, batch {v.batch}): {v.timed_steps} timed steps, "
                           f"need >= {limits.min_timed_steps}"))
        if v.kind != "trainer":
            continue
        need = (limits.min_streamed_steps_per_epoch if v.cache == "none"
                else limits.min_trainer_steps_per_epoch)
        if v.steps_per_epoch < need:
            faults.append((v.steps_per_epoch / need,
                           f"{s.name} ({v.variant}, batch {v.batch}): {v.train_clips} train clips "
                           f"give {v.steps_per_epoch} steps per epoch, need >= {need}: raise "
                           f"--clips-per-class (now {plan.clips_per_class})"))
    if faults:
        faults.sort(key=lambda f: f[0])
        more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
        raise ConfigError(faults[0][1] + more)


def validate_budget(plan: Plan) -> None:
    if plan.budget_s > plan.budget_limit_s:
        worst = sorted(plan.steps, key=lambda s: -s.budget_s)[:3]
        raise ConfigError(
            f"the check's steps add up to {plan.budget_s:.0f} s, over --budget "
            f"{plan.budget_limit_s:.0f} s (largest: "
            + ", ".join(f"{s.name} {s.budget_s:.0f} s" for s in worst)
            + "): split it with --only/--skip, or raise --budget")


def select(plan: Plan, only: list[str] | None, skip: list[str] | None) -> Plan:
    """The plan restricted to ``--only`` / without ``--skip`` (step names, or prefixes ending in
    '-' or '*', e.g. ``trainer-*``); an unknown name is refused listing the known ones."""
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
    plan.steps = [s for s in plan.steps if s.name in keep]
    if not plan.steps:
        raise ConfigError(f"--only/--skip leave no step to run; steps: {', '.join(names)}")
    return plan


def describe(plan: Plan) -> str:
    lines = [f"GPU check plan ({plan.device}{', quick' if plan.quick else ''}): "
             f"{plan.clips_per_class} clips per class = {plan.train_clips} train + "
             f"{plan.test_clips} test clips of {plan.clip_seconds:g} s",
             "", "| step | budget s | what |", "|---|---:|---|"]
    def detail(s: Step) -> str:
        v = s.variants[-1] if s.variants else None
        if v is None:
            return ""
        per_epoch = f"; {v.steps_per_epoch} steps/epoch" if v.steps_per_epoch else ""
        return f"; batch {v.batch}{per_epoch}; {v.timed_steps} timed steps"

    lines += [f"| {s.name} | {s.budget_s:.0f} | {s.does}{detail(s)} |" for s in plan.steps]
    lines += ["", f"total budget {plan.budget_s:.0f} s (limit {plan.budget_limit_s:.0f} s)"]
    return "\n".join(lines)

