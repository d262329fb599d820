"""``python -m ktnuma.bench``: entry point (the code is ktnuma.tools.bench, a development tool)."""
import sys

from ktnuma.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
