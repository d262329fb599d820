"""The benchmark (a development tool, never imported by the runtime): ``python -m ktnuma.bench``.

cli.py (arguments, the run, medians), cases.py (the case table), children.py (what timed child
processes run: upstream, stream, attach, the peers), measure.py (time, peak memory, page cache),
models.py (the synth bench model), report.py (targets, tables), overhead.py (plan + spawn cost).
"""
from ktnuma.tools.bench.cli import main

__all__ = ["main"]
