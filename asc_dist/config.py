"""Typed configuration: a dataclass schema merged with YAML files and ``key=value`` overrides.

The dataclasses below are the one source of defaults (the paper's recipe): choices are
``Literal`` fields (omegaconf refuses others, naming the key) and bounds sit next to their field.
``conf/config.yaml`` states the same values with comments for people to read
(``python -m asc_dist.config --defaults`` prints them; a test fails when the file is stale); it
is never merged into a run. Factories take the typed config and never fall back to defaults of
their own. Model names live in asc_dist.models' registry (checked by :func:`asc_dist.models.
check_model` before any process group starts), so this module imports no torch.

Load order: the schema, extra YAML files in the order given, then omegaconf dotlist overrides.
Unknown keys, wrong types and impossible values fail here, before any process group or data work
starts, with a message naming the key.

YAML paths are read relative to the caller's directory; a shipped config (``conf/...``) is also
found inside an installed package (a wheel carries ``conf/`` as ``asc_dist/conf``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asc_dist.cli import command
from asc_dist.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The shipped ``conf/``: inside the package when installed as a wheel, else the checkout's."""
    for d in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (d / "config.yaml").is_file():
            return d
    raise ConfigError(f"the shipped configs (conf/config.yaml) are missing next to {_PACKAGE}: "
                      f"reinstall asc-dist")


def resolve_yaml(path: str | Path) -> Path:
    """``path`` from the caller's directory; else a shipped config (``conf/experiment/x.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("conf",) else p.parts
    shipped = conf_dir().joinpath(*parts) if parts and not p.is_absolute() else None
    if shipped is not None and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {path} (looked in {Path.cwd()}"
                      + (f" and {conf_dir()}" if shipped is not None else "") + ")")


def positive(default: Any) -> Any:
    """A field whose value must be > 0 (checked by :func:`validate`, which names the key)."""
    return field(default=default, metadata={"bound": "> 0"})


def non_negative(default: Any) -> Any:
    return field(default=default, metadata={"bound": ">= 0"})


@dataclass
class FeaturesConfig:
    """Log-mel front end (Ye et al.: 48 kHz, Hann 2048, hop 1500, 64 mels 50 Hz-24 kHz, log)."""

    sample_rate: int = positive(48000)
    n_fft: int = positive(2048)
    win_length: int = positive(2048)
    hop_length: int = positive(1500)
    n_mels: int = positive(64)
    f_min: float = 50.0
    f_max: float = 24000.0
    # Every clip is padded/cropped to this length before the STFT, so a short file cannot
    # change a batch's shape.
    clip_seconds: float = positive(10.0)
    # Centred STFT gives 321 frames for 10 s; the paper's 320 is a crop of the last frame.
    frames: int = positive(320)
    # Mel filterbank: slaney (librosa's default, the 2018 recipe) or htk scale, or kaldi
    # (torchaudio.compliance.kaldi.get_mel_banks, triangles in the mel domain, a zero weight on
    # the Nyquist bin: PaSST's front end); slaney (area) normalisation of each filter or none
    # (torchaudio's default, the DCASE 2024 baseline; kaldi needs none).
    mel_scale: Literal["slaney", "htk", "kaldi"] = "slaney"
    mel_norm: Literal["slaney", "none"] = "slaney"
    # db: 10*log10(max(power, 10**(floor_db/10))); ln: ln(power + log_eps) (the DCASE 2024
    # baseline's log).
    log: Literal["db", "ln"] = "db"
    floor_db: float = -100.0
    log_eps: float = positive(1e-5)
    # Pre-emphasis y[n] = x[n+1] - c * x[n] before the STFT (PaSST's conv1d with kernel [-c, 1],
    # c = 0.97): the clip gets one sample shorter (1 s at 32 kHz: 31,999 samples, 100 frames at
    # hop 320). 0 = off.
    preemphasis: float = non_negative(0.0)
    # Hann window: periodic (torch's default, the 2018 and DCASE 2024 recipes) or symmetric
    # (PaSST's torch.hann_window(periodic=False)).
    window: Literal["periodic", "symmetric"] = "periodic"
    # A fixed affine map after the log: (log + log_offset) / log_divisor (PaSST: 4.5 and 5).
    log_offset: float = 0.0
    log_divisor: float = positive(1.0)


@dataclass
class DataConfig:
    # Root holding <split>/manifest.json, <split>/*.tar, <split>/*.idx (written by asc_dist.pack).
    shards: str = "shards/tut2018"
    train_split: str = "train"
    # null: no test split, so training evaluates nothing (the paper's protocol: train on every
    # development clip, score the checkpoint elsewhere; conf/experiment/paper_protocol.yaml)
    test_split: str | None = "test"
    backend: Literal["dali", "torch", "auto"] = "auto"  # auto: dali when installed
    # DALI threads / DataLoader workers per rank; 0 = this process's CPUs / ranks on the node
    num_threads: int = non_negative(0)
    shuffle_buffer: int = positive(256)  # streaming training: samples mixed within a rank's share
    prefetch: int = positive(2)  # batches prepared ahead
    # device: compute each clip's features once and keep the split on the training device (host
    # memory on CPU); auto: the same when the split fits in cache_max_gb, else stream; none: stream;
    # waveform: keep the training clips' waveforms on the device and run the front end per batch
    # there (what augment.dir, augment.mel_band and the roll by samples need; refused with the
    # numbers when it does not fit the device's free memory; evaluation as auto)
    cache: Literal["device", "auto", "none", "waveform"] = "auto"
    cache_max_gb: float = positive(4.0)
    # Per-mel-bin standardisation from the training split only; stats file lives beside the shards.
    standardize: bool = True
    # Check every tar member a reader reads against its digest in samples.jsonl (asc_dist.digest)
    # before it reaches a batch; false only to measure the check's cost (docs/data.md).
    verify: bool = True
    # Train on the clips of these recording devices only (samples.jsonl's `device`, e.g. [a] or
    # [s1, s2]); empty = every clip. Filters the training split alone: evaluation scores the whole
    # test split. Epochs, steps per epoch and the schedule count the selected clips.
    devices: list[str] = field(default_factory=list)


@dataclass
class PasstConfig:
    """PaSST (``model.name=passt``): hear21passt's ViT on 16x16 patches at stride 10."""

    # The architecture (hear21passt's name); the AudioSet weights are this one's.
    arch: Literal["passt_s_swa_p16_128_ap476", "passt_s_kd_p16_128_ap486",
                  "passt_l_kd_p16_128_ap47"] = "passt_s_swa_p16_128_ap476"
    # Structured patchout in training: patch columns (time) / rows (frequency) dropped per batch.
    s_patchout_t: int = non_negative(0)
    s_patchout_f: int = non_negative(0)
    # The input the positional embeddings are sized for: mel bins (= features.n_mels) and
    # frames (998 with the AudioSet weights: 99 time columns, sliced for shorter inputs).
    input_fdim: int = positive(128)
    input_tdim: int = positive(998)
    # null: the arch's (768, 12 or 7, 12); smaller for experiments and tests (random init only).
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None


@dataclass
class ModelConfig:
    # A name asc_dist.models' registry knows (checked before any process group starts; the
    # registry imports torchvision/timm, which this module stays free of).
    name: str = "resnet50"
    # imagenet | passt-audioset | none | /path/to/state_dict.pt
    pretrained: str = "imagenet"
    # sum: 1-channel conv1 = sum of RGB filters | repeat: input x3
    input_adapt: Literal["sum", "repeat"] = "sum"
    resize: list[int] | None = None  # [H, W] to interpolate the log-mel to, or null
    channels_last: bool = True  # used on CUDA only
    compile: bool = False  # torch.compile the model (after the DDP wrap)
    # reduce-overhead: CUDA-graph capture of forward and backward, for small per-GPU batches
    # where launching kernels costs more than running them; off by default until measured
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    passt: PasstConfig = field(default_factory=PasstConfig)


@dataclass
class LossConfig:
    name: Literal["focal", "ce"] = "focal"
    gamma: float = non_negative(2.0)
    alpha: Any = 1.0  # scalar, or one weight per class


@dataclass
class MixupConfig:
    enabled: bool = True
    alpha: float = 0.3
    per_sample: bool = False


@dataclass
class MixStyleConfig:
    """Frequency-MixStyle (Schmid et al. 2022): mix per-frequency-bin statistics across a batch."""

    p: float = 0.0  # probability that a batch is mixed; 0 = off
    alpha: float = positive(0.3)  # Beta(alpha, alpha) mixing weight per instance
    eps: float = positive(1e-6)


@dataclass
class MaskConfig:
    """SpecAugment-style masks, one band per count per clip (torchaudio's iid_masks): width
    uniform in [0, width) bins or frames."""

    count: int = non_negative(0)  # 0 = off
    width: int = non_negative(0)


@dataclass
class DirConfig:
    """Device impulse responses (CP-JKU's DIR): training clips convolved with a random one,
    on the waveform (data.cache=waveform), with no level change."""

    path: str | None = None  # a folder of impulse responses (.wav, any rate; e.g. MicIRP's)
    p: float = 0.0  # probability per clip; 0 = off
    devices: list[str] = field(default_factory=list)  # only clips of these devices; empty = all


@dataclass
class MelBandConfig:
    """PaSST's random mel band in training (data.cache=waveform, features.mel_scale=kaldi): per
    batch f_min + randint(fmin_range) and f_max + fmax_range // 2 - randint(fmax_range) Hz
    (AugmentMelSTFT's fmin_aug_range / fmax_aug_range); 0 or 1 = fixed."""

    fmin_range: int = non_negative(0)
    fmax_range: int = non_negative(0)


@dataclass
class AugmentConfig:
    """In-batch augmentations on the training device, seeded per step (resumable).

    Order: [data.cache=waveform: impulse responses -> roll by samples -> front end with a random
    band] -> time roll (by frames, other caches) -> masks -> standardise -> Frequency-MixStyle ->
    mixup -> model.
    """

    mixup: MixupConfig = field(default_factory=MixupConfig)
    mixstyle: MixStyleConfig = field(default_factory=MixStyleConfig)
    freq_mask: MaskConfig = field(default_factory=MaskConfig)
    time_mask: MaskConfig = field(default_factory=MaskConfig)
    # Where the masks act: mel_power (before the log, as the DCASE 2024 baseline: a masked bin
    # reads as log of zero), log_mel (0 on the log-mel, before the affine map and
    # standardisation: PaSST's masks, reading (0 + 4.5) / 5) or input (0 on the network's input).
    mask_at: Literal["mel_power", "log_mel", "input"] = "mel_power"
    # Roll each clip along time by a uniform integer shift in [-s, s] seconds: in samples of the
    # waveform under data.cache=waveform, in whole frames of the log-mel otherwise; 0 = off.
    roll_seconds: float = non_negative(0.0)
    dir: DirConfig = field(default_factory=DirConfig)
    mel_band: MelBandConfig = field(default_factory=MelBandConfig)


@dataclass
class DistillConfig:
    """Knowledge distillation from an ensemble of teachers (asc_dist.distill).

    loss = (1 - weight) * task loss + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)).
    CPJKU's kd_lambda weights the label loss instead: their 0.02 is weight=0.98 here, with
    class_reduction=mean (their KLDivLoss(reduction="none").mean() averages over the classes too).
    """

    teachers: list[str] = field(default_factory=list)  # teacher checkpoints (.pt or run dirs)
    weight: float = non_negative(0.0)
    temperature: float = positive(2.0)
    # The KL over classes: sum (the divergence itself) or mean (CPJKU's: 1/num_classes of it)
    class_reduction: Literal["sum", "mean"] = "sum"
    # The ensemble's logits for the training split; null = beside the split (in the run dir when
    # the split's storage is read-only), keyed by the teachers and the split, built by all ranks
    # when missing (python -m asc_dist.distill logits).
    logits: str | None = None


@dataclass
class ComplexityConfig:
    # dcase2024: warn when the model exceeds DCASE 2024 task 1's limits (128,000 B of parameters
    # at `precision`, 30 M MACs per second of audio: a 1-s clip); dcase2025: the same limits, for
    # each device-specific model of a set separately
    limits: Literal["none", "dcase2024", "dcase2025"] = "none"
    precision: Literal["fp32", "fp16", "int8"] = "fp16"


@dataclass
class EpochRampConfig:
    """optim.schedule=exp_warmup_linear_down (CP-JKU's helpers/lr_schedule.py), in epochs of the
    training split: exp(-5 (1 - e/warmup)^2) for e < warmup (e clipped to >= 0.5), 1 until
    rampdown_start, then linearly down to last_value over rampdown epochs, then last_value."""

    warmup: int = non_negative(3)
    rampdown_start: int = non_negative(3)
    rampdown: int = positive(10)
    last_value: float = non_negative(0.01)


@dataclass
class OptimConfig:
    name: Literal["adabound", "adam", "adamw", "sgd"] = "adabound"
    lr: float = positive(1e-3)
    final_lr: float = positive(0.1)
    gamma: float = positive(1e-3)  # AdaBound's bound convergence speed
    weight_decay: float = non_negative(0.0)
    momentum: float = 0.9  # sgd only
    # step: lr x decay_factor every decay_every iterations (the paper); cosine: half a cosine to 0
    # at train.max_iters (transformers' get_cosine_schedule_with_warmup, the DCASE 2024 baseline);
    # exp_warmup_linear_down: CP-JKU's per-epoch schedule (optim.ramp), held for each epoch
    schedule: Literal["step", "cosine", "exp_warmup_linear_down"] = "step"
    decay_every: int = positive(200)
    decay_factor: float = positive(0.9)
    warmup_iters: int = non_negative(0)  # linear warm-up
    ramp: EpochRampConfig = field(default_factory=EpochRampConfig)


@dataclass
class TrainConfig:
    max_iters: int = positive(5000)
    # > 0: train this many epochs of the training split instead (max_iters = epochs x steps per
    # epoch, fixed at start-up from the split's size, the world size and global_batch)
    epochs: int = non_negative(0)
    global_batch: int = positive(64)
    eval_every: int = positive(500)
    ckpt_every: int = positive(500)
    keep_last: int = positive(3)
    log_every: int = positive(20)
    seed: int = 0
    # auto: bf16 on CUDA, fp32 on CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    grad_clip: float = non_negative(0.0)  # max grad norm; 0 disables
    sync_bn: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: all-reduce gradients in bf16 (slow interconnects)
    grad_compress: Literal["none", "bf16"] = "none"
    # false: keep an epoch's final partial batch (steps per epoch = ceil(N / global_batch), as a
    # DataLoader with drop_last=False); its clips are split over the ranks as evenly as possible and
    # each rank's loss weighted so the gradient is the mean over the clips in it. Not with DALI
    # streaming (the feature or waveform cache, or the torch backend).
    drop_last: bool = True
    # A trained checkpoint (file or run dir) to start from: the whole model, head included, loaded
    # strictly; its front end, classes and architecture must be this run's (restore.FROZEN_KEYS),
    # and its feature statistics are used. Ignored when the run resumes from its own checkpoint.
    init_from: str | None = None
    # The periodic and final evaluation: auto = as train.precision; fp32; fp16 = model and inputs
    # cast to float16 (model.half(), the DCASE 2024/2025 baselines' test)
    eval_precision: Literal["auto", "fp32", "fp16"] = "auto"
    # Recompute each block's activations in the backward pass instead of keeping them: less
    # memory for ~30 % more compute (passt and timm models)
    grad_checkpointing: bool = False


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "asc-dist"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    # W&B's grouping for sweeps: runs of one group (a Table I row's seeds, a distillation
    # experiment) are drawn together; job_type says the run's part (row, teacher, student)
    group: str | None = None
    job_type: str | None = None
    log_images: int = non_negative(4)
    # seconds; an unreachable server then means "W&B off", not a hang
    init_timeout: float = non_negative(30.0)


@dataclass
class Config:
    name: str = "paper"
    run_dir: str = "runs/${name}"
    resume: str = "auto"  # auto | never | /path/to/checkpoint.pt
    num_classes: int = positive(10)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    complexity: ComplexityConfig = field(default_factory=ComplexityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _check_bounds(schema: type, cfg: Any, prefix: str = "") -> None:
    """The bounds stated next to the fields (:func:`positive`, :func:`non_negative`)."""
    types = get_type_hints(schema)
    for f in fields(schema):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        bound = f.metadata.get("bound")
        if is_dataclass(types[f.name]):
            _check_bounds(types[f.name], value, f"{key}.")
        elif (bound == "> 0" and not value > 0) or (bound == ">= 0" and not value >= 0):
            raise ConfigError(f"{key}={value!r}: must be {bound}")


def validate(cfg: DictConfig | Config, world_size: int | None = None) -> None:
    """Check values the type system cannot; raise ConfigError naming the key."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    _check_bounds(Config, cfg)
    f = cfg.features
    if f.win_length > f.n_fft:
        raise ConfigError(f"features.win_length={f.win_length} is larger than features.n_fft={f.n_fft}")
    if f.hop_length > f.win_length:
        raise ConfigError(
            f"features.hop_length={f.hop_length} is larger than features.win_length={f.win_length}"
        )
    if not 0 <= f.f_min < f.f_max:
        raise ConfigError(f"features.f_min={f.f_min} must be >= 0 and below features.f_max={f.f_max}")
    if f.f_max > f.sample_rate / 2:
        raise ConfigError(
            f"features.f_max={f.f_max} is above Nyquist ({f.sample_rate / 2} Hz for "
            f"features.sample_rate={f.sample_rate})"
        )
    if f.mel_scale == "kaldi" and f.mel_norm != "none":
        raise ConfigError("features.mel_scale=kaldi builds Kaldi's unnormalised triangles: set "
                          "features.mel_norm=none")
    samples = round(f.clip_seconds * f.sample_rate) - (1 if f.preemphasis > 0 else 0)
    max_frames = samples // f.hop_length + 1
    if f.frames > max_frames:
        raise ConfigError(
            f"features.frames={f.frames}: a {f.clip_seconds} s clip at hop {f.hop_length} "
            f"gives only {max_frames} frames"
        )
    if cfg.train.global_batch % world_size:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by the world size "
            f"{world_size}"
        )
    mixup = cfg.augment.mixup
    if mixup.enabled and not mixup.alpha > 0:
        raise ConfigError(f"augment.mixup.alpha={mixup.alpha}: must be > 0 when augment.mixup.enabled")
    if not 0 <= cfg.augment.mixstyle.p <= 1:
        raise ConfigError(f"augment.mixstyle.p={cfg.augment.mixstyle.p}: must be in [0, 1]")
    for axis, size in (("freq_mask", f.n_mels), ("time_mask", f.frames)):
        m = getattr(cfg.augment, axis)
        if m.count > 0 and not 0 < m.width <= size:
            raise ConfigError(f"augment.{axis}.width={m.width}: must be in [1, {size}] when "
                              f"augment.{axis}.count={m.count}")
    _check_waveform(cfg)
    d = cfg.distill
    if not d.weight <= 1:
        raise ConfigError(f"distill.weight={d.weight}: must be in [0, 1]")
    if d.weight > 0 and not d.teachers and d.logits is None:
        raise ConfigError(f"distill.weight={d.weight} needs teachers: set distill.teachers="
                          f"[ckpt, ...] (or distill.logits=FILE)")
    alpha = cfg.loss.alpha
    if isinstance(alpha, (list, ListConfig)):
        if len(alpha) != cfg.num_classes:
            raise ConfigError(
                f"loss.alpha has {len(alpha)} entries but num_classes={cfg.num_classes}"
            )
        values = list(alpha)
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        values = [alpha]
    else:
        raise ConfigError(f"loss.alpha={alpha!r}: must be a number or a list of numbers")
    if any(not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ConfigError(f"loss.alpha={list(values)!r}: weights must be numbers >= 0")
    if cfg.model.resize is not None and (
        len(cfg.model.resize) != 2 or min(cfg.model.resize) <= 0
    ):
        raise ConfigError(f"model.resize={list(cfg.model.resize)}: must be [height, width] > 0")
    if cfg.model.name == "passt":
        _check_passt(cfg)


def _check_waveform(cfg: Any) -> None:
    """What acts on the waveform needs the waveform cache; its settings must be possible."""
    a, f = cfg.augment, cfg.features
    wave_only = []
    if a.dir.p > 0:
        wave_only.append(f"augment.dir.p={a.dir.p}")
    if a.mel_band.fmin_range > 1 or a.mel_band.fmax_range > 1:
        wave_only.append(f"augment.mel_band ({a.mel_band.fmin_range}, {a.mel_band.fmax_range})")
    if wave_only and cfg.data.cache != "waveform":
        act, need = ("act", "they need") if len(wave_only) > 1 else ("acts", "it needs")
        raise ConfigError(f"{' and '.join(wave_only)} {act} on the waveform, before the front "
                          f"end: {need} data.cache=waveform (data.cache={cfg.data.cache} feeds "
                          f"log-mels)")
    if not 0 <= a.dir.p <= 1:
        raise ConfigError(f"augment.dir.p={a.dir.p}: must be in [0, 1]")
    if a.dir.p > 0 and not a.dir.path:
        raise ConfigError(f"augment.dir.p={a.dir.p} needs augment.dir.path (a folder of impulse "
                          f"responses)")
    band = a.mel_band
    if band.fmin_range > 1 or band.fmax_range > 1:
        if f.mel_scale != "kaldi":
            raise ConfigError(f"augment.mel_band: a random band needs features.mel_scale=kaldi "
                              f"(PaSST's banks; this run has {f.mel_scale})")
        top = f.f_max + max(band.fmax_range, 1) // 2
        if top > f.sample_rate / 2:
            raise ConfigError(f"augment.mel_band.fmax_range={band.fmax_range}: f_max reaches {top} "
                              f"Hz, above Nyquist ({f.sample_rate / 2} Hz)")
        if f.f_min + max(band.fmin_range, 1) - 1 >= top - max(band.fmax_range, 1) + 1:
            raise ConfigError(f"augment.mel_band: f_min up to "
                              f"{f.f_min + max(band.fmin_range, 1) - 1} Hz meets f_max down to "
                              f"{top - max(band.fmax_range, 1) + 1} Hz")


def _check_passt(cfg: Any) -> None:
    """PaSST's positional embeddings are sized for its input: the mel bins must be input_fdim."""
    p = cfg.model.passt
    height = cfg.model.resize[0] if cfg.model.resize is not None else cfg.features.n_mels
    where = "model.resize[0]" if cfg.model.resize is not None else "features.n_mels"
    if height != p.input_fdim:
        raise ConfigError(f"model.passt.input_fdim={p.input_fdim} but {where}={height}: PaSST's "
                          f"frequency embedding is sized for input_fdim mel bins (128 for the "
                          f"AudioSet weights)")
    for key in ("embed_dim", "depth", "num_heads"):
        value = getattr(p, key)
        if value is not None and not value > 0:
            raise ConfigError(f"model.passt.{key}={value}: must be > 0 (or null: the arch's)")
    # Every arch has 16x16 patches at stride 10: the patch grid of the input
    width = cfg.model.resize[1] if cfg.model.resize is not None else cfg.features.frames
    grid = {"t": min((width - 16) // 10 + 1, p.input_tdim // 10), "f": p.input_fdim // 10}
    for axis, what in (("t", "time columns"), ("f", "frequency rows")):
        if getattr(p, f"s_patchout_{axis}") >= max(grid[axis], 1):
            raise ConfigError(f"model.passt.s_patchout_{axis}={getattr(p, f's_patchout_{axis}')}: "
                              f"the input has only {grid[axis]} patch {what}")


# Keys that moved, old -> new: a YAML or override using the old one is refused naming the new
# one; a saved config (a checkpoint's, read by from_dict) is carried over.
MOVED = {"mixup": "augment.mixup"}


def _moved(d: Any, source: str) -> None:
    if isinstance(d, (dict, DictConfig)):
        for old, new in MOVED.items():
            if old in d:
                keys = [f"{old}.{k}" for k in d[old]] if isinstance(d[old], (dict, DictConfig)) else []
                keys = keys or [old]
                raise ConfigError(f"{source}: {keys[0]} is now {new}{keys[0][len(old):]} "
                                  f"(the in-batch augmentations live under augment.)")


def carry_over(d: dict) -> dict:
    d = dict(d)
    for old, new in MOVED.items():
        if old in d:
            parent, leaf = new.split(".")
            d[parent] = {**d.get(parent, {}), leaf: d.pop(old)}
    return d


def merge_config(base: DictConfig, other: Any, source: str) -> DictConfig:
    """``other`` over ``base``; a moved or unknown key fails naming ``source`` and the key."""
    _moved(other, source)
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{source}: bad config key '{key}': {reason}") from None


def defaults() -> DictConfig:
    """The schema's defaults, unresolved (``run_dir: runs/${name}``)."""
    return OmegaConf.structured(Config)


def load(args: list[str] | tuple[str, ...] = (), *, world_size: int | None = None,
         base: DictConfig | None = None) -> DictConfig:
    """Build the run config from ``args``: YAML paths first, then ``key=value`` overrides, over
    the schema's defaults (or over ``base``, e.g. a trained run's saved config)."""
    cfg = defaults() if base is None else OmegaConf.merge(defaults(), base)
    OmegaConf.set_readonly(cfg, False)
    yamls = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    for path in [resolve_yaml(y) for y in yamls]:
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # noqa: BLE001 - yaml errors carry line numbers; keep them
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        cfg = merge_config(cfg, loaded, str(path))
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        try:
            cfg = merge_config(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
        except ConfigError as e:
            raise ConfigError(f"{e} (override key '{key}')") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config key '{getattr(e, 'full_key', '?')}': {e}") from None
    validate(cfg, world_size)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(d: dict) -> DictConfig:
    """Rebuild a typed config from a saved dict (e.g. one stored in a checkpoint)."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), carry_over(d))
    OmegaConf.set_readonly(cfg, True)
    return cfg


@command("asc_dist.config")
def main(argv: list[str] | None = None) -> int:
    """``python -m asc_dist.config [yaml ...] [key=value ...]`` prints the resolved config;
    ``--defaults`` prints the schema's defaults (what ``conf/config.yaml`` states)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--defaults"]:
        print(OmegaConf.to_yaml(defaults()), end="")
        return 0
    if any(a.startswith("-") for a in argv):
        raise ConfigError(f"unknown option {next(a for a in argv if a.startswith('-'))!r}; usage: "
                          "python -m asc_dist.config [--defaults | yaml ... key=value ...]")
    print(to_yaml(load(argv)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
