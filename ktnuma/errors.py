"""Every ktnuma exception, in one place. Each class says its CLI exit code.

Exit codes (the contract): 0 ok, 2 bad input or usage, 3 not enough memory/shm,
4 worker failure after retries, 130 interrupted while staging. Exit 1 is not a contract
outcome: it is what a bug (ours, or the calling engine's) exits with, as any uncaught Python
error would.

``str(err)`` is one line. Library messages speak in parameter terms (``nodes=8``,
``split=ep``), as a caller of ``ktnuma.stream(...)`` writes them; the command-line tools reword
them as flags (``--nodes 8``) in one place, :func:`ktnuma.cli.as_flags`.

This module imports nothing: the staging worker imports it at start-up.

Hierarchy::

    KtnumaError                      1  (base; never raised for a contract outcome)
    +- BadInput                      2  what the caller gave is wrong
    |  +- FormatError                   a file is malformed (file, tensor, reason)
    |  |  +- TruncatedFile, HeaderTooLarge, HeaderOutOfBounds, InvalidHeaderJSON, UnknownDtype,
    |  |     ShapeMismatch, OffsetsOutOfBounds, OverlappingTensors, UnsafeShardPath, BadMagic
    |  +- ModelError                    the model as a whole (+ UnsupportedQuantization, ConfigMismatch)
    |  +- SplitError, TopologyError, SourceTruncated, ManifestExists, StdoutClosed
    |  +- ManifestError                 (+ ManifestMalformed, ManifestOutOfBounds, ManifestNames,
    |  |                                   ManifestNotTrusted)
    |  +- AttachError                   (+ SegmentMissing, SegmentMismatch, SourceChanged)
    |  +- NodeNotFound                  (also a NumaError)
    +- HostError                     2  this machine's environment refuses (not the caller's input)
    |  +- RegistryError, NumaError
    +- NotEnoughMemory               3
    +- WorkerFailed                  4  (+ VerifyFailed, SegmentExists, LostContact)
    +- PeerFailed                 4|2|3 another rank's failure, with its code
    +- Interrupted                 130
    +- ProgrammingError              1  a bug: PlanInvalid (ours), Released (the caller's)
    ParentGone (plain Exception)        worker-internal control flow, never leaves the worker
    NotASegment (an OSError)         2  via the CLI's OSError rule
    JSONLimit (a ValueError)            internal: callers wrap it in a named error with the file
"""
from __future__ import annotations

import errno as _errno
import os as _os
from collections.abc import Iterable, Sequence


class KtnumaError(Exception):
    """Base class of every ktnuma refusal. Exit 1 (only when raised directly: subclasses say
    their contract code). ``str(err)`` is the one line the CLI prints after ``error:``."""

    exit_code = 1


# ============================================================== exit 2: bad input or usage
class BadInput(KtnumaError):
    """Bad model files, bad config, bad parameters or flags. Exit 2."""

    exit_code = 2


class FormatError(BadInput):
    """A file is malformed. Names the file, the tensor (if any) and the reason. Exit 2."""

    def __init__(self, file: str, reason: str, tensor: str | None = None) -> None:
        self.file = str(file)
        self.tensor = tensor
        self.reason = reason
        where = f"{self.file}: tensor {tensor!r}: " if tensor else f"{self.file}: "
        super().__init__(where + reason)


# --- one class per way a file can be malformed (the numbers are in the message); all exit 2 ---
class TruncatedFile(FormatError):
    """The file is cut short: shorter than its header length field, or its header/tensor data. Exit 2."""


class HeaderTooLarge(FormatError):
    """The declared header length exceeds the reader's bound. Exit 2."""


class HeaderOutOfBounds(FormatError):
    """The declared header runs past the end of the file. Exit 2."""


class InvalidHeaderJSON(FormatError):
    """A safetensors header, shard index or config.json is not the JSON the format requires (not
    JSON, not an object, an entry of the wrong type). Exit 2."""


class UnknownDtype(FormatError):
    """A tensor's dtype (or GGML type) is not one ktnuma knows. Exit 2."""


class ShapeMismatch(FormatError):
    """A tensor's byte length does not match its shape and dtype. Exit 2."""


class OffsetsOutOfBounds(FormatError):
    """A tensor's data offsets end before they begin or past the end of the file. Exit 2."""


class OverlappingTensors(FormatError):
    """Two tensors' byte ranges overlap. Exit 2."""


class UnsafeShardPath(FormatError):
    """A shard index names a path that is absolute, empty or leaves the model directory (``..``). Exit 2."""


class BadMagic(FormatError):
    """The file does not start with its format's magic bytes (e.g. ``GGUF``). Exit 2."""


# --- model-level problems ---
class ModelError(BadInput):
    """The model as a whole is not usable (missing experts, inconsistent shapes...). Exit 2."""


class UnsupportedQuantization(ModelError):
    """The checkpoint's quantization is one ktnuma refuses (e.g. asymmetric int4, desc_act GPTQ). Exit 2."""


class ConfigMismatch(ModelError):
    """config.json (or GGUF metadata) disagrees with the tensors' shapes. Exit 2."""


class SplitError(BadInput):
    """A split (``split``, ``nodes``) that the alignment table refuses; the message gives the
    numbers and a way out. Exit 2."""


class TopologyError(BadInput):
    """A topology (``nodes``, ``topology`` file, ``simulate``) that cannot be used. Exit 2."""


class ManifestError(BadInput):
    """A manifest that is missing, unreadable, of another version, lacks keys or names bad
    segments. Exit 2."""


# --- manifests (the one validation, ktnuma.stage.manifest_check; used by attach, release, stream, verify) ---
class ManifestMalformed(ManifestError):
    """Not a ktnuma manifest of this version: bad JSON, too large or too deep, a huge integer, a
    field missing or of the wrong type. Exit 2."""


class ManifestOutOfBounds(ManifestError):
    """A record points outside its segment, or at experts or nodes the manifest does not have
    (never a pointer outside a mapping). Exit 2."""


class ManifestNames(ManifestError):
    """A run id not of the generated form, or a segment name that is not exactly
    ``ktnuma.<run_id>.L<layer>.n<node>`` of its own record. Exit 2."""


class ManifestNotTrusted(ManifestError):
    """release: the manifest is not owned by the caller, is writable by group or others, or is not
    the one the run registry records for its run (``--force`` / ``force=True`` overrides). Exit 2."""


class ManifestExists(BadInput):
    """Publishing never replaces an existing manifest: another run published at that path. Exit 2."""


class StdoutClosed(BadInput):
    """launch could not write ``ready`` (stdout closed, its reader gone): the run was removed. Exit 2."""


class SourceTruncated(BadInput):
    """A worker read fewer bytes than the plan says: a model file was truncated or changed since
    it was indexed. Raised inside the worker; the coordinator reports it as bad input. Exit 2."""


class AttachError(BadInput):
    """The manifest cannot be attached: the message names the manifest and the reason. Exit 2."""


class SegmentMissing(AttachError):
    """A segment the manifest names does not exist (the run was released or cleaned up). Exit 2."""


class SegmentMismatch(AttachError):
    """A segment exists but is not the run's: another owner, wrong size, or unreadable. Exit 2."""


class SourceChanged(AttachError):
    """A model file recorded in the manifest is gone or changed (size, mtime) since staging. Exit 2."""


# ============================================================== exit 2: the host refuses
class HostError(KtnumaError):
    """This machine's environment cannot be used as it is (a directory that is not writable or
    not ours, libnuma missing, a NUMA call refused). Not a fault of the caller's input, but the
    same remedy: fix the setup and run again. The contract has one code for that. Exit 2, as for
    an OSError the CLI reports (ENOSPC aside, which is 3)."""

    exit_code = 2


class RegistryError(HostError):
    """The run registry directory cannot be created, is not owned by this uid, or cannot be made
    private (0700). Exit 2."""


class NumaError(HostError):
    """A NUMA call failed. Says which call, node, address range and errno. Exit 2 (inside a
    worker it is reported to the coordinator, which retries and then fails with exit 4)."""

    def __init__(self, call: str, reason: str, *, node: int | None = None,
                 addr: int | None = None, length: int | None = None, err: int | None = None) -> None:
        self.call = call
        self.node = node
        self.addr = addr
        self.length = length
        self.errno = err
        where = []
        if node is not None:
            where.append(f"node {node}")
        if addr is not None:
            where.append(f"range 0x{addr:x}-0x{addr + (length or 0):x} ({length} bytes)")
        if err:
            where.append(f"errno {err} {_errno.errorcode.get(err, '?')} ({_os.strerror(err)})")
        super().__init__(f"{call}: " + (", ".join(where) + ": " if where else "") + reason)


class NodeNotFound(NumaError, BadInput):
    """Binding to (or asking about) a NUMA node that this machine does not have. Exit 2."""


# ============================================================== exit 3: memory / shm
class NotEnoughMemory(KtnumaError):
    """A node's MemAvailable or the shm filesystem cannot hold what is asked (checked up front,
    or ENOSPC while reserving a segment). Exit 3."""

    exit_code = 3


# ============================================================== exit 4: worker failure
class WorkerFailed(KtnumaError):
    """A worker died or failed a job and the retries are used up. Exit 4."""

    exit_code = 4


class VerifyFailed(WorkerFailed):
    """Staged bytes differ from the source (or from the checksums recorded in the manifest). Exit 4."""


class SegmentExists(WorkerFailed):
    """A segment name of this run already existed (someone else's object, or a run-id collision):
    the run fails without touching it (it is never attached to, resized or unlinked). Exit 4."""

    def __init__(self, message: str, names: Iterable[str]) -> None:
        super().__init__(message)
        self.names = frozenset(names)


class LostContact(WorkerFailed):
    """A multi-host exchange did not complete: a rank died or hung. Exit 4."""


class PeerFailed(KtnumaError):
    """Another rank failed. Exit with that rank's code when it is 2 or 3 (its bad input or
    memory is ours too), else 4."""

    exit_code = 4

    def __init__(self, message: str, code: int = 4) -> None:
        super().__init__(message)
        self.exit_code = code if code in (2, 3) else 4


# ============================================================== exit 130: interrupted
class Interrupted(KtnumaError):
    """SIGINT/SIGTERM/SIGHUP arrived while staging; everything of the run was removed. Exit 130."""

    exit_code = 130


# ============================================================== exit 1: bugs
class ProgrammingError(KtnumaError):
    """A bug, not a contract outcome: in ktnuma (an invalid plan) or in the calling code (a view
    used after its layer was released). Exit 1."""


class PlanInvalid(ProgrammingError):
    """A plan that breaks an invariant (a planner bug, never user input). ``.problems`` lists
    every problem found. Exit 1."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:6])
        more = f"; ... (+{len(self.problems) - 6} more)" if len(self.problems) > 6 else ""
        super().__init__(f"plan invalid, {len(self.problems)} problem(s): {shown}{more}")


class Released(ProgrammingError):
    """A streamed layer's views were used after the stream moved past it (its segments are
    unlinked and unmapped). Exit 1."""


# ============================================================== worker-internal
class ParentGone(Exception):
    """The worker's stdin closed or a termination signal arrived: abandon the job, remove its
    unfinished segment, exit 0. Deliberately not a KtnumaError, so that no ``except KtnumaError``
    can swallow it; it never leaves the worker process."""


# ============================================================== not KtnumaErrors on purpose
class NotASegment(OSError):
    """Something other than a regular file (a symlink, FIFO or device) sits at a segment's name.
    An OSError (errno EINVAL) so that every OSError path handles it; a CLI that meets it prints
    one line and exits 2, as for any OSError but ENOSPC."""


class JSONLimit(ValueError):
    """JSON read from disk breaks a limit of ``ktnuma.index.bounded`` (depth, integer length,
    duplicate keys, size) or is not JSON. A ValueError like ``json``'s own; callers wrap it in
    their named error (``InvalidHeaderJSON``, ``ManifestError``...) with the file, so it never
    reaches a user by itself (if it did: exit 1, a bug)."""
