"""Knowledge distillation: an ensemble of teachers' logits, computed once per split, and the loss.

    python -m asc_dist.distill logits CKPT [CKPT ...] --split SPLIT_DIR [--out FILE]
        [--batch-size N] [--device auto|cpu|cuda]

Each teacher runs from its checkpoint (asc_dist.restore: its own front end, standardisation and
classes, eval mode, the features in float32 as in evaluation) over every clip of the split once;
the ensemble's logits are the teachers' mean. Like the feature cache (asc_dist.data.cache), the
work is shared: each rank scores its contiguous share of the split and the shares are
all-gathered, so every rank ends with the whole table. The file holds ``keys`` (sample keys, in
the split's stored order) and ``logits`` (float32 [N, num_classes]) plus what it was made from;
by default it lives beside the split as ``teacher-logits-<hash>.pt``, keyed by the teachers'
checkpoint digests and the split's manifest, written atomically with a checksum. A stale or
damaged file is rebuilt with a message.

Training (``distill.teachers`` / ``distill.logits``, asc_dist.train) builds the file when it is
missing and looks each batch's teacher logits up by sample key:

    loss = (1 - weight) * task loss + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL summed over classes (``distill.class_reduction=sum``; ``mean`` divides it by the
number of classes, as CPJKU's ``KLDivLoss(reduction="none").mean()`` does) and averaged over
the batch. Mixup mixes the teacher's probabilities with the same permutation and weights as the
labels; Frequency-MixStyle and the masks change no targets. CPJKU's ``kd_lambda`` weights the
label loss instead: their 0.02 is ``distill.weight=0.98`` with ``class_reduction=mean``
(conf/experiment/dcase2024_kd.yaml).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from asc_dist import atomic, dist
from asc_dist.atomic import NoSpaceError
from asc_dist.checkpoint import file_sha256
from asc_dist.cli import command
from asc_dist.data.cache import tensor_checksum
from asc_dist.data.manifest import SplitIndex, load_split, manifest_digest
from asc_dist.errors import UserError

log = logging.getLogger(__name__)

LOGITS_VERSION = 1


class DistillError(UserError):
    """Teachers and the split (or a logits file) that do not belong together."""


def default_path(split_dir: Path, digests: Sequence[str], manifest: str) -> Path:
    key = hashlib.sha256(json.dumps({"teachers": list(digests), "manifest": manifest}).encode())
    return Path(split_dir) / f"teacher-logits-{key.hexdigest()[:12]}.pt"


@dataclass
class TeacherLogits:
    keys: list[str]
    logits: torch.Tensor  # [N, C] float32
    classes: list[str]


def save(path: Path, t: TeacherLogits, teachers: Sequence[dict], manifest: str) -> bool:
    """Write the file atomically; False (with a warning) when it cannot be written."""
    logits = t.logits.detach().float().cpu().contiguous()
    state = {"version": LOGITS_VERSION, "keys": list(t.keys), "logits": logits,
             "classes": list(t.classes), "teachers": list(teachers), "manifest": manifest,
             "checksum": tensor_checksum(logits)}
    try:
        with atomic.writing(path, what="teacher logits", need_bytes=logits.numel() * 4) as f:
            torch.save(state, f)
    except (OSError, NoSpaceError) as e:  # read-only dataset storage: this run still has them
        log.warning("cannot write the teacher logits to %s (%s)", path, e)
        return False
    return True


def load(path: Path, *, manifest: str | None = None, digests: Sequence[str] | None = None
         ) -> TeacherLogits | None:
    """The file's logits, or None when it is missing, stale (other teachers or another split,
    when ``digests`` / ``manifest`` are given) or damaged (said in a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        logits = d["logits"]
        intact = (d["version"] == LOGITS_VERSION and logits.dim() == 2
                  and logits.shape == (len(d["keys"]), len(d["classes"]))
                  and d["checksum"] == tensor_checksum(logits))
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        log.warning("teacher logits %s are unreadable (%s); rebuilding them", path, type(e).__name__)
        return None
    if not intact:
        log.warning("teacher logits %s are damaged (checksum or shape); rebuilding them", path)
        return None
    if manifest is not None and d["manifest"] != manifest:
        log.warning("teacher logits %s belong to another version of the split; rebuilding them", path)
        return None
    if digests is not None and sorted(t["digest"] for t in d["teachers"]) != sorted(digests):
        log.warning("teacher logits %s come from other teachers; rebuilding them", path)
        return None
    return TeacherLogits(list(d["keys"]), logits.float(), list(d["classes"]))


@torch.no_grad()
def _one_teacher(ckpt: Path, index: SplitIndex, env: dist.DistEnv, batch_size: int,
                 progress: bool) -> tuple[list[str], torch.Tensor]:
    """(keys, logits [N, C]) of one teacher over the whole split, on every rank."""
    from asc_dist.data import build_source
    from asc_dist.restore import restore

    teacher = restore(ckpt, device=env.device)
    if teacher.classes != index.classes:
        raise DistillError(f"teacher {ckpt} was trained on classes {teacher.classes}; split "
                           f"{index.dir} has {index.classes}: the logits would name other classes")
    cfg = OmegaConf.merge(teacher.cfg, {"data": {"shards": str(index.dir.parent)}})
    source = build_source(cfg, index.split, train=False, rank=env.rank, world_size=env.world_size,
                          device=env.device, batch_size=batch_size)
    keys, rows = [], []
    try:
        batches = source.epoch(0)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=source.steps_per_epoch, unit="batch", file=sys.stderr,
                           desc=f"teacher {ckpt.name} on '{index.split}'")
        with teacher.autocast(env.device):
            for b in batches:
                logits = teacher.model(teacher.standardize(b.features)).float()
                valid = b.valid.to(logits.device)
                rows.append(logits[valid])
                keys += [k for k, ok in zip(b.keys, valid.tolist()) if ok]
    finally:
        source.close()
    # Shares are contiguous and in rank order: concatenation restores the stored order.
    all_keys = [k for share in dist.all_gather_objects(keys) for k in share]
    return all_keys, dist.all_gather_rows(torch.cat(rows))


def compute(teachers: Sequence[str | Path], index: SplitIndex, env: dist.DistEnv, batch_size: int,
            progress: bool = True) -> TeacherLogits:
    """The teachers' mean logits over ``index``'s split; every rank takes part."""
    from asc_dist.restore import resolve_checkpoint

    total, keys = None, None
    for t in teachers:
        k, logits = _one_teacher(resolve_checkpoint(t), index, env, batch_size, progress)
        if keys is not None and k != keys:  # same split, same plan: cannot happen unless damaged
            raise DistillError(f"teacher {t} saw the split's clips in another order")
        keys, total = k, logits if total is None else total + logits
    return TeacherLogits(keys, (total / len(teachers)).cpu(), list(index.classes))


def load_or_build(teachers: Sequence[str | Path], index: SplitIndex, env: dist.DistEnv, *,
                  out: str | Path | None = None, fallback_dir: str | Path | None = None,
                  batch_size: int = 64, progress: bool = True) -> tuple[Path, TeacherLogits]:
    """The ensemble's logits for ``index``'s split: the file at ``out`` (default: beside the
    split, keyed by the teachers and the split) when it is current, else computed by all ranks
    and written by rank 0. ``fallback_dir`` (a run dir) holds the file when the split's storage
    is read-only, so a resumed run does not recompute it. Every rank must call this together."""
    from asc_dist.restore import resolve_checkpoint

    if not teachers:
        raise DistillError("no teacher checkpoints given")
    # The mean does not depend on the order the teachers are named in; the file should not either.
    by_digest = sorted((file_sha256(p), p) for p in map(resolve_checkpoint, teachers))
    digests, paths = [d for d, _ in by_digest], [p for _, p in by_digest]
    manifest = manifest_digest(index.dir)
    path = Path(out) if out is not None else default_path(index.dir, digests, manifest)
    places = [path] + ([Path(fallback_dir) / path.name] if fallback_dir is not None and out is None else [])
    for place in places:
        found = load(place, manifest=manifest, digests=digests)
        if not dist.any_rank(found is None, env.device):
            return place, found
    if env.is_main:
        log.info(f"teacher logits: {len(paths)} teacher(s) over split '{index.split}' "
                 f"({index.num_samples} clips) -> {path}")
    table = compute(paths, index, env, batch_size, progress=progress and env.is_main)
    if env.is_main:
        record = [{"path": str(p), "digest": d} for p, d in zip(paths, digests)]
        for place in places:
            if save(place, table, record, manifest):
                if place != path:
                    log.warning(f"teacher logits kept in {place} instead (found there next start)")
                path = place
                break
    path = Path(dist.all_gather_objects(str(path))[0])  # where rank 0 wrote it, on every rank
    return path, table


class TeacherTargets:
    """Each batch's teacher logits, looked up by sample key, kept on the training device."""

    def __init__(self, table: TeacherLogits, index: SplitIndex, device: torch.device,
                 source: str = "the teacher logits"):
        if table.classes != index.classes:
            raise DistillError(f"{source} name classes {table.classes}; split {index.dir} has "
                               f"{index.classes}")
        self.row = {k: i for i, k in enumerate(table.keys)}
        missing = [s.key for s in index.samples if s.key not in self.row]
        if missing:
            raise DistillError(f"{source} cover {index.num_samples - len(missing)} of the "
                               f"{index.num_samples} clips of split {index.dir}; missing e.g. "
                               f"{', '.join(missing[:3])} (computed for another split?)")
        self.logits = table.logits.to(device)
        self.device = device

    def __call__(self, keys: Sequence[str]) -> torch.Tensor:
        ids = torch.tensor([self.row[k] for k in keys], dtype=torch.long)
        if self.device.type == "cuda":  # from pinned memory the copy is queued, not waited for
            ids = ids.pin_memory()
        return self.logits.index_select(0, ids.to(self.device, non_blocking=True))


def targets_for_run(cfg: Any, env: dist.DistEnv, batch_size: int) -> TeacherTargets | None:
    """The training split's teacher targets per ``cfg.distill`` (None when it names none)."""
    d = cfg.distill
    if not d.teachers and d.logits is None:
        return None
    index = load_split(cfg.data.shards, cfg.data.train_split)
    if d.teachers:
        path, table = load_or_build(list(d.teachers), index, env, out=d.logits,
                                    fallback_dir=cfg.run_dir, batch_size=batch_size)
    else:  # a given file without its teachers: it must exist and cover the split
        path = Path(d.logits)
        table = load(path, manifest=None)
        if dist.any_rank(table is None, env.device):  # raised on every rank: none left waiting
            raise DistillError(f"distill.logits={d.logits}: no usable logits file there (on "
                               f"every rank; give distill.teachers to build it)")
    return TeacherTargets(table, index, env.device, source=f"teacher logits {path}")


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
            class_reduction: str = "sum") -> torch.Tensor:
    """T^2 * KL(p_teacher || softmax(student / T)), summed (or averaged: ``class_reduction``)
    over classes, mean over the batch.

    ``teacher_probs`` = softmax(teacher logits / T), possibly mixed by mixup. float32 with
    autocast off, as the task losses (asc_dist.losses).
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
        p = teacher_probs.float()
        kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1).mean()
    if class_reduction == "mean":
        kl = kl / student_logits.shape[-1]
    elif class_reduction != "sum":
        raise ValueError(f"distill.class_reduction={class_reduction!r}: must be sum or mean")
    return kl * temperature ** 2


def teacher_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits.float() / temperature, dim=-1)


USAGE_EPILOG = """Writes a torch file with keys (sample keys) and logits (float32 [N, C], the
teachers' mean). Run under torchrun to share the work between ranks. Training builds the file
itself when distill.teachers is set; this command makes it ahead of time."""


@command("asc_dist.distill")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asc_dist.distill",
                                description="Knowledge distillation tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits", help="the teachers' mean logits over a packed split, once",
                        epilog=USAGE_EPILOG)
    lg.add_argument("checkpoints", nargs="+", help="teacher checkpoints (.pt files or run dirs)")
    lg.add_argument("--split", required=True, help="a packed split dir (holding manifest.json)")
    lg.add_argument("--out", help="output file (default: beside the split, keyed by teachers + split)")
    lg.add_argument("--batch-size", type=int, default=64, help="clips per rank per batch (64)")
    lg.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    split = Path(args.split)
    if not (split / "manifest.json").is_file():
        raise DistillError(f"--split {split}: no manifest.json there (expected a packed split "
                           f"directory such as shards/tau2022/train)")
    index = load_split(split.resolve().parent, split.resolve().name)
    env = dist.init(args.device)
    try:
        path, table = load_or_build(args.checkpoints, index, env, out=args.out,
                                    batch_size=args.batch_size)
    finally:
        dist.teardown()
    if env.is_main:
        acc = _accuracy(table, index)
        print(json.dumps({"out": str(path), "clips": len(table.keys), "classes": len(table.classes),
                          "teachers": len(args.checkpoints), "ensemble_accuracy": acc}))
    return 0


def _accuracy(table: TeacherLogits, index: SplitIndex) -> float | None:
    """The ensemble's plain accuracy on the split (labelled splits): a sanity figure."""
    if not index.labelled:
        return None
    with open(index.dir / "samples.jsonl", encoding="utf-8") as f:
        label = {r["key"]: r["label"] for r in map(json.loads, f) if "label" in r}
    pred = table.logits.argmax(dim=1).tolist()
    return round(sum(int(p == label.get(k)) for k, p in zip(table.keys, pred)) / max(1, len(pred)), 4)


if __name__ == "__main__":
    raise SystemExit(main())
