"""In-batch augmentations of log-mel batches ``x [B, 1, F, T]`` on the training device.

What and where (the trainer's order; mixup itself lives in :mod:`asc_dist.mixup`)::

    log-mel x -> before_standardize: time roll, then masks (mask_at = mel_power | log_mel)
              -> standardise
              -> after_standardize:  masks (mask_at = input), then Frequency-MixStyle
              -> mixup -> model

* Time roll: every clip is rolled circularly along time (the last dim, as ``torch.roll``) by its
  own integer shift drawn uniformly in ``[-S, S]``, ``S = round(roll_seconds * sample_rate /
  hop_length)`` frames (:func:`asc_dist.wave_augment.time_roll`). The published recipes roll the
  *waveform*: under ``data.cache=waveform`` the waveform cache does that, by samples, and this
  roll is off; with cached log-mels whole frames are rolled (a shift resolution of one hop).
* Frequency / time masks (SpecAugment; torchaudio's ``FrequencyMasking(width, iid_masks=True)``
  / ``TimeMasking``, i.e. ``torchaudio.functional.mask_along_axis_iid``): per clip (and channel)
  and per mask ``value = rand * width``, ``start = rand * (size - value)``, and the band is
  ``int(start) <= i < int(start) + int(value)`` (torchaudio truncates both ends separately), so
  a band is at most ``width - 1`` bins or frames wide. ``count`` masks per axis, frequency masks
  drawn before time masks, each mask's ``value`` for the whole batch before its ``start``s:
  with ``count = 1`` the result equals torchaudio's under ``torch.manual_seed``. Masked entries
  get the fill value: mask_at = mel_power masks the power before the log, as the DCASE 2024
  baseline masks its mel power before ``ln(x + 1e-5)``, so a masked entry reads as the log of
  zero power in the configured log (``features.floor_db`` for ``log: db``, ``ln(log_eps)`` for
  ``log: ln``); log_mel fills 0 on the log-mel, i.e. its image under the features' affine map
  (``(0 + log_offset) / log_divisor``: PaSST's masks act after the log and before its
  (x + 4.5) / 5, so a masked entry reads 0.9); input fills 0.0. Both fills of mel_power and
  log_mel go through the affine map. ``count = 0`` or ``width = 0`` is off.
* Frequency-MixStyle (Schmid et al., DCASE 2022; CPJKU's ``mixstyle(x, p, alpha, eps)``): with
  probability ``p`` per batch, per instance and frequency bin the mean and (unbiased) variance
  over (channel, time) are taken (detached), ``x`` is normalised with them and re-scaled with
  statistics mixed with a random partner's: ``lam ~ Beta(alpha, alpha)`` per instance,
  ``mu_mix = lam*mu + (1-lam)*mu[perm]``, ``sig_mix`` likewise. ``p = 0`` is off.

Why a generator per step: everything random is drawn from the ``generator`` passed in, which
the trainer seeds per step (from the run seed and the step), never from the global RNG. A
resumed run then redraws exactly the same augmentations for the same steps, and the draws do
not depend on how many other random calls ran before. Numbers are drawn on the generator's
device (CPU or CUDA) and the few of them (B shifts, B x count band ends, B weights and a
permutation) are moved to x's device; the masking and mixing run on x's device, vectorised
over the batch. MixStyle's per-batch coin never goes to the host: the weights and the
permutation are always drawn and the mixed batch is selected with ``torch.where``, so with a
generator on x's device (as the trainer's) a step on a GPU never waits for it (the mixing costs
a few element-wise ops over the batch). A CPU generator with CUDA inputs copies its few draws to
the device each call.

An augmentation that is off draws nothing from the generator and returns ``x`` itself, so a run
with everything off is bit-identical to one without this module. The last draws are kept in
``last_shifts``, ``last_mixed``, ``last_lam``, ``last_perm`` (for tests and logging).
"""

from __future__ import annotations

import torch

from asc_dist.frontend import feature_value, log_zero
from asc_dist.mixup import sample_beta
from asc_dist.wave_augment import gen_device, time_roll

MASK_AT = ("mel_power", "log_mel", "input")


def roll_frames(roll_seconds: float, sample_rate: int, hop_length: int) -> int:
    """The largest roll in frames: ``round(roll_seconds * sample_rate / hop_length)``."""
    return round(float(roll_seconds) * sample_rate / hop_length)


def mask_fill_value(mask_at: str, cfg_features) -> float:
    """The value a masked entry gets: the log of zero power (frontend.log_zero) for mel_power,
    a log-mel of 0 for log_mel (both through the features' affine map), 0.0 for input."""
    if mask_at not in MASK_AT:
        raise ValueError(f"augment.mask_at={mask_at!r}: must be one of {', '.join(MASK_AT)}")
    if mask_at == "mel_power":
        return log_zero(cfg_features)
    return feature_value(cfg_features, 0.0) if mask_at == "log_mel" else 0.0


def draw_bands(lead_shape: torch.Size, size: int, width: int, count: int,
               generator: torch.Generator | None, gen_device: torch.device,
               device: torch.device) -> torch.Tensor | None:
    """Boolean masks ``[*lead_shape, size]`` on ``device``: the union of ``count`` bands per
    entry of ``lead_shape`` drawn as torchaudio's ``mask_along_axis_iid`` (float32 draws:
    ``value = rand * width``, then ``start = rand * (size - value)``; the band is
    ``[int(start), int(start) + int(value))``). None (nothing drawn) when count or width is 0."""
    if count <= 0 or width < 1:
        return None
    pos = torch.arange(size, device=device)
    mask = None
    for _ in range(count):  # a few masks; each is vectorised over the batch
        value = torch.rand(lead_shape, generator=generator, device=gen_device,
                           dtype=torch.float32) * width
        start = torch.rand(lead_shape, generator=generator, device=gen_device,
                           dtype=torch.float32) * (size - value)
        lo = start.long()
        hi = lo + value.long()
        lo, hi = lo.to(device).unsqueeze(-1), hi.to(device).unsqueeze(-1)
        band = (pos >= lo) & (pos < hi)
        mask = band if mask is None else mask | band
    return mask


def mixstyle_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per instance and frequency bin: mean and sqrt(unbiased var + eps) over dims [1, 3],
    detached (``[B, 1, F, 1]``)."""
    mu = x.mean(dim=[1, 3], keepdim=True)
    var = x.var(dim=[1, 3], keepdim=True)
    sig = (var + eps).sqrt()
    return mu.detach(), sig.detach()


def mixstyle_apply(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """Frequency-MixStyle of ``x [B, C, F, T]`` with given weights ``lam [B]`` and ``perm [B]``."""
    mu, sig = mixstyle_stats(x, eps)
    x_normed = (x - mu) / sig
    lam = lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    perm = perm.to(x.device)
    mu_mix = mu * lam + mu[perm] * (1 - lam)
    sig_mix = sig * lam + sig[perm] * (1 - lam)
    return x_normed * sig_mix + mu_mix


class Augment:
    """``before_standardize(x, g)`` and ``after_standardize(x, g)`` on log-mel batches.

    ``enabled`` is False when roll, masks and MixStyle are all off (mixup is handled by
    :class:`asc_dist.mixup.Mixup`); both calls then return ``x`` and draw nothing.
    """

    def __init__(self, cfg_augment, cfg_features, roll_frames_here: bool = True):
        a, f = cfg_augment, cfg_features
        self.mask_at = str(a.mask_at)
        self.fill = mask_fill_value(self.mask_at, f)
        if not a.roll_seconds >= 0:
            raise ValueError(f"augment.roll_seconds={a.roll_seconds}: must be >= 0")
        # roll_frames_here=False: the waveform cache rolls the waveform by samples instead
        self.max_shift = (roll_frames(a.roll_seconds, int(f.sample_rate), int(f.hop_length))
                          if roll_frames_here else 0)
        for name in ("freq_mask", "time_mask"):
            m = getattr(a, name)
            if m.count < 0 or m.width < 0:
                raise ValueError(f"augment.{name}: count={m.count}, width={m.width} must be >= 0")
        self.freq_count, self.freq_width = int(a.freq_mask.count), int(a.freq_mask.width)
        self.time_count, self.time_width = int(a.time_mask.count), int(a.time_mask.width)
        ms = a.mixstyle
        if not 0.0 <= ms.p <= 1.0:
            raise ValueError(f"augment.mixstyle.p={ms.p}: must be in [0, 1]")
        if ms.p > 0 and not (ms.alpha > 0 and ms.eps > 0):
            raise ValueError(f"augment.mixstyle: alpha={ms.alpha} and eps={ms.eps} must be > 0")
        self.mix_p, self.mix_alpha, self.mix_eps = float(ms.p), float(ms.alpha), float(ms.eps)
        self.last_shifts: torch.Tensor | None = None
        self.last_mixed: torch.Tensor | None = None
        self.last_lam: torch.Tensor | None = None
        self.last_perm: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg) -> Augment:
        """From the whole run config (``cfg.augment``, ``cfg.features``; under
        ``data.cache=waveform`` the roll is the waveform cache's, by samples)."""
        return cls(cfg.augment, cfg.features, roll_frames_here=cfg.data.cache != "waveform")

    @property
    def masks_on(self) -> bool:
        return (self.freq_count > 0 and self.freq_width >= 1) or (
            self.time_count > 0 and self.time_width >= 1)

    @property
    def enabled(self) -> bool:
        return self.max_shift > 0 or self.masks_on or self.mix_p > 0

    def __repr__(self) -> str:
        return (f"Augment(roll=±{self.max_shift} frames, freq_mask={self.freq_count}x<"
                f"{self.freq_width}, time_mask={self.time_count}x<{self.time_width}, "
                f"mask_at={self.mask_at} (fill {self.fill:g}), mixstyle p={self.mix_p} "
                f"alpha={self.mix_alpha})")

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"augment needs log-mel batches [B, C, F, T]; got {list(x.shape)}")

    def masks(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Frequency then time masks (per clip and channel), filled with ``self.fill``."""
        if not self.masks_on:
            return x
        gd = gen_device(generator, x)
        lead, (f, t) = x.shape[:-2], x.shape[-2:]
        fm = draw_bands(lead, f, self.freq_width, self.freq_count, generator, gd, x.device)
        tm = draw_bands(lead, t, self.time_width, self.time_count, generator, gd, x.device)
        mask = None
        if fm is not None:
            mask = fm.unsqueeze(-1)  # [B, C, F, 1]
        if tm is not None:
            tm = tm.unsqueeze(-2)  # [B, C, 1, T]
            mask = tm if mask is None else mask | tm
        return x.masked_fill(mask, self.fill)

    def mixstyle(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Frequency-MixStyle with probability p (mixed when a uniform draw is <= p, as CPJKU).
        Branch-free (see the module doc): ``last_mixed`` is a bool tensor on x's device."""
        if self.mix_p <= 0:
            return x
        gd = gen_device(generator, x)
        u = torch.rand((), generator=generator, device=gd)
        b = x.shape[0]
        lam = sample_beta(self.mix_alpha, b, generator, gd)
        perm = torch.randperm(b, generator=generator, device=gd)
        self.last_mixed = (u <= self.mix_p).to(x.device)
        self.last_lam, self.last_perm = lam, perm
        return torch.where(self.last_mixed, mixstyle_apply(x, lam, perm, self.mix_eps), x)

    def before_standardize(self, x: torch.Tensor,
                           generator: torch.Generator | None) -> torch.Tensor:
        """Time roll, then the masks when mask_at is mel_power or log_mel."""
        if self.max_shift <= 0 and not (self.masks_on and self.mask_at != "input"):
            return x
        self._check(x)
        x, self.last_shifts = time_roll(x, self.max_shift, generator)
        if self.mask_at != "input":
            x = self.masks(x, generator)
        return x

    def after_standardize(self, x: torch.Tensor,
                          generator: torch.Generator | None) -> torch.Tensor:
        """The masks when mask_at is input, then Frequency-MixStyle."""
        if self.mix_p <= 0 and not (self.masks_on and self.mask_at == "input"):
            return x
        self._check(x)
        if self.mask_at == "input":
            x = self.masks(x, generator)
        return self.mixstyle(x, generator)
