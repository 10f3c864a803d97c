"""The one builder of training command lines: torchrun (or a plain process) around a module.

Every launcher uses it: the shell scripts in launch/ and slurm/ through ``python -m
asc_dist.torchrun``, and Python code (table1, bench, gpu_check) through :func:`command`::

    python -m asc_dist.torchrun [--nproc N] [--standalone | --nnodes N --rdzv-endpoint H:P
        --rdzv-id ID [--rdzv-host true|false]] [--module asc_dist.train] [--dry-run] -- ARGS...

One process on one node runs as a plain ``python -m MODULE`` (the same code path; no agent).
Before starting anything it checks the trainer's arguments (config; on one node also the
shards, weights, W&B credentials and the run-dir lock: asc_dist.train.preflight), so a mistake
is reported as one line instead of torchrun's traceback of its failed children. Then it replaces
itself with the command (``exec``): signals sent to it reach torchrun, which passes them on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from asc_dist.cli import command as cli_command

TRAIN = "asc_dist.train"


def command(args: list[str] | tuple[str, ...] = (), *, nproc: int = 1, module: str = TRAIN,
            nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
            rdzv_host: bool | None = None, python: str | None = None) -> list[str]:
    """argv that runs ``python -m module args`` in ``nproc`` processes on each of ``nnodes``."""
    python = python or sys.executable
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc={nproc} and nnodes={nnodes} must be >= 1")
    if nproc == 1 and nnodes == 1:
        return [python, "-m", module, *args]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint or not rdzv_id:
            raise ValueError("multi-node runs need rdzv_endpoint (host:port) and rdzv_id")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-id={rdzv_id}",
                f"--rdzv-endpoint={rdzv_endpoint}", "--max-restarts=0"]
        if rdzv_host is not None:
            # The head node hosts the store explicitly: torch's own guess compares host names,
            # which fails where scheduler node names are not the machines' host names.
            cmd.append(f"--rdzv-conf=is_host={str(rdzv_host).lower()}")
    return [*cmd, "-m", module, *args]


def _bool(v: str) -> bool:
    if v.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {v!r}")
    return v.lower() == "true"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asc_dist.torchrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="processes per node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous")
    p.add_argument("--rdzv-id", default=None, help="the same id on every node of one job")
    p.add_argument("--rdzv-host", type=_bool, default=None,
                   help="true on the node that hosts the rendezvous store")
    p.add_argument("--module", default=TRAIN)
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's arguments")
    return p


@cli_command("asc_dist.torchrun")
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.module == TRAIN and not any(x in ("-h", "--help") for x in args):
        from asc_dist import config as config_lib

        cfg = config_lib.load(args, world_size=a.nproc * a.nnodes)  # ConfigError naming the key
        if a.nnodes == 1:  # other nodes may only see what rank 0's node set up (a live lock)
            from asc_dist.train import preflight

            preflight(cfg)
    cmd = command(args, nproc=a.nproc, module=a.module, nnodes=a.nnodes,
                  rdzv_endpoint=a.rdzv_endpoint, rdzv_id=a.rdzv_id, rdzv_host=a.rdzv_host)
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
