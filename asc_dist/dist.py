"""Everything that touches torch.distributed: environment, init/teardown, DDP wrapping, reductions.

The same code runs as one plain process (no process group) or under torchrun (RANK, LOCAL_RANK,
WORLD_SIZE in the environment): NCCL with one GPU per process when CUDA is present, gloo on CPU.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from asc_dist.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this fails (every group of a run)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S  # the process group's collective timeout

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


def _interfaces() -> list[str]:
    """This host's network interface names."""
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        try:
            return sorted(os.listdir("/sys/class/net"))
        except OSError:
            return []


def gloo_interface(env: Mapping[str, str], interfaces: Collection[str] | None = None
                   ) -> tuple[str | None, str | None]:
    """The interface(s) gloo should use, as ``GLOO_SOCKET_IFNAME`` takes them, and a note when
    the main group's choice cannot be carried over.

    Gloo (the CPU side group for stop signals, and the main group on CPU) binds to the address
    the host name resolves to unless ``GLOO_SOCKET_IFNAME`` is set; across nodes that is often
    loopback or a management NIC. In order: ``GLOO_SOCKET_IFNAME``; ``ASC_NET_IFNAME``;
    ``NCCL_SOCKET_IFNAME`` when it names exact interfaces (names that exist here, or NCCL's
    ``=name`` exact form). NCCL's prefix (``eth``) and exclusion (``^lo,docker``) patterns mean
    nothing to gloo: then no value, and a note saying what to set. ``interfaces``: this host's
    interface names (default: read from the system).
    """
    for key in ("GLOO_SOCKET_IFNAME", "ASC_NET_IFNAME"):
        if env.get(key, "").strip():
            return env[key].strip(), None
    nccl = env.get("NCCL_SOCKET_IFNAME", "").strip()
    exclude = nccl.startswith("^")
    exact = nccl.lstrip("^").startswith("=")
    names = [n.strip() for n in nccl.lstrip("^").lstrip("=").split(",") if n.strip()]
    if not names:
        return None, None
    here = list(_interfaces() if interfaces is None else interfaces)
    if not exclude and (exact or all(n in here for n in names)):
        return ",".join(names), None

    def matches(iface: str) -> bool:
        return any(iface == n if exact else iface.startswith(n) for n in names)

    chosen = [i for i in here if i != "lo" and matches(i) != exclude]  # what NCCL would use here
    kind = "an exclusion" if exclude else "a prefix"
    return None, (f"NCCL_SOCKET_IFNAME={nccl} is {kind} pattern, which gloo (the stop-signal group) "
                  f"cannot use, so gloo takes the interface the host name resolves to: set "
                  f"ASC_NET_IFNAME={chosen[0] if chosen else '<interface>'} to put it on NCCL's network"
                  + (f" (NCCL's pattern selects {','.join(chosen)} here)" if chosen else ""))


def pin_gloo_interface(environ: MutableMapping[str, str] = os.environ, *, multi_node: bool = True,
                       interfaces: Collection[str] | None = None) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME`` per :func:`gloo_interface` before any gloo group is created
    (gloo reads it when a group starts); log the note, on multi-node runs, where gloo's own
    choice matters. Returns the value gloo will use, None for its default."""
    iface, note = gloo_interface(environ, interfaces)
    if note and multi_node:
        log.warning(note)
    if iface:
        environ["GLOO_SOCKET_IFNAME"] = iface
    return iface


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
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
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        pin_gloo_interface(multi_node=local_world < world_size)
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
    return DistEnv(rank, local_rank, world_size, dev, timeout_s)


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


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place and return it (NaN or inf on every rank if on any)."""
    if not _active():
        return t
    return all_reduce_sum(t).div_(dist.get_world_size())


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
    step after the request reached any rank. The side group is gloo even under NCCL: it uses the
    interface :func:`init` pinned (:func:`pin_gloo_interface`) and the main group's timeout
    (gloo's own default would be 30 min).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, env: DistEnv) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

        self._group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=env.timeout_s))
                       if _active() else None)
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
