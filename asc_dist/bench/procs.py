"""Child processes of the GPU check: started in their own group, their output streamed as it is
produced, killed with everything below them when they pass their time.

:func:`run_bounded` runs a step (the runner's child) with its output in the step's log file;
:func:`run_child` runs a step's own children (the trainer, pytest) with their output copied line
by line into the step's output (that log), so a step killed at any moment shows where it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

LOG_TAIL = 3000  # characters of a step's log kept in results.json


def child_env(**extra: str) -> dict[str, str]:
    """Unbuffered output (a line reaches the log when it is printed, not at exit)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so a child that left its group is killed too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(p: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to ``p``'s process group and every process below it."""
    if p.poll() is not None:  # reaped: its pid may be another process's now; its group is not
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    victims = _descendants(p.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=5)
            if sig == signal.SIGTERM:
                time.sleep(0.2)  # grandchildren handling SIGTERM; SIGKILL whatever remains
        except subprocess.TimeoutExpired:
            pass


def run_bounded(name: str, budget_s: float, cmd: list[str], work: Path) -> dict:
    """Run ``cmd`` in its own process group with its output in ``work/logs/NAME.log``; kill the
    whole tree when it passes ``budget_s``. The record: status, seconds, log tail, and whatever
    the step wrote to ``work/records/NAME.json`` by then (a step writes each result as soon as
    it has it, so a step killed mid-way keeps what it measured)."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "records").mkdir(parents=True, exist_ok=True)
    log_path, rec_path = work / "logs" / f"{name}.log", work / "records" / f"{name}.json"
    rec_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=child_env())
        try:
            rc = p.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on success or when the check itself is stopped: nothing outlives a step
            kill_tree(p)
    try:
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    except ValueError:  # killed while writing is impossible (atomic), but be safe
        rec = {}
    if rc is None:
        rec.update(status="timed_out", why=f"passed its budget of {budget_s:g} s: killed")
    elif rc != 0 and rec.get("status", "ok") in ("ok", "running"):
        rec.update(status="failed", why=f"exited {rc}")
    elif rec.get("status") == "running":  # exited 0 without its final record
        rec.update(status="failed", why="exited without its final record")
    rec.setdefault("status", "ok")
    rec["seconds"], rec["budget_s"] = round(time.perf_counter() - t0, 1), budget_s
    rec["log_tail"] = log_path.read_bytes()[-LOG_TAIL:].decode(errors="replace")
    return rec


def run_child(cmd: list[str], timeout: float | None, *, on_line: Callable[[str, subprocess.Popen],
              None] | None = None, env: dict[str, str] | None = None,
              keep: int = 200) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group, copying each line of its output to this process's
    stdout as it comes (``on_line(line, process)`` sees it too); kill its tree after ``timeout``
    seconds. Returns (exit code, None when killed; its last ``keep`` lines)."""
    sys.stdout.flush()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                         errors="replace", env=env or child_env())
    tail: deque[str] = deque(maxlen=keep)

    def copy() -> None:
        for line in p.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            if on_line is not None:
                on_line(line, p)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill_tree(p)
    reader.join(timeout=5)
    return rc, list(tail)
