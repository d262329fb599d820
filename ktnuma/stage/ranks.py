"""Whether this ``launch`` is a rank of a torchrun job, and launch's multi-host flags.

Light on purpose: launch imports it at every start, while the group itself (ktnuma.stage.distributed:
the rounds, the host map, torch) is imported only when :func:`in_torchrun` says so.
"""
from __future__ import annotations

import argparse
import logging
import os

from ktnuma.errors import BadInput

log = logging.getLogger("ktnuma.distributed")

MODE_ENV = "KTNUMA_DISTRIBUTED"  # auto (unset) | 1 | 0
ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
AGENT_MARKS = ("torch.distributed.run", "torchrun", "torch/distributed/run")
DEFAULT_TIMEOUT = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """launch's multi-host flags (they matter only under torchrun)."""
    g = p.add_argument_group("multi-host (under torchrun; rank and world size from its environment)")
    g.add_argument("--host-experts", metavar="PATH",
                   help="JSON map of each rank's contiguous expert range: a list in rank order (or an "
                        "object keyed by rank) of [first, count] or {\"experts\": [e, e+1, ...]}; "
                        "default: contiguous blocks, the remainder to the lowest ranks")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long ranks wait for each other (default {DEFAULT_TIMEOUT:g} s)")


def _parent_cmdline() -> str:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def in_torchrun(env: dict[str, str] | None = None) -> bool:
    """True when this launch is a rank of a torchrun job (or KTNUMA_DISTRIBUTED=1).

    Under torchrun (TORCHELASTIC_RUN_ID set) the parent must be the elastic agent itself: a
    process an engine's rank starts inherits the same variables and must not join its group."""
    env = os.environ if env is None else env
    mode = env.get(MODE_ENV, "").strip().lower()
    if mode in ("0", "no", "off", "false"):
        return False
    have = all(env.get(k) for k in ENV_KEYS)
    if mode in ("1", "yes", "on", "true"):
        if not have:
            raise BadInput(f"{MODE_ENV}=1 but {', '.join(k for k in ENV_KEYS if not env.get(k))} "
                           "not set; start launch with torchrun")
        return True
    if not have:
        return False
    if env.get("TORCHELASTIC_RUN_ID") and not any(m in _parent_cmdline() for m in AGENT_MARKS):
        log.info("torchrun environment inherited from another process: staging on this host only "
                 "(set %s=1 to join the group anyway)", MODE_ENV)
        return False
    return True
