"""`python -m ktnuma.tools.synth`."""
import logging

from ktnuma.tools.synth.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
