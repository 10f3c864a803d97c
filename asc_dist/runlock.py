"""One run per run dir: an exclusive lock that names its holder and outlives no dead process.

Rank 0 holds ``<run_dir>/.lock`` for the run's lifetime; every rank learns the outcome before
doing any work (asc_dist.train). A second launch on the same dir (a double-submitted sbatch, a
second terminal) stops with a message naming the holder: host, pid, SLURM job, start time.

Works on the shared file systems clusters use, without flock: the lock appears by ``link()``
of a complete temporary file, which is atomic on local file systems and NFS alike and fails if
the lock exists. The holder touches the file every ``HEARTBEAT_S`` seconds. A lock is stale,
and is taken over, when its holder

* ran on this host and its process is gone (or the pid now belongs to another process);
* was an earlier incarnation of this SLURM job (a requeue: same job id, other restart count);
* ran elsewhere and its heartbeat is older than ``ASC_LOCK_TIMEOUT`` seconds (default 300).

So a requeue or a rerun after a crash never needs a manual cleanup. Removing a stale lock
happens under a short-lived breaker lock (``.lock.break``, also made by ``link()``), and only
after reading the lock again: two contenders can never both judge a lock stale and one of them
remove the other's fresh lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from asc_dist.errors import RunLockedError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = float(os.environ.get("ASC_LOCK_HEARTBEAT", "30"))


def _stale_after() -> float:
    return float(os.environ.get("ASC_LOCK_TIMEOUT", "300"))


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the original), if readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    token: str
    proc_start: str | None = None
    job_id: str | None = None
    restart: str | None = None

    @classmethod
    def me(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                   token=uuid.uuid4().hex, proc_start=_proc_start(os.getpid()),
                   job_id=os.environ.get("SLURM_JOB_ID"),
                   restart=os.environ.get("SLURM_RESTART_COUNT", "0") if "SLURM_JOB_ID" in os.environ
                   else None)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, started {when}"

    def stale_reason(self, heartbeat_age: float) -> str | None:
        """Why this holder can no longer be running, or None if it may be."""
        me = Holder.me()
        if self.job_id and self.job_id == me.job_id and self.restart != me.restart:
            return f"an earlier run of SLURM job {self.job_id} (requeued)"
        if self.host == me.host:
            if not _alive(self.pid):
                return f"process {self.pid} is gone"
            if self.proc_start and _proc_start(self.pid) not in (None, self.proc_start):
                return f"pid {self.pid} now belongs to another process"
            return None
        if heartbeat_age > _stale_after():
            return f"no heartbeat for {heartbeat_age:.0f} s (ASC_LOCK_TIMEOUT={_stale_after():g})"
        return None


class RunLock:
    """``lock = RunLock(run_dir); lock.acquire(); ...; lock.release()`` (or ``with``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def read(self) -> tuple[Holder | None, float]:
        """(holder, seconds since its last heartbeat); (None, inf) for a damaged lock file;
        (None, 0) when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), age
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError, TypeError):  # damaged: a lock always appears complete
            return None, float("inf")

    def check(self) -> None:
        """Raise RunLockedError if a live run holds the dir (without taking the lock)."""
        holder, age = self.read()
        if holder is not None and holder.stale_reason(age) is None:
            raise self._locked(holder)

    def _locked(self, holder: Holder) -> RunLockedError:
        return RunLockedError(
            f"run dir {self.run_dir} is in use by another run ({holder.describe()}; lock file "
            f"{self.path}). Wait for it to finish or stop it, or give this run another name= or "
            f"run_dir=. A lock left by a dead process is taken over automatically.")

    def acquire(self, attempts: int = 20) -> None:
        me = Holder.me()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".lock.{me.token}"
        tmp.write_text(json.dumps(asdict(me)))
        try:
            for _ in range(attempts):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._take_over_if_stale(tmp)
                    continue
                self.holder = me
                self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
                self._beat.start()
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise RunLockedError(f"cannot take the lock {self.path} (contended); retry")

    def _take_over_if_stale(self, tmp: Path) -> None:
        holder, age = self.read()
        if holder is None and age == 0.0:  # released meanwhile: try again
            return
        reason = holder.stale_reason(age) if holder else "an unreadable lock file"
        if reason is None:
            raise self._locked(holder)
        breaker = self.path.with_name(".lock.break")
        try:
            os.link(tmp, breaker)
        except FileExistsError:  # another contender is breaking it: look again shortly
            try:
                if time.time() - breaker.stat().st_mtime > 60:  # its breaker died meanwhile
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            again, _ = self.read()  # under the breaker: is it still the lock judged stale?
            if (again.token if again else None) == (holder.token if holder else None):
                self.path.unlink(missing_ok=True)
                who = holder.describe() if holder else "unknown holder"
                log.warning("run dir %s: took over a stale lock (%s: %s)", self.run_dir, who, reason)
        finally:
            breaker.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
                ours = json.loads(self.path.read_text()).get("token") == self.holder.token
            except (OSError, ValueError):
                ours = False
            if not ours and not warned:
                warned = True
                log.warning("lost the run-dir lock %s (removed or taken over); another run may "
                            "now write to %s", self.path, self.run_dir)

    def release(self) -> None:
        if self.holder is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder, _ = self.read()
        if holder is not None and holder.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
