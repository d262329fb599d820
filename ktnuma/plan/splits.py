"""The `--split` table: split name -> its rule (plan.records.Split). Adding a split is one module
defining a Split (see tp.py, ep.py, tp_whole.py; build segments with plan.layout) plus one entry here."""
from __future__ import annotations

from ktnuma.errors import SplitError
from ktnuma.index.model import ModelIndex
from ktnuma.plan.ep import EP
from ktnuma.plan.records import Split
from ktnuma.plan.tp import TP
from ktnuma.plan.tp_whole import TP_WHOLE

SPLITS: dict[str, Split] = {s.name: s for s in (TP, EP, TP_WHOLE)}


def split_rule(split: str) -> Split:
    try:
        return SPLITS[split]
    except (KeyError, TypeError):
        raise SplitError(f"split={split!r}: expected one of {', '.join(SPLITS)}") from None


def check_split(index: ModelIndex, n_nodes: int, split: str) -> None:
    """Refuse a split the alignment table forbids, with the numbers and a way out (SplitError)."""
    rule = split_rule(split)
    if n_nodes < 1:
        raise SplitError(f"nodes={n_nodes}: need at least one node")
    rule.check(index, n_nodes)
