"""The one output channel: logging set up by every command, per rank, into the stderr of the
moment; expected errors as one line and exit 2."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from asc_dist import cli
from asc_dist.errors import ConfigError

log = logging.getLogger("asc_dist.test")


@cli.command("asc_dist.test")
def talk(argv: list[str]) -> int:
    log.info("info line")
    log.warning("about the run")
    log.warning("about this rank's data", extra=cli.EVERY_RANK)
    if argv:
        raise ConfigError(f"bad {argv[0]}")
    print("result")
    return 0


def run(monkeypatch, capsys, rank: int | None, *argv: str, level: str | None = None):
    for k in ("RANK", "WORLD_SIZE", "ASC_LOG_LEVEL"):
        monkeypatch.delenv(k, raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
    if level:
        monkeypatch.setenv("ASC_LOG_LEVEL", level)
    capsys.readouterr()
    rc = talk(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err.splitlines()


def test_one_process_logs_info_and_warnings_results_on_stdout(monkeypatch, capsys):
    rc, out, err = run(monkeypatch, capsys, None)
    assert rc == 0 and out == "result\n"  # only the result is on stdout
    assert err == ["info line", "warning: about the run", "warning: about this rank's data"]


def test_ranks_carry_their_rank_and_the_run_is_told_once(monkeypatch, capsys):
    assert run(monkeypatch, capsys, 0)[2] == [
        "[rank 0] info line", "[rank 0] warning: about the run",
        "[rank 0] warning: about this rank's data"]
    # rank 1: WARNING and up, and of those only its own; errors always
    rc, _, err = run(monkeypatch, capsys, 1, "key")
    assert rc == 2
    assert err == ["[rank 1] warning: about this rank's data", "[rank 1] asc_dist.test: error: bad key"]


def test_asc_log_level_overrides(monkeypatch, capsys):
    assert run(monkeypatch, capsys, 1, level="info")[2][0] == "[rank 1] info line"
    assert run(monkeypatch, capsys, None, level="ERROR")[2] == []


def test_setup_is_idempotent_and_follows_the_current_stderr(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("ASC_LOG_LEVEL", raising=False)
    for _ in range(3):
        cli.setup_logging()
    logger = logging.getLogger("asc_dist")
    assert sum(isinstance(h, cli._Stderr) for h in logger.handlers) == 1
    for _ in range(2):  # a new stderr each time, as pytest swaps it per test
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)
        log.info("hello")
        assert buf.getvalue() == "hello\n"


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("ASC_DEBUG", "1")
    with pytest.raises(ConfigError, match="bad x"):
        run(monkeypatch, capsys, None, "x")
