"""PaSST (Koutini et al., "Efficient Training of Audio Transformers with Patchout"): hear21passt's
ViT on 16x16 patches of a 128-bin log-mel at stride 10, with its own forward.

Built offline from hear21passt's classes (``get_model(arch, pretrained=False, ...)`` for the
arch's own size, its ``PaSST`` class for a smaller ``embed_dim`` / ``depth`` / ``num_heads``),
its weights under ``net.`` in hear21passt's layout. The forward here replaces hear21passt's
(same operations, same order) where that one would cost a GPU run:

* ``head_dist`` is removed: hear21passt's forward never uses it, so it would get no gradient and
  DDP (no find_unused_parameters) would stop; it is not in the optimiser or the state dict
  either. The logits are ``head((cls + dist) / 2)``, as hear21passt's.
* The time positional embedding has ``input_tdim // 10`` columns (99 for the AudioSet weights'
  998 frames); a shorter input takes a slice of it: at a random offset in training (PaSST's and
  CP-JKU's training code), the first columns in evaluation (hear21passt's only behaviour).
* Structured patchout (``s_patchout_t`` time columns, ``s_patchout_f`` frequency rows dropped per
  batch in training) and the offset are drawn on the device from the trainer's per-step
  generator (:func:`asc_dist.models.common.use_generator`): no host synchronisation, and a
  resumed run redraws exactly. hear21passt draws them with ``torch.randperm`` on the host.
* No print()s (hear21passt prints the model and the shapes of its first forward) and no warning
  per batch for inputs shorter than 998 frames.
* ``set_grad_checkpointing``: the blocks recompute their activations in the backward pass.

``model.pretrained=passt-audioset`` (asc_dist.models.hub; ``python -m asc_dist.weights fetch
passt-audioset``) or a path to a state dict in hear21passt's layout (or one of our own PaSST
checkpoints): ``head.1`` (527 AudioSet classes) and ``head_dist`` are replaced by the new
``num_classes`` head; ``head.0`` (its LayerNorm) and everything else load strictly, a missing,
unexpected or misshapen key is an error naming it.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from asc_dist.config import ModelConfig
from asc_dist.errors import ConfigError
from asc_dist.models.common import LoadReport, adapt_input, log_report

log = logging.getLogger(__name__)

# hear21passt's architectures of this shape (16x16 patches, stride 10, distilled): their sizes
ARCHS: dict[str, dict[str, int]] = {
    "passt_s_swa_p16_128_ap476": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "passt_s_kd_p16_128_ap486": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "passt_l_kd_p16_128_ap47": {"embed_dim": 768, "depth": 7, "num_heads": 12},
}
PATCH, STRIDE = 16, 10
AUDIOSET_TDIM = 998
HEAD = ("head.1.", "head_dist.")  # the classifier a new num_classes replaces


def grid(size: int) -> int:
    """Patches along an axis of ``size`` bins or frames (16 wide, stride 10)."""
    return (size - PATCH) // STRIDE + 1


def sizes(p) -> dict[str, int]:
    """The arch's embed_dim/depth/num_heads with ``model.passt``'s overrides."""
    return {k: (getattr(p, k) if getattr(p, k) is not None else v) for k, v in ARCHS[p.arch].items()}


class PaSST(nn.Module):
    """[B, 1, input_fdim, T] log-mel -> [B, num_classes] logits (see the module doc)."""

    def __init__(self, num_classes: int, arch: str = "passt_s_swa_p16_128_ap476",
                 s_patchout_t: int = 0, s_patchout_f: int = 0, input_fdim: int = 128,
                 input_tdim: int = AUDIOSET_TDIM, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 resize: tuple[int, int] | None = None):
        super().__init__()
        from hear21passt.models import passt as hp  # imports timm: only PaSST runs pay for it

        if grid(input_fdim) != input_fdim // STRIDE:
            raise ConfigError(f"model.passt.input_fdim={input_fdim}: {grid(input_fdim)} patch rows "
                              f"but a frequency embedding of {input_fdim // STRIDE} (128 works)")
        own = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
        if all(v is None for v in own.values()):
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole model
                net = hp.get_model(arch=arch, pretrained=False, n_classes=num_classes, in_channels=1,
                                   fstride=STRIDE, tstride=STRIDE, input_fdim=input_fdim,
                                   input_tdim=input_tdim, s_patchout_t=s_patchout_t,
                                   s_patchout_f=s_patchout_f)
        else:
            dims = {k: v if v is not None else ARCHS[arch][k] for k, v in own.items()}
            net = hp.PaSST(img_size=(input_fdim, input_tdim), patch_size=PATCH, stride=STRIDE,
                           in_chans=1, num_classes=num_classes, distilled=True,
                           s_patchout_t=s_patchout_t, s_patchout_f=s_patchout_f, **dims)
        net.head_dist = None  # unused by the forward (see the module doc)
        self.net = net
        self.s_patchout_t, self.s_patchout_f = int(s_patchout_t), int(s_patchout_f)
        self.resize = resize
        self.generator: torch.Generator | None = None  # the trainer's per-step one
        self.grad_checkpointing = False
        self._warned_long = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def _draw_device(self, x: torch.Tensor) -> torch.device:
        return self.generator.device if self.generator is not None else x.device

    def _keep(self, n: int, drop: int, x: torch.Tensor) -> torch.Tensor:
        """``n - drop`` of ``n`` indices in order, a uniformly random subset (hear21passt's
        ``randperm(n)[:n - drop].sort()``), drawn on the device."""
        if drop >= n:
            raise ValueError(f"structured patchout drops {drop} of only {n} patch rows/columns")
        order = torch.rand(n, generator=self.generator, device=self._draw_device(x)).argsort()
        return order[: n - drop].sort().values.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.patch_embed.norm(net.patch_embed.proj(adapt_input(x, self.resize)))  # [B, E, F, T]
        f_dim, t_dim = x.shape[-2:]
        if f_dim != net.freq_new_pos_embed.shape[2]:
            raise ValueError(f"PaSST input: {f_dim} patch rows, the model has "
                             f"{net.freq_new_pos_embed.shape[2]} (model.passt.input_fdim)")
        time_pos = net.time_new_pos_embed  # [1, E, 1, input_tdim // 10]
        t_max = time_pos.shape[-1]
        if t_dim > t_max:  # as PaSST's training code: cut, with a warning
            if not self._warned_long:
                self._warned_long = True
                log.warning("PaSST input of %d patch columns is longer than the time embedding's "
                            "%d: cut to them", t_dim, t_max)
            x, t_dim = x[..., :t_max], t_max
        if t_dim < t_max:
            if self.training:
                offset = torch.randint(t_max - t_dim + 1, (1,), generator=self.generator,
                                       device=self._draw_device(x)).to(x.device)
                time_pos = time_pos.index_select(3, offset + torch.arange(t_dim, device=x.device))
            else:
                time_pos = time_pos[..., :t_dim]
        x = x + time_pos
        x = x + net.freq_new_pos_embed
        if self.training and self.s_patchout_t:
            x = x.index_select(3, self._keep(t_dim, self.s_patchout_t, x))
        if self.training and self.s_patchout_f:
            x = x.index_select(2, self._keep(f_dim, self.s_patchout_f, x))
        x = x.flatten(2).transpose(1, 2)
        b = x.shape[0]
        cls_token = net.cls_token.expand(b, -1, -1) + net.new_pos_embed[:, :1, :]
        dist_token = net.dist_token.expand(b, -1, -1) + net.new_pos_embed[:, 1:, :]
        x = net.pos_drop(torch.cat((cls_token, dist_token, x), dim=1))
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in net.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = net.blocks(x)
        x = net.norm(x)
        return net.head((x[:, 0] + x[:, 1]) / 2)


def build_passt(name: str, m: ModelConfig, num_classes: int, resize) -> nn.Module:
    p = m.passt
    return PaSST(num_classes, arch=p.arch, s_patchout_t=p.s_patchout_t, s_patchout_f=p.s_patchout_f,
                 input_fdim=p.input_fdim, input_tdim=p.input_tdim, embed_dim=p.embed_dim,
                 depth=p.depth, num_heads=p.num_heads, resize=resize)


def check_passt(m: ModelConfig, published=None) -> None:
    """``model.passt`` against the weights it is to start from (``published``: an entry of
    asc_dist.models.hub.PUBLISHED, or None)."""
    p = m.passt
    if published is None:
        return
    what = f"model.pretrained={published.name}"
    if p.arch != published.arch:
        raise ConfigError(f"{what} holds {published.arch}'s weights, not model.passt.arch={p.arch}")
    if p.input_tdim != AUDIOSET_TDIM:
        raise ConfigError(
            f"model.passt.input_tdim={p.input_tdim}: {what} has a time embedding of "
            f"{AUDIOSET_TDIM // STRIDE} columns (input_tdim {AUDIOSET_TDIM}); another input_tdim "
            f"changes its size so the weights no longer load. Keep {AUDIOSET_TDIM}: shorter "
            f"inputs (1 s = 100 frames) use a slice of it")
    if p.input_fdim != 128:
        raise ConfigError(f"model.passt.input_fdim={p.input_fdim}: {what} is for 128 mel bins")
    if sizes(p) != ARCHS[published.arch]:
        raise ConfigError(f"model.passt.embed_dim/depth/num_heads={list(sizes(p).values())}: "
                          f"{what} is {published.arch} ({list(ARCHS[published.arch].values())}); "
                          f"leave them null")


def load_passt(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Load hear21passt-layout weights (or our own PaSST's, ``net.``-prefixed) into ``model``:
    the classifier replaced when its class count differs, everything else strictly."""
    if not isinstance(model, PaSST):
        raise ConfigError(f"{source}: PaSST weights for a {type(model).__name__}")
    sd = dict(state_dict)
    if sd and all(k.startswith("net.") for k in sd):
        sd = {k.removeprefix("net."): v for k, v in sd.items()}
    own = model.net.state_dict()
    report = LoadReport(source=source)
    for k in list(sd):
        new_head = k.startswith("head_dist.") or (
            k.startswith("head.1.") and k in own and sd[k].shape != own[k].shape)
        if new_head:
            report.skipped.append(f"{k} (file {list(sd[k].shape)}"
                                  + (f", model {list(own[k].shape)})" if k in own else ")"))
            del sd[k]
    replaced = {s.split(" ")[0] for s in report.skipped}
    missing = [k for k in own if k not in sd and k not in replaced]
    unexpected = [k for k in sd if k not in own]
    misshapen = [f"{k} (file {list(v.shape)}, model {list(own[k].shape)})"
                 for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or misshapen:
        def some(keys):
            return f"{len(keys)} (" + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") + ")"

        hint = (" (the time embedding is sized by model.passt.input_tdim: 998 for the AudioSet "
                "weights)" if any(k.startswith("time_new_pos_embed") for k in misshapen) else "")
        raise ConfigError(f"{source} does not fit PaSST {type(model.net).__name__} "
                          f"{list(sizes_of(model).values())}: missing {some(missing)}, unexpected "
                          f"{some(unexpected)}, misshapen {some(misshapen)}{hint}")
    model.net.load_state_dict(sd, strict=False)  # strict but for the replaced head
    report.loaded = list(sd)
    report.missing = [k for k in own if k in replaced]
    log_report(report, head=HEAD)
    return report


def sizes_of(model: PaSST) -> dict[str, int]:
    net = model.net
    return {"embed_dim": net.embed_dim, "depth": len(net.blocks),
            "num_heads": net.blocks[0].attn.num_heads if len(net.blocks) else 0}
