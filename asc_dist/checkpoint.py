"""Checkpoints: atomic ``step_<N>.pt`` files, a ``latest`` pointer, ``best.pt``, pruning, resume.

Layout under ``<run_dir>/checkpoints/``::

    step_500.pt  step_1000.pt  step_1500.pt   the newest ``keep_last`` saves
    latest                                   text: the file name of the newest complete save
    best.pt                                  hard link (or copy) of the best save so far

Every file appears by ``os.replace`` of a fsynced temporary in the same directory, so a crash
or a failed save leaves the previous checkpoint and pointer intact. Only the writer (rank 0)
saves; every rank may read. Contents must load with ``torch.load(weights_only=True)``: tensors,
containers, numbers and strings only (see ``rng_state`` for how the RNG states comply). Every
tensor is saved on the CPU (:func:`to_cpu`), so a host without the training GPUs loads a
checkpoint with a plain ``torch.load(path, weights_only=True)``, no ``map_location`` needed.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asc_dist import atomic
from asc_dist.atomic import NoSpaceError
from asc_dist.errors import CheckpointError

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _step_of(path: Path) -> int | None:
    m = _STEP_FILE.match(path.name)
    return int(m.group(1)) if m else None


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int = 3, is_writer: bool = True) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.is_writer = is_writer

    # -- writing ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict, *, best: bool = False) -> Path | None:
        """Write ``step_<step>.pt`` atomically, point ``latest`` at it, prune old saves."""
        if not self.is_writer:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step}.pt"
        try:
            # torch reports a full disk in its own words ("unexpected pos ..."): the size of the
            # state tells atomic.writing when that is what happened.
            state = to_cpu(state)  # model, optimizer state, RNG states: all of it
            with atomic.writing(path, what="checkpoint", need_bytes=_nbytes(state)) as f:
                torch.save(state, f)
        except NoSpaceError as e:
            raise CheckpointError(f"{e}; the last complete checkpoint is {self.dir / 'latest'} "
                                  f"-> {self._pointer_target()}") from None
        except Exception as e:
            raise CheckpointError(f"failed to save checkpoint {path}: {e}") from e
        # The pointer moves only after the file is complete: a reader never sees a half save.
        atomic.write_bytes(self.dir / "latest", f"{path.name}\n".encode())
        if best:
            self._link_best(path)
        self._prune(step)
        return path

    def _pointer_target(self) -> str:
        try:
            return (self.dir / "latest").read_text().strip()
        except OSError:
            return "none yet"

    def _link_best(self, path: Path) -> None:
        best = self.dir / "best.pt"
        tmp = self.dir / f".best.pt.tmp.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            try:
                # A hard link costs no space and survives pruning of the step file.
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, best)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.fsync_dir(self.dir)

    def _prune(self, current: int) -> None:
        # Saves newer than `current` belong to a timeline abandoned by a resume from an older
        # checkpoint; they are left alone (and overwritten when the run gets there again).
        older = sorted(
            (s, p)
            for p in self.dir.glob("step_*.pt")
            if (s := _step_of(p)) is not None and s <= current
        )
        for _, p in older[: max(0, len(older) - self.keep_last)]:
            p.unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    def _candidates(self) -> list[Path]:
        """Saves to try, newest first: the pointer's target, then older step files."""
        steps = sorted(
            ((s, p) for p in self.dir.glob("step_*.pt") if (s := _step_of(p)) is not None),
            reverse=True,
        )
        pointer = self.dir / "latest"
        target = None
        if pointer.is_file():
            name = pointer.read_text().strip()
            target = self.dir / name
            if _step_of(target) is None or not target.is_file():
                log.warning(f"checkpoint pointer {pointer} names '{name}', which is not a "
                            f"checkpoint file here; using the newest step_*.pt instead")
                target = None
        if target is None:
            return [p for _, p in steps]
        limit = _step_of(target)
        return [target] + [p for s, p in steps if s < limit]

    def latest(self) -> Path | None:
        """The newest checkpoint that passes an integrity check; warns about each one skipped."""
        if not self.dir.is_dir():
            return None
        for path in self._candidates():
            problem = verify(path)
            if problem is None:
                return path
            log.warning(f"checkpoint {path} is unreadable ({problem}); falling back to the "
                        f"previous one")
        return None

    @staticmethod
    def load(path: str | Path) -> dict:
        return load(path)


def to_cpu(obj: Any, where: str = "state") -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples on the CPU (CPU tensors are kept,
    not copied); containers keep their type (an ``OrderedDict`` state dict its ``_metadata``).
    A tensor without data (the ``meta`` device) raises ValueError naming where it sits."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            raise ValueError(f"{where} is a tensor on the meta device: it holds no data to save")
        return obj.cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same type, default factory and attributes (_metadata)
        for k, v in obj.items():
            out[k] = to_cpu(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_cpu(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if type(obj) in (list, tuple):
            return type(obj)(items)
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
    return obj


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what a save needs on disk, give or take)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def file_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file: a model is its weights, wherever the file lies (teachers,
    the members of a device set)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: str | Path) -> int:
    """The training step a checkpoint was saved at, read without loading its tensors."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step", 0))


def verify(path: str | Path) -> str | None:
    """Cheap integrity check: None if ``path`` opens as a weights-only checkpoint, else why not.

    ``mmap=True`` reads the zip directory at the end of the file and the pickle, not the tensor
    data, so a truncated file (the usual crash damage) fails here at a fraction of a full load.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF, OS errors: all "not usable"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def load(path: str | Path) -> dict:
    """``torch.load`` on CPU, weights only; a missing, corrupt or truncated file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded (corrupt or truncated?): {e}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def check_compatible(
    ckpt: dict, *, model_name: str, classes: list[str], path: str | Path | None = None
) -> None:
    """Refuse a checkpoint trained with another model or class list (order matters: it is the head)."""
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    step = ckpt.get("step")
    if step is not None:
        where += f" (step {step})"
    old_model = ckpt.get("model_name")
    if old_model is None:
        old_model = (ckpt.get("config") or {}).get("model", {}).get("name")
    old_classes = ckpt.get("classes")
    problems = []
    if old_model != model_name:
        problems.append(f"model {old_model!r}; this run uses model {model_name!r}")
    if old_classes is None or list(old_classes) != list(classes):
        problems.append(f"classes {old_classes}; this run uses classes {list(classes)}")
    if problems:
        raise CheckpointError(
            f"{where} was trained with "
            + " and ".join(problems)
            + ". Use a fresh run_dir, or resume=never to start over."
        )


# -- RNG states ------------------------------------------------------------------------------------
# weights_only=True refuses numpy arrays and arbitrary objects, so every state becomes tensors,
# lists and ints here and is rebuilt exactly on the way back.


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    # Only the current device, and only once this process has used CUDA: querying every device
    # would open a CUDA context on each GPU of the node from every rank.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device (LOCAL_RANK's GPU)
