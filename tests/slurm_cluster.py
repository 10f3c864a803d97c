"""A real, throw-away SLURM cluster on this machine for the tests (Debian's slurm 22.05).

One slurmctld and one slurmd per node name, all on 127.0.0.1, every file in one temp dir:
two node names give a two-"node" cluster on one host, so ``sbatch --nodes=2`` runs the real
multi-node path (one task per node, one torchrun agent each). The node names must resolve, so
``127.0.0.1 <names>`` is appended to /etc/hosts when they do not (needs root).

Why these settings (measured on Debian 12's slurm 22.05): no systemd here, so the daemons are
started by hand and stopped by their pid files; auth/none + cred/none avoid munge; proctrack/linuxproc +
task/none need no cgroups; no accounting daemon; ports are picked free at start so a second
test run (or a real slurmctld on 6817) does not collide. Clients need SLURM_CONF: use
``cluster.env()`` for every subprocess.

    cluster = SlurmCluster.start(["asc-n1", "asc-n2"])
    job = cluster.sbatch(["--wrap", "hostname"])
    info = cluster.wait(job)        # polls scontrol (faster than sbatch --wait's backoff)
    cluster.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun"]
# A job in one of these states will not run again (REQUEUED/PENDING/COMPLETING are not final).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
}


SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # the daemons live here; a non-login PATH may lack it


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (used as the pytest skip reason)."""


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=os.environ.get("PATH", "") + os.pathsep + SBIN)


def ensure_installed() -> None:
    """The SLURM commands are here (launch/test.sh installs them as root; a fixture does not)."""
    missing = [c for c in COMMANDS if which(c) is None]
    if missing:
        raise SlurmUnavailable(
            f"slurm commands missing ({', '.join(missing)}): `bash launch/test.sh` installs "
            f"{' '.join(PACKAGES)} with apt-get when run as root"
        )


def ensure_hosts(names: list[str]) -> None:
    """Make the node names resolve to 127.0.0.1 (torchrun connects to the head node by name)."""
    unresolved = []
    for n in names:
        try:
            socket.gethostbyname(n)
        except OSError:
            unresolved.append(n)
    if not unresolved:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"node names {unresolved} do not resolve and /etc/hosts is not writable (not root)"
        )
    with open("/etc/hosts", "a", encoding="utf-8") as f:
        f.write(f"127.0.0.1 {' '.join(unresolved)}  # asc-dist test SLURM nodes\n")
    for n in unresolved:
        if socket.gethostbyname(n) != "127.0.0.1":
            raise SlurmUnavailable(
                f"added {n} to /etc/hosts but it still does not resolve to 127.0.0.1"
            )


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_resources() -> str:
    """``CPUs=.. Boards=.. ... RealMemory=..`` of this host, as slurmd itself measures it."""
    out = subprocess.run(
        [which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30
    ).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    fields = [
        f
        for f in line.split()[1:]
        if f.split("=")[0]
        in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    ]
    return " ".join(fields) or f"CPUs={os.cpu_count() or 1}"


class SlurmCluster:
    def __init__(self, root: Path, nodes: list[str]):
        self.root, self.nodes = Path(root), list(nodes)
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, Path] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(
        cls, nodes: list[str], root: str | Path | None = None, timeout: float = 60
    ) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("not root: slurmd must run as root to start jobs as their user")
        ensure_installed()
        ensure_hosts(nodes)
        # Short path: slurmstepd puts unix sockets in the spool dir (108-byte limit).
        root = Path(root) if root else Path(tempfile.mkdtemp(prefix="asc-slurm-"))
        cluster = cls(root, nodes)
        cluster._write_config()
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool-{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        res = _node_resources()
        lines = [
            "ClusterName=asctest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            # Look at pending jobs every second (default 60 s): a requeued job starts promptly.
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "JobRequeue=1",
            # A requeued job may start again after the credential lifetime (default 120 s).
            "AuthInfo=cred_expire=5",
            # Finished jobs stay visible to scontrol for a while: the tests read their exit codes.
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            f"StateSaveLocation={r}/state",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        lines += [
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} {res} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports, strict=True)
        ]
        nodes = ",".join(self.nodes)
        lines.append(f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def env(self, **extra: str) -> dict:
        e = dict(os.environ, SLURM_CONF=str(self.conf))
        e["PATH"] = e.get("PATH", "/usr/bin:/bin") + os.pathsep + SBIN
        for k in [k for k in e if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del e[k]  # never inherit a surrounding job's variables
        e.update(extra)
        return e

    def _run(
        self, cmd: list[str], timeout: float = 30, check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        p = subprocess.run(
            cmd,
            env=kw.pop("env", None) or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and p.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(map(str, cmd))}` failed (exit {p.returncode}): "
                f"{p.stdout.strip()} {p.stderr.strip()}"
            )
        return p

    def _start_daemons(self, timeout: float) -> None:
        self._run(["slurmctld", "-f", str(self.conf)])
        self.pids["slurmctld"] = self.root / "slurmctld.pid"
        for n in self.nodes:
            self._run(["slurmd", "-f", str(self.conf), "-N", n])
            self.pids[f"slurmd-{n}"] = self.root / f"slurmd-{n}.pid"
        end = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < end:
            p = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            states = dict(ln.split() for ln in p.stdout.splitlines() if len(ln.split()) == 2)
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(
            f"nodes not idle after {timeout:.0f} s (sinfo: {states}); logs:\n{self.logs()}"
        )

    def cancel_all(self, timeout: float = 15) -> None:
        """Cancel every job and wait until the controller has none left running or pending."""

        def queued() -> list[str]:
            return self._run(["squeue", "-h", "-o", "%A"], check=False, timeout=10).stdout.split()

        try:
            jobs = queued()
            if jobs:
                self._run(["scancel", *jobs], check=False, timeout=10)
                end = time.monotonic() + timeout
                while time.monotonic() < end and queued():
                    time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass

    def stop(self, timeout: float = 15) -> None:
        """Cancel leftover jobs, then stop every daemon by its pid file (never by name)."""
        if self.pids:
            self.cancel_all(
                timeout
            )  # job steps run under their own slurmstepd, which outlives slurmd
        for pidfile in reversed(list(self.pids.values())):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            end = time.monotonic() + timeout
            while time.monotonic() < end and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()

    def status(self) -> str:
        """Nodes and jobs as the controller sees them (for failure messages)."""
        out = []
        for cmd in (
            ["sinfo", "-N", "-o", "%N %T %E"],
            ["squeue", "-t", "all", "-o", "%i %j %T %r %M %N"],
        ):
            p = self._run(cmd, check=False, timeout=10)
            out.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        return "\n".join(out)

    def logs(self, tail: int = 40) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- jobs --------------------------------------------------------------------------------
    def sbatch(
        self, args: list[str], cwd: str | Path | None = None, env: dict | None = None
    ) -> int:
        p = self._run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or self.env())
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the controller has forgotten the job)."""
        p = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if p.returncode != 0:
            return {}
        # Values may hold spaces only in Command/WorkDir-like fields we do not read.
        return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", p.stdout))

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float = 300, poll: float = 0.25) -> dict[str, str]:
        """Poll until the job is in a final state; return its scontrol record."""
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not finished after {timeout:.0f} s: {info}\n{self.logs()}"
        )

    def wait_for_state(self, job_id: int, states: set[str], timeout: float = 120) -> dict[str, str]:
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} never reached {states}: {info}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our own child) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
