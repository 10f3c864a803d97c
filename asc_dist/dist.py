"""Everything that touches torch.distributed: environment, init/teardown, DDP wrapping, reductions.

The same code runs as one plain process (no process group) or under torchrun (RANK, LOCAL_RANK,
WORLD_SIZE in the environment): NCCL with one GPU per process when CUDA is present, gloo on CPU.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from asc_dist.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = env_world_size()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} visible "
                f"GPU(s): start at most one process per GPU (--nproc_per_node), or set "
                f"train.device=cpu")
        torch.cuda.set_device(local_rank)
        # Input shapes are fixed for a run: let cuDNN pick the fastest convolution algorithms.
        torch.backends.cudnn.benchmark = True
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
        # A broken rank or network fails here, at start-up, instead of in the first backward.
        warm = torch.ones(1, device=dev)
        dist.all_reduce(warm)
        if int(warm.item()) != world_size:
            raise RuntimeError(f"warm-up all_reduce gave {warm.item()}, expected {world_size}")
    return DistEnv(rank, local_rank, world_size, dev)


def pick_device(name: str) -> torch.device:
    """The device of a single-process command: ``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available on this machine")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def teardown() -> None:
    """The one exit path: destroy the process group whether training ended or failed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (on the process group's device) and return it."""
    if not _active():
        return t
    # gloo reduces CPU tensors, NCCL CUDA tensors: move there and back when needed.
    target = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    work = t.to(target)
    dist.all_reduce(work)
    if work is not t:
        t.copy_(work)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (a blocking agreement, for start-up)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so evaluation is identical on all ranks."""
    if not _active():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` [n_r, ...] along dim 0, in rank order, on every rank."""
    if not _active():
        return t
    target = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=target)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=target)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, env: DistEnv, *, sync_bn: bool = False,
               grad_compress: str = "none") -> nn.Module:
    """DDP-wrap ``model`` when running distributed; a no-op in a single process.

    Gradients live in DDP's communication buckets (no copy per step); ``grad_compress=bf16``
    all-reduces them in bfloat16, halving the traffic on slow interconnects.
    """
    if not env.distributed:
        return model
    if sync_bn:
        if env.device.type != "cuda":
            raise ConfigError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU/gloo kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if grad_compress == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class StopSignal:
    """Records SIGTERM/SIGUSR1/SIGINT; all ranks agree on it at one step boundary (:meth:`agreed`).

    The handler only sets a flag, so a signal never interrupts a collective or a checkpoint write.
    The agreement never blocks a step: each step starts an asynchronous MAX all-reduce of the
    flag on a CPU (gloo) side group and reads the one started the step before, which finished
    meanwhile. Every rank reads the same reduction at the same step, so all stop together, one
    step after the request reached any rank.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

        self._group = dist.new_group(backend="gloo") if _active() else None
        self._flag = torch.zeros(1)
        self._work = None

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "stop now", without the checkpoint
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def agreed(self) -> bool:
        """Call once per step on every rank: True on all ranks at the same step once any rank
        received a stop signal."""
        if self._group is None:
            return self.requested
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._flag.item() > 0:  # a CPU tensor: no device synchronisation
                return True
        self._flag.fill_(1.0 if self.requested else 0.0)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group,
                                     async_op=True)
        return False

    def restore(self) -> None:
        if self._work is not None:  # no collective may outlive the process group
            self._work.wait()
            self._work = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def replicas_in_sync(module: nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (compares a sha256 of their bytes)."""
    if not _active():
        return True
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    device = next(module.parameters()).device
    lo = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64, device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(lo.item() == hi.item())
