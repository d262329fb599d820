"""Exception hierarchy. Every refusal is a KtnumaError carrying the CLI exit code of the contract.

Exit codes (design contract): 0 ok, 2 bad input or usage, 3 not enough memory/shm,
4 worker failure after retries, 130 interrupted while staging.
"""
from __future__ import annotations


class KtnumaError(Exception):
    """Base class: `str(err)` is the one line the CLI prints."""

    exit_code = 1


class BadInput(KtnumaError):
    """Bad model files, bad config, bad flags: exit 2."""

    exit_code = 2


class FormatError(BadInput):
    """A file is malformed. Names the file, the tensor (if any) and the reason."""

    def __init__(self, file: str, reason: str, tensor: str | None = None) -> None:
        self.file = str(file)
        self.tensor = tensor
        self.reason = reason
        where = f"{self.file}: tensor {tensor!r}: " if tensor else f"{self.file}: "
        super().__init__(where + reason)


# --- safetensors header problems, one class each (numbers in the message) ---
class TruncatedFile(FormatError):
    pass


class HeaderTooLarge(FormatError):
    pass


class HeaderOutOfBounds(FormatError):
    pass


class InvalidHeaderJSON(FormatError):
    pass


class UnknownDtype(FormatError):
    pass


class ShapeMismatch(FormatError):
    pass


class OffsetsOutOfBounds(FormatError):
    pass


class OverlappingTensors(FormatError):
    pass


class UnsafeShardPath(FormatError):
    pass


class BadMagic(FormatError):
    pass


# --- model-level problems ---
class ModelError(BadInput):
    """The model directory as a whole is not usable (missing experts, inconsistent shapes...)."""


class UnsupportedQuantization(ModelError):
    pass


class ConfigMismatch(ModelError):
    pass


class SplitError(BadInput):
    """A split that the alignment table refuses (numbers and a way out in the message)."""


class TopologyError(BadInput):
    pass


class NotEnoughMemory(KtnumaError):
    exit_code = 3


class WorkerFailed(KtnumaError):
    exit_code = 4


class Interrupted(KtnumaError):
    exit_code = 130
