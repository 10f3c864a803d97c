"""How every command talks and ends.

Talk: one channel, ``logging`` under the ``asc_dist`` logger, set up once per process by
:func:`command` (idempotent; it writes to whatever ``sys.stderr`` is when a line is emitted, so
many commands run in one pytest process still log and capture correctly). On multi-rank runs each
line carries its rank; rank 0 logs at INFO, the others at WARNING; ``ASC_LOG_LEVEL`` overrides.
A warning about the run (not one rank's data) is shown by rank 0 only, so it appears once; errors
and warnings tagged ``extra=EVERY_RANK`` are shown by every rank that meets them (every line of
every rank at that level once ``ASC_LOG_LEVEL`` is set). ``print`` is kept for a
command's result on stdout, what a user pipes.

End: an expected failure is a few lines naming its cause and exit status 2; only a bug shows a
traceback. ``ASC_DEBUG=1`` shows the traceback of expected failures too.

    @cli.command("asc_dist.pack")
    def main(argv=None) -> int: ...
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable

from asc_dist.atomic import no_space
from asc_dist.errors import UserError

log = logging.getLogger("asc_dist")
EXIT_ERROR = 2  # an expected failure: bad input, config, data, environment
EXIT_STOPPED = 3  # training stopped early by a signal, checkpoint written: rerun to resume

# OSErrors on paths the user gave (missing, unreadable, read-only): their own words suffice.
_USER_OS_ERRORS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                   errno.EISDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT)


def debug() -> bool:
    return os.environ.get("ASC_DEBUG", "") not in ("", "0")


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


class _Stderr(logging.StreamHandler):
    """A handler that writes to the ``sys.stderr`` of the moment, not the one at setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # "warning: ..." as a compiler says it; a command's own error line names the command first
        bare = record.levelno < logging.WARNING or getattr(record, "bare", False)
        level = "" if bare else f"{record.levelname.lower()}: "
        return f"{_rank_prefix()}{level}{super().format(record)}"


# ``log.warning(..., extra=EVERY_RANK)``: a warning about this rank's own data or state, shown by
# whichever rank meets it. Untagged warnings are about the run, which every rank sees alike.
EVERY_RANK = {"every_rank": True}


def _once_per_run(record: logging.LogRecord) -> bool:
    # ASC_LOG_LEVEL set: the user asked to see the other ranks' lines too
    return (os.environ.get("RANK", "0") == "0" or record.levelno >= logging.ERROR
            or getattr(record, "every_rank", False) or bool(os.environ.get("ASC_LOG_LEVEL")))


def setup_logging() -> logging.Logger:
    """Configure this process's logging (again: only the level is refreshed). ``__main__`` too:
    under ``python -m asc_dist.x`` that module's ``getLogger(__name__)`` is named so."""
    default = "INFO" if os.environ.get("RANK", "0") == "0" else "WARNING"
    level = os.environ.get("ASC_LOG_LEVEL", "").upper() or default
    level = level if level in logging.getLevelNamesMapping() else default
    for name in ("asc_dist", "__main__"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Stderr) for h in logger.handlers):
            handler = _Stderr()
            handler.setFormatter(_Format())
            handler.addFilter(_once_per_run)
            logger.addHandler(handler)
        logger.setLevel(level)
    return logging.getLogger("asc_dist")


def explain(e: BaseException) -> str | None:
    """The message to print for an expected failure, or None for a bug."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, FileExistsError) and not e.filename:  # raised by us with a full message
        return str(e)
    if isinstance(e, OSError) and e.errno in _USER_OS_ERRORS:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(no_space(e.filename or "?"))
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return None


def report(prog: str, e: BaseException) -> bool:
    """Print ``e`` as ``prog: error: ...`` if it is expected; True when it was."""
    msg = explain(e)
    if msg is None:
        return False
    log.error(f"{prog}: error: {msg}", extra={"bare": True})
    return True


def command(prog: str) -> Callable:
    """Decorate a ``main(argv) -> int``: expected errors become a message and exit status 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            setup_logging()
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                if debug():
                    raise
                log.error(f"{prog}: interrupted", extra={"bare": True})
                return 130
            except Exception as e:  # noqa: BLE001 - sorted into expected failures and bugs
                if debug() or not report(prog, e):
                    raise
                return EXIT_ERROR

        return guarded

    return wrap
