"""Shared CLI helpers: logging to stderr, one-line errors with the contract's exit codes, and the
one place where library wording becomes command-line wording.

The library speaks in parameter terms, as a caller of ``ktnuma.stream(...)`` writes them
(``nodes=8``, ``split=ep``, ``shm_dir=DIR``); :func:`as_flags` rewords those as the flags a
command-line user types (``--nodes 8``, ``--split ep``, ``--shm-dir DIR``). Every error line and
every log line of a CLI entry point goes through it; nothing else rewords.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from ktnuma.errors import KtnumaError
from ktnuma.text import human, ranges  # noqa: F401  (re-exported for the CLI modules)


# library parameter -> CLI flag. A message names a parameter as `name=value` (`nodes=8`) or,
# without a value, as `name=` followed by a placeholder (`shm_dir=DIR`).
FLAGS: dict[str, str] = {
    "nodes": "--nodes", "split": "--split", "layers": "--layers", "format": "--format",
    "topology": "--topology", "shm_dir": "--shm-dir", "manifest": "--manifest", "io": "--io",
    "retries": "--retries", "host_experts": "--host-experts", "dist_timeout": "--dist-timeout",
}
# boolean parameters whose value is spelled by a switch
SWITCHES: dict[str, str] = {"simulate=False": "--no-simulate", "verify=True": "--verify", "force=True": "--force"}
_SWITCH = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(k) for k in SWITCHES) + r")(?![\w])")
_PARAM = re.compile(r"(?<![\w.-])(" + "|".join(FLAGS) + r")=(?!=)")


def as_flags(message: str) -> str:
    """Reword a library message for a command-line user: ``nodes=8`` -> ``--nodes 8``,
    ``simulate=False`` -> ``--no-simulate`` (the tables above)."""
    message = _SWITCH.sub(lambda m: SWITCHES[m.group(1)], message)
    return _PARAM.sub(lambda m: FLAGS[m.group(1)] + " ", message)


class _FlagWording(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return as_flags(super().format(record))


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
    h.setFormatter(_FlagWording(f"ktnuma {prog}: %(message)s"))
    root.addHandler(h)
    root.setLevel(level)


def fail(prog: str, err: BaseException) -> int:
    """Print the one-line error and return its exit code."""
    code = getattr(err, "exit_code", 1)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"ktnuma {prog}: error: {as_flags(msg)}", file=sys.stderr, flush=True)
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
