"""``python -m ktnuma.worker``: entry point of the staging worker (the code is ktnuma.stage.worker).

Started by the coordinator as ``python -S -m ktnuma.worker ...``; imports only the standard library
and ktnuma's host modules (never torch, gguf or safetensors).
"""
import os
import sys

from ktnuma.stage.worker import main

if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # no interpreter shutdown with the stdin thread still blocked in read()
