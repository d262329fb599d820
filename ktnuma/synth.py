"""``python -m ktnuma.synth``: entry point (the code is ktnuma.tools.synth, a development tool)."""
import logging
import sys

from ktnuma.tools.synth import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
