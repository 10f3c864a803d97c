"""Evaluation metrics: class-wise accuracy (the paper's metric), confusion, log-loss, breakdowns.

``ClassificationMeter`` accumulates integer confusion matrices and summed negative
log-likelihoods (overall and per breakdown value, e.g. per city and device) on CPU. All state
packs into one fixed-shape float64 vector, so one all-reduce-sum gives every rank the same exact
totals (counts stay exact in float64 up to 2**53). Class-wise accuracy is the mean, over classes
that have samples, of per-class accuracy (recall). :func:`device_groups` pools the per-device
results into the groups DCASE 2025 reports (real / seen / unseen devices, known / unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


class ClassificationMeter:
    def __init__(
        self, classes: Sequence[str], groups: dict[str, Sequence[str]] | None = None
    ) -> None:
        self.classes = list(classes)
        self.num_classes = c = len(self.classes)
        if c == 0:
            raise ValueError("ClassificationMeter needs at least one class")
        # The full vocabulary per breakdown is known on every rank, so shapes agree across ranks.
        self.groups = {name: list(values) for name, values in (groups or {}).items()}
        self._index = {
            name: {v: i for i, v in enumerate(vals)} for name, vals in self.groups.items()
        }
        for name, vals in self.groups.items():
            if len(self._index[name]) != len(vals):
                raise ValueError(f"breakdown '{name}' has duplicate values: {vals}")
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.confusion = torch.zeros(c, c, dtype=torch.int64)
        self.group_confusion = {
            name: torch.zeros(len(vals), c, c, dtype=torch.int64)
            for name, vals in self.groups.items()
        }
        self.group_nll = {name: torch.zeros(len(vals), dtype=torch.float64)
                          for name, vals in self.groups.items()}
        self.nll_sum = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor | None = None,
        group_values: dict[str, Sequence[str]] | None = None,
    ) -> None:
        """Add a batch; rows where ``valid`` is False (padding) are ignored."""
        c = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != c:
            raise ValueError(f"logits must be [B, {c}], got {list(logits.shape)}")
        b = logits.shape[0]
        labels = labels.detach().to("cpu", torch.int64).reshape(-1)
        if labels.numel() != b:
            raise ValueError(f"labels has {labels.numel()} entries for {b} logit rows")
        mask = (
            torch.ones(b, dtype=torch.bool)
            if valid is None
            else valid.detach().to("cpu", torch.bool).reshape(-1)
        )
        if mask.numel() != b:
            raise ValueError(f"valid has {mask.numel()} entries for {b} logit rows")
        group_idx = {}
        for name, index in self._index.items():
            values = (group_values or {}).get(name)
            if values is None:
                raise ValueError(
                    f"update() needs group_values['{name}'] (breakdowns: {list(self.groups)})"
                )
            if len(values) != b:
                raise ValueError(f"group_values['{name}'] has {len(values)} entries for {b} rows")
            try:  # padding rows carry no metadata: only valid rows are looked up
                kept = [v for v, keep in zip(values, mask.tolist()) if keep]
                group_idx[name] = torch.tensor([index[v] for v in kept], dtype=torch.int64)
            except KeyError as e:
                raise ValueError(
                    f"{name} value {e.args[0]!r} is not in the breakdown vocabulary {self.groups[name]}"
                ) from None
        labels = labels[mask]
        if labels.numel() and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(
                f"labels outside [0, {c}): {labels[(labels < 0) | (labels >= c)].tolist()}"
            )
        # float64 log_softmax: bf16/fp16 logits would make the log-loss depend on the precision.
        logp = logits.detach()[mask.to(logits.device)].to("cpu", torch.float64).log_softmax(dim=1)
        preds = logp.argmax(dim=1)
        cell = labels * c + preds
        self.confusion += torch.bincount(cell, minlength=c * c).view(c, c)
        nll = -logp.gather(1, labels[:, None])[:, 0]
        for name, idx in group_idx.items():
            g = len(self.groups[name])
            self.group_confusion[name] += torch.bincount(
                idx * c * c + cell, minlength=g * c * c
            ).view(g, c, c)
            self.group_nll[name].index_add_(0, idx, nll)
        self.nll_sum += nll.sum()

    def state_tensor(self) -> torch.Tensor:
        """All state as one flat float64 vector (the unit of cross-rank reduction)."""
        parts = [self.confusion.flatten()] + [g.flatten() for g in self.group_confusion.values()]
        nll = [g for g in self.group_nll.values()] + [self.nll_sum.reshape(1)]
        return torch.cat([p.to(torch.float64) for p in parts] + nll)

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """The report, from this meter's state summed by ``reduce`` (an all-reduce-sum) if given.

        ``reduce`` gets a fresh CPU float64 tensor and may work in place; its result is used.
        The meter's own state is not changed.
        """
        flat = self.state_tensor()
        if reduce is not None:
            flat = reduce(flat).to("cpu", torch.float64)
        c = self.num_classes
        values = flat.numpy()
        confusion = np.rint(values[: c * c]).astype(np.int64).reshape(c, c)
        offset = c * c
        gconfs = {}
        for name, vals in self.groups.items():
            size = len(vals) * c * c
            gconfs[name] = (
                np.rint(values[offset : offset + size]).astype(np.int64).reshape(len(vals), c, c)
            )
            offset += size
        breakdowns = {}
        for name, vals in self.groups.items():
            nlls = values[offset : offset + len(vals)]
            offset += len(vals)
            breakdowns[name] = {v: _scores(m, nl) for v, m, nl in zip(vals, gconfs[name], nlls)}
        nll_sum = float(values[offset])
        count = int(confusion.sum())
        return {
            "classwise_accuracy": _classwise(confusion),
            "accuracy": _accuracy(confusion),
            "per_class": dict(zip(self.classes, _per_class(confusion))),
            "log_loss": nll_sum / count if count else None,
            "count": count,
            "class_counts": {cls: int(n) for cls, n in zip(self.classes, confusion.sum(axis=1))},
            "confusion": confusion.tolist(),
            "breakdowns": breakdowns,
        }


def _scores(confusion: np.ndarray, nll_sum: float) -> dict:
    n = int(confusion.sum())
    return {"count": n, "accuracy": _accuracy(confusion), "classwise_accuracy": _classwise(confusion),
            "log_loss": float(nll_sum) / n if n else None, "confusion": confusion.tolist()}


# DCASE 2025 task 1's device groups (CPJKU/dcase2025_task1_baseline train_base.py): the real
# recording devices, the simulated devices seen in training, and every other id (s4-s6 in the
# development set's test split, more in the evaluation set).
REAL_DEVICES = ("a", "b", "c")
SEEN_DEVICES = ("s1", "s2", "s3")


def device_groups(report: dict, known: list[str] | None = None) -> dict[str, dict]:
    """The per-device results of ``report`` pooled into groups, each scored like a breakdown
    value (clips, accuracy, class-wise accuracy, log loss): ``real`` (a, b, c), ``seen`` (s1-s3)
    and ``unseen`` (every other device) when the split has DCASE device ids; ``known`` (the
    ``known`` devices: those with a model, or the training devices) and ``unknown`` (the rest)
    when ``known`` is given. Groups without clips are left out, and all of them for a split of
    one device."""
    per_device = report.get("breakdowns", {}).get("device") or {}
    present = [d for d, r in per_device.items() if r["count"] and "confusion" in r]
    if len(present) < 2:
        return {}
    groups: dict[str, list[str]] = {}
    if any(d in REAL_DEVICES + SEEN_DEVICES for d in present):
        groups["real"] = [d for d in present if d in REAL_DEVICES]
        groups["seen"] = [d for d in present if d in SEEN_DEVICES]
        groups["unseen"] = [d for d in present if d not in REAL_DEVICES + SEEN_DEVICES]
    if known is not None:
        groups["known"] = [d for d in present if d in known]
        groups["unknown"] = [d for d in present if d not in known]
    out = {}
    for name, devices in groups.items():
        if not devices:
            continue
        conf = sum(np.asarray(per_device[d]["confusion"]) for d in devices)
        nll = sum(per_device[d]["log_loss"] * per_device[d]["count"] for d in devices)
        scores = _scores(conf, nll)
        del scores["confusion"]
        out[name] = {**scores, "devices": devices}
    return out


def _per_class(confusion: np.ndarray) -> list[float | None]:
    rows = confusion.sum(axis=1)
    return [float(confusion[i, i] / n) if n else None for i, n in enumerate(rows)]


def _classwise(confusion: np.ndarray) -> float | None:
    accs = [a for a in _per_class(confusion) if a is not None]
    return float(np.mean(accs)) if accs else None


def _accuracy(confusion: np.ndarray) -> float | None:
    n = confusion.sum()
    return float(np.trace(confusion) / n) if n else None


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_report(report: dict, classes: Sequence[str]) -> str:
    """Markdown: headline numbers, per-class accuracy, breakdowns (console and report.md)."""
    headline = (
        f"class-wise accuracy: {fmt(report['classwise_accuracy'])} | accuracy: "
        f"{fmt(report['accuracy'])} | log-loss: {fmt(report['log_loss'])} | "
        f"clips: {report['count']}"
    )
    lines = [
        headline,
        "",
        "| class | accuracy | clips |",
        "|---|---:|---:|",
    ]
    width = max(len(c) for c in classes)
    for cls in classes:
        lines.append(
            f"| {cls:<{width}} | {fmt(report['per_class'].get(cls))} | "
            f"{report['class_counts'].get(cls, 0)} |"
        )
    lines.append(
        f"| **class-wise mean** | **{fmt(report['classwise_accuracy'])}** | {report['count']} |"
    )
    for name, table in report.get("breakdowns", {}).items():
        lines += ["", f"| {name} | accuracy | class-wise | log-loss | clips |",
                  "|---|---:|---:|---:|---:|"]
        for value, r in table.items():
            lines.append(f"| {value} | {fmt(r['accuracy'])} | {fmt(r['classwise_accuracy'])} | "
                         f"{fmt(r.get('log_loss'))} | {r['count']} |")
    if report.get("device_groups"):
        lines += ["", "| device group | devices | accuracy | class-wise | log-loss | clips |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, r in report["device_groups"].items():
            lines.append(f"| {name} | {', '.join(r['devices'])} | {fmt(r['accuracy'])} | "
                         f"{fmt(r['classwise_accuracy'])} | {fmt(r['log_loss'])} | {r['count']} |")
    if report.get("general"):  # a device set: the general model alone beside it, per device
        g, gain = report["general"], report.get("gain") or {}
        lines += ["", "| device | model | general class-wise | set class-wise | gain |",
                  "|---|---|---:|---:|---:|",
                  f"| **all** | routed | {fmt(g['classwise_accuracy'])} | "
                  f"{fmt(report['classwise_accuracy'])} | {fmt_gain(gain.get('all'))} |"]
        own = set(report.get("members") or [])
        for d, r in (report.get("breakdowns", {}).get("device") or {}).items():
            gr = g["breakdowns"]["device"].get(d, {})
            lines.append(f"| {d} | {'own' if d in own else 'general'} | "
                         f"{fmt(gr.get('classwise_accuracy'))} | {fmt(r['classwise_accuracy'])} | "
                         f"{fmt_gain(gain.get(d))} |")
    return "\n".join(lines)


def fmt_gain(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"
