"""Console progress for the training loop, with the timing kept out of the loop.

    progress = Progress(total_steps, every=log_every, clips_per_step=global_batch, enabled=rank0)
    for step, batch in progress.iterate(batches, start=step0):
        ...                                  # no host synchronisation needed here
        if progress.due(step):
            window = progress.window(step, loss=mean_loss, lr=lr)   # prints one line
        with progress.paused():              # evaluation and checkpoints are not training time
            ...

A window's figures are wall-clock over the steps since the last log line, so they stay honest
when the device runs asynchronously: the caller reads the loss (a synchronisation) at log steps
only, and that read closes the window. ``data_wait_frac`` is the share of the window the loop
spent waiting for the next batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total_steps: int, *, every: int, clips_per_step: int, enabled: bool) -> None:
        self.total = total_steps
        self.every = max(1, every)
        self.clips_per_step = clips_per_step
        self.enabled = enabled
        self._ema_step_s: float | None = None
        self._open(0)

    def _open(self, step: int) -> None:
        self._first = step  # the last step of the previous window
        self._t0 = time.perf_counter()
        self._wait = 0.0
        self._paused = 0.0

    def iterate(self, batches: Iterable[Any], start: int = 0) -> Iterator[tuple[int, Any]]:
        """(step, batch) for steps start+1, start+2, ...; measures the wait for each batch."""
        self._open(start)
        it = iter(batches)
        step = start
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._wait += time.perf_counter() - t
            step += 1
            yield step, batch

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t

    def window(self, step: int, *, loss: float, lr: float) -> dict:
        """Close the window ending at ``step``: its aggregates (printed on the main rank)."""
        steps = max(1, step - self._first)
        elapsed = max(time.perf_counter() - self._t0 - self._paused, 1e-9)
        out = {
            "loss": loss,
            "lr": lr,
            "clips_per_s": steps * self.clips_per_step / elapsed,
            "data_wait_frac": min(1.0, self._wait / elapsed),
            "step_time": elapsed / steps,
        }
        # Smooth the ETA across windows so one slow window does not swing it.
        s = out["step_time"]
        self._ema_step_s = s if self._ema_step_s is None else 0.7 * self._ema_step_s + 0.3 * s
        if self.enabled:
            eta = _hms(max(0, self.total - step) * self._ema_step_s)
            width = len(str(self.total))
            log.info(f"step {step:>{width}}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                     f"{out['clips_per_s']:.1f} clips/s | data wait {100 * out['data_wait_frac']:.1f}% | "
                     f"eta {eta}")
        self._open(step)
        return out


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
