"""Run tracking on rank 0: ``metrics.jsonl`` and Weights & Biases.

``Tracker`` writes every logged dict to ``<run_dir>/metrics.jsonl`` and, per ``cfg.wandb.mode``
(online | offline | disabled), to W&B on one global step. W&B is optional in the strong sense: a
failure anywhere (no network, bad key, init timeout, a failing log call) logs one warning and
switches W&B off; training and the JSONL log go on. Other ranks build ``Tracker(enabled=False)``,
whose methods do nothing.

No secret is written anywhere by this module: W&B reads its key from ``WANDB_API_KEY`` or
``~/.netrc`` itself, and warning texts are scrubbed of the key's value.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from asc_dist import plots
from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)

# Env vars this module pointed into a run dir; a later Tracker (another run, another test) may
# move them, but a value the user set is never overridden.
_OURS: dict[str, str] = {}


def _point_wandb_dirs(run_dir: Path) -> None:
    targets = {
        "WANDB_DIR": run_dir,
        "WANDB_CACHE_DIR": run_dir / "wandb" / ".cache",
        "WANDB_CONFIG_DIR": run_dir / "wandb" / ".config",
        "WANDB_DATA_DIR": run_dir / "wandb" / ".data",
    }
    for var, path in targets.items():
        current = os.environ.get(var)
        if current is None or _OURS.get(var) == current:
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = _OURS[var] = str(path)


def check_credentials(cfg) -> None:
    """wandb.mode=online needs an API key (WANDB_API_KEY or a ~/.netrc entry for the server):
    without one, wandb would prompt or fail after the process group is up; say so now."""
    if cfg.wandb.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host or ""):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(f"wandb.mode=online but no W&B API key for {host}: run 'wandb login' (or "
                      f"export WANDB_API_KEY), or set wandb.mode=offline and 'wandb sync' later")


def _scrub(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def _plain(x: Any) -> Any:
    """JSON-friendly scalars: tensors and numpy numbers become Python numbers."""
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot log a {type(x).__name__} to metrics.jsonl")


def _repair_jsonl(path: Path) -> None:
    """Drop a partial last line left by a crash mid-write, so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    log.warning(
        "%s: dropped a truncated last line (%d bytes) left by an interrupted run",
        path,
        len(data) - keep,
    )


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl; an unparsable (truncated) line is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class Tracker:
    def __init__(
        self, cfg, run_dir: str | Path, *, enabled: bool, resume_id: str | None = None
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._cfg = cfg
        self._run = None
        self._jsonl = None
        self._closed = False
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        _repair_jsonl(path)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run
        if cfg.wandb.mode != "disabled":
            self._init_wandb(resume_id)

    # -- W&B plumbing ----------------------------------------------------------------------------

    def _init_wandb(self, resume_id: str | None) -> None:
        cfg, wcfg = self._cfg, self._cfg.wandb
        _point_wandb_dirs(self.run_dir)
        timeout = wcfg.init_timeout
        try:
            import wandb
            from omegaconf import OmegaConf

            self._run = wandb.init(
                project=wcfg.project,
                entity=wcfg.entity,
                id=resume_id,  # None: W&B makes a new id; the trainer stores it in checkpoints
                resume="allow",
                name=cfg.name,
                tags=list(wcfg.tags) or None,
                group=wcfg.group,  # runs of one sweep (a row's seeds) drawn together
                job_type=wcfg.job_type,
                config=OmegaConf.to_container(cfg, resolve=True),
                dir=str(self.run_dir),
                mode=wcfg.mode,  # fixed before init; never switched after a failure
                settings=wandb.Settings(init_timeout=float(timeout)),
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            self._run = None
            self._wandb_failed("init", e)

    def _wandb_failed(self, what: str, e: BaseException) -> None:
        msg = _scrub(f"{type(e).__name__}: {e}".strip())
        log.warning(
            "W&B %s failed (%s); continuing without W&B (metrics.jsonl still written)", what, msg
        )
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception as finish_error:  # noqa: BLE001
                log.debug("W&B finish after a failure failed too: %s", _scrub(str(finish_error)))

    def _wandb(self, what: str, fn) -> None:
        if self._run is None:
            return
        try:
            fn(self._run)
        except Exception as e:  # noqa: BLE001
            self._wandb_failed(what, e)

    @property
    def wants_images(self) -> bool:
        return self._run is not None and self._cfg.wandb.log_images > 0

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    # -- logging ---------------------------------------------------------------------------------

    def _write(self, record: dict) -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record, default=_plain) + "\n")
        self._jsonl.flush()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "time": round(time.time(), 3), **metrics})
        self._wandb("log", lambda run: run.log(dict(metrics), step=step))

    def log_eval(self, step: int, report: dict, classes, prefix: str = "eval") -> None:
        """Headline numbers and per-class accuracy; on W&B also a confusion plot and a table."""
        if not self.enabled:
            return
        scalars = {
            f"{prefix}/classwise_accuracy": report["classwise_accuracy"],
            f"{prefix}/accuracy": report["accuracy"],
            f"{prefix}/log_loss": report["log_loss"],
            f"{prefix}/count": report["count"],
        }
        scalars.update({f"{prefix}/per_class/{c}": report["per_class"].get(c) for c in classes})
        self._write({"step": step, "time": round(time.time(), 3), **scalars})

        def to_wandb(run) -> None:
            import wandb

            png = plots.plot_confusion(
                report, classes, self.run_dir / "plots" / f"confusion_step{step}.png"
            )
            table = wandb.Table(
                columns=["class", "accuracy", "clips"],
                data=[
                    [c, report["per_class"].get(c), report["class_counts"].get(c, 0)]
                    for c in classes
                ],
            )
            # W&B rejects None in numeric charts: leave empty classes out of the scalars.
            logged = {k: v for k, v in scalars.items() if v is not None}
            run.log(
                {
                    **logged,
                    f"{prefix}/confusion": wandb.Image(str(png)),
                    f"{prefix}/per_class_table": table,
                },
                step=step,
            )

        self._wandb("log_eval", to_wandb)

    def log_images(self, step: int, features: torch.Tensor, labels: list[str]) -> None:
        """A few log-mel inputs ([N, 1, mels, frames]) as images, low frequencies at the bottom."""
        if self._run is None:
            return

        def to_wandb(run) -> None:
            import wandb

            images = []
            for x, label in zip(features.detach().float().cpu(), labels):
                m = x[0].numpy()[::-1]
                lo, hi = float(m.min()), float(m.max())
                u8 = ((m - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
                images.append(wandb.Image(u8, caption=str(label)))
            run.log({"train/logmel": images}, step=step)

        self._wandb("log_images", to_wandb)

    def summary(self, values: dict) -> None:
        self._wandb("summary", lambda run: run.summary.update(dict(values)))

    def close(self, exit_code: int | None = None) -> None:
        """Finish W&B and close the JSONL; safe to call twice. Without ``exit_code``, 1 while
        an exception is propagating (this is called from ``finally``), else 0."""
        if self._closed:
            return
        self._closed = True
        if exit_code is None:
            exit_code = 1 if sys.exc_info()[0] is not None else 0
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed (%s)", _scrub(str(e)))
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(exit_code=1 if exc_type else 0)
