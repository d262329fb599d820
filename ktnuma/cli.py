"""Shared CLI helpers: logging to stderr, one-line errors with the contract's exit codes."""
from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ktnuma.errors import KtnumaError
from ktnuma.text import human, ranges  # noqa: F401  (re-exported for the CLI modules)


def setup_logging(prog: str, quiet: bool = False, verbose: int = 0) -> None:
    """Log records go to stderr as ``ktnuma <prog>: message`` lines (warnings by default)."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    env = os.environ.get("KTNUMA_LOG")
    if env and not quiet:
        level = getattr(logging, env.upper(), level)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"ktnuma {prog}: %(message)s"))
    root.addHandler(h)
    root.setLevel(level)


def fail(prog: str, err: BaseException) -> int:
    """Print the one-line error and return its exit code."""
    code = getattr(err, "exit_code", 1)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"ktnuma {prog}: error: {msg}", file=sys.stderr, flush=True)
    return code


def run(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a KtnumaError becomes one line on stderr and its exit code (no traceback)."""
    try:
        return main(argv)
    except KtnumaError as err:
        return fail(prog, err)
    except KeyboardInterrupt:
        print(f"ktnuma {prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as err:  # the environment refused: still one line, with the path and the reason
        where = f"{err.filename}: " if err.filename else ""
        print(f"ktnuma {prog}: error: {where}{err.strerror or err}", file=sys.stderr, flush=True)
        return 3 if err.errno == errno.ENOSPC else 2
