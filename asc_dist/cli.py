"""How every command ends: an expected failure is a few lines naming its cause and exit status 2;
only a bug shows a traceback. ``ASC_DEBUG=1`` shows the traceback of expected failures too.

    @cli.command("asc_dist.pack")
    def main(argv=None) -> int: ...
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable

from asc_dist.atomic import no_space
from asc_dist.errors import UserError

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
    print(f"{_rank_prefix()}{prog}: error: {msg}", file=sys.stderr, flush=True)
    return True


def command(prog: str) -> Callable:
    """Decorate a ``main(argv) -> int``: expected errors become a message and exit status 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                if debug():
                    raise
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except Exception as e:  # noqa: BLE001 - sorted into expected failures and bugs
                if debug() or not report(prog, e):
                    raise
                return EXIT_ERROR

        return guarded

    return wrap
