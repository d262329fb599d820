"""Views over mapped segments, shared by `ktnuma.attach` (attachment.py) and `ktnuma.stream`.

dtypes of the numpy views (one piece as staged; the manifest's ``dtype``):

| manifest dtype         | numpy view                 | torch view             |
|------------------------|----------------------------|------------------------|
| u8 i8 i32 f16 f32      | uint8 int8 <i4 <f2 <f4      | same                   |
| bf16                   | '<u2' (the bf16 bits)      | torch.bfloat16         |
| f8_e4m3                | uint8 (the e4m3 bytes)     | torch.float8_e4m3fn    |
| gguf:<T>               | uint8 [rows, row_bytes]    | uint8                  |

GGUF pieces are raw blocks: the manifest's ``shape`` counts weights ([rows, cols]); the view's last
dim counts bytes (``cols / block * type_size``).

Records come from a manifest that ``manifest_check`` accepted (or from a fresh plan, for stream),
so every view and pointer lies inside its mapping: :meth:`SegmentViews.map` checks the segment's
size against the record that the checked bounds refer to.

Lifetime: views keep their mapping alive (numpy holds the mmap's exported buffer; torch views
are built with ``torch.from_numpy`` and hold the numpy array). ``close()`` unmaps every segment
no view still holds; a segment with live views stays mapped until the last view goes (never a
use-after-unmap).
"""
from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ktnuma.host import shm
from ktnuma.errors import BadInput, KtnumaError, Released, SegmentMismatch, SegmentMissing
from ktnuma.index.dtypes import numpy_view
from ktnuma.index.model import KINDS, PROJS

log = logging.getLogger(__name__)

# manifest dtype -> torch dtype the numpy view is reinterpreted as (same item size)
TORCH_VIEWS: dict[str, tuple[str, str]] = {"bf16": ("int16", "bfloat16"),
                                           "f8_e4m3": ("uint8", "float8_e4m3fn")}


@dataclass(frozen=True)
class ArrayRecord:
    """One manifest `arrays` record."""

    layer: int
    node: int
    proj: str
    kind: str
    segment: str
    offset: int
    first: int
    count: int
    stride: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    slice: tuple[int, int, int] | None

    @classmethod
    def from_json(cls, r: dict) -> "ArrayRecord":
        s = r.get("slice")
        first, count = r["experts"]
        return cls(int(r["layer"]), int(r["node"]), str(r["proj"]), str(r["kind"]), str(r["segment"]),
                   int(r["offset"]), int(first), int(count), int(r["stride"]), int(r["nbytes"]),
                   str(r["dtype"]), tuple(int(d) for d in r["shape"]),
                   None if s is None else (int(s["dim"]), int(s["start"]), int(s["stop"])))

    @property
    def np_dtype(self) -> str:
        if self.dtype.startswith("gguf:"):
            return "u1"
        try:
            return numpy_view(self.dtype)
        except KeyError:
            raise BadInput(f"staged array L{self.layer} n{self.node} {self.proj} {self.kind}: "
                           f"unknown dtype {self.dtype!r}") from None

    @property
    def np_shape(self) -> tuple[int, ...]:
        """Shape of one piece in view elements (GGUF: [rows, row_bytes])."""
        if self.dtype.startswith("gguf:"):
            rows = self.shape[0] if len(self.shape) > 1 else 1
            return (rows, self.nbytes // rows) if len(self.shape) > 1 else (self.nbytes,)
        return self.shape

    @property
    def experts(self) -> range:
        return range(self.first, self.first + self.count)


class _Segment:
    """One mapped segment. `base` is a uint8 view used for addresses (dropped before unmapping)."""

    def __init__(self, name: str, mm: mmap.mmap, size: int) -> None:
        import numpy as np

        self.name = name
        self.mm: mmap.mmap | None = mm
        self.size = size
        self.base = np.frombuffer(mm, dtype=np.uint8, count=size)
        self.address = int(self.base.ctypes.data)

    def close(self) -> bool:
        """Unmap if no view holds the mapping; True if unmapped (else it goes with its last view)."""
        self.base = None  # type: ignore[assignment]
        mm, self.mm = self.mm, None
        if mm is None:
            return True
        try:
            mm.close()
            return True
        except BufferError:  # live numpy/torch views: the mapping goes when the last one does
            log.debug("segment %s still has live views; it is unmapped when they go", self.name)
            return False


def map_segment(name: str, size: int, shm_dir: str | None, *, writable: bool = False,
                where: str = "") -> _Segment:
    """Open, check (size, owner) and map one segment. Raises SegmentMissing / SegmentMismatch."""
    try:
        fd = shm.open_segment(name, shm_dir, write=writable)
    except FileNotFoundError:
        raise SegmentMissing(f"{where}segment {name} does not exist in {shm.norm_dir(shm_dir)} "
                             "(released, cleaned up, or the machine rebooted); stage the model again") from None
    except PermissionError:
        raise SegmentMismatch(f"{where}segment {name}: permission denied (owned by another user?)") from None
    except shm.NotASegment as exc:
        raise SegmentMismatch(f"{where}segment {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise SegmentMismatch(f"{where}segment {name} is owned by uid {st.st_uid}, not by this user "
                                  f"(uid {os.getuid()})")
        if st.st_size != size:
            raise SegmentMismatch(f"{where}segment {name} has {st.st_size} bytes, the manifest records {size}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        os.close(fd)
    return _Segment(name, mm, size)


class SegmentViews:
    """Views over mapped segments described by array records (shared by Attached and stream)."""

    def __init__(self, records: Iterable[ArrayRecord], nodes: Sequence[int], *, fmt: str, split: str,
                 config: dict, shm_dir: str | None, writable: bool = False, where: str = "") -> None:
        self.format = fmt
        self.split = split
        self.config = dict(config)
        self.nodes: tuple[int, ...] = tuple(int(n) for n in nodes)
        self.shm_dir = shm_dir
        self.writable = writable
        self.where = where
        self._records: dict[tuple[int, str, str, int], ArrayRecord] = {}
        self._by_layer: dict[int, list[ArrayRecord]] = {}
        for r in records:
            self._records[(r.layer, r.proj, r.kind, r.node)] = r
            self._by_layer.setdefault(r.layer, []).append(r)
        self._segments: dict[str, _Segment] = {}
        self.closed = False

    # ------------------------------------------------------------------ metadata
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._by_layer))

    @property
    def num_experts(self) -> int:
        return int(self.config["num_experts"])

    def records(self, layer: int) -> list[ArrayRecord]:
        return list(self._by_layer.get(layer, ()))

    def record(self, layer: int, proj: str, kind: str, node: int) -> ArrayRecord:
        r = self._records.get((layer, proj, kind, node))
        if r is None:
            if proj not in PROJS or kind not in KINDS:
                raise BadInput(f"unknown array ({proj!r}, {kind!r}); projs {PROJS}, kinds {KINDS}")
            raise BadInput(f"{self.where}no staged array for layer {layer}, node {node}, {proj} {kind} "
                           f"(layers {list(self.layers)}, nodes {list(self.nodes)})")
        return r

    def has(self, layer: int, proj: str, kind: str, node: int | None = None) -> bool:
        nodes = self.nodes if node is None else (node,)
        return any((layer, proj, kind, n) in self._records for n in nodes)

    def layer(self, layer: int) -> "LayerView":
        if layer not in self._by_layer:
            raise BadInput(f"{self.where}layer {layer} is not staged (layers {list(self.layers)})")
        return LayerView(self, layer)

    # ------------------------------------------------------------------ mapping
    def map(self, name: str, size: int) -> None:
        if name not in self._segments:
            self._segments[name] = map_segment(name, size, self.shm_dir, writable=self.writable, where=self.where)

    def unmap(self, names: Iterable[str]) -> None:
        for name in names:
            seg = self._segments.pop(name, None)
            if seg is not None:
                seg.close()

    def close(self) -> None:
        """Unmap every segment no view still holds (the rest go with their last view)."""
        if self.closed:
            return
        self.closed = True
        self.unmap(list(self._segments))

    def _segment(self, r: ArrayRecord) -> _Segment:
        if self.closed:
            raise KtnumaError(f"{self.where}closed")
        seg = self._segments.get(r.segment)
        if seg is None:
            raise Released(f"{self.where}segment {r.segment} (layer {r.layer}) is not mapped (released)")
        return seg

    # ------------------------------------------------------------------ views
    def array(self, layer: int, proj: str, kind: str, node: int):
        """Stacked numpy view [count, *piece shape] of one node's (layer, proj, kind) array."""
        import numpy as np

        r = self.record(layer, proj, kind, node)
        seg = self._segment(r)
        mm = seg.mm
        assert mm is not None
        dt = np.dtype(r.np_dtype)
        n_items = r.count * r.stride // dt.itemsize
        a = np.frombuffer(mm, dtype=dt, count=n_items, offset=r.offset)
        return a.reshape((r.count, *r.np_shape))

    def tensor(self, layer: int, expert: int, proj: str, kind: str, node: int):
        """numpy view of expert `expert`'s piece on `node`."""
        r = self.record(layer, proj, kind, node)
        if expert not in r.experts:
            raise BadInput(f"{self.where}node {node} holds experts {r.first}..{r.first + r.count - 1} of "
                           f"layer {layer} {proj} {kind}, not expert {expert}")
        return self.array(layer, proj, kind, node)[expert - r.first]

    def torch(self, layer: int, proj: str, kind: str, node: int, expert: int | None = None):
        """torch view (no copy) of the stacked array, or of one expert's piece. bf16 comes out as
        torch.bfloat16, f8_e4m3 as torch.float8_e4m3fn, GGUF blocks as uint8."""
        import warnings

        import torch

        a = self.array(layer, proj, kind, node) if expert is None else self.tensor(layer, expert, proj, kind, node)
        r = self.record(layer, proj, kind, node)
        view = TORCH_VIEWS.get(r.dtype)
        if view is not None:
            a = a.view(view[0])
        with warnings.catch_warnings():  # read-only mappings: torch warns that writes are undefined
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        return t.view(getattr(torch, view[1])) if view is not None else t

    def pointers(self, layer: int, proj: str, kind: str) -> list[list[int]]:
        """[[address of expert e's piece for e in range(num_experts)] per node in topology order];
        0 where the node holds no piece of expert e."""
        E = self.num_experts
        rows: list[list[int]] = []
        found = False
        for node in self.nodes:
            row = [0] * E
            r = self._records.get((layer, proj, kind, node))
            if r is not None:
                found = True
                base = self._segment(r).address + r.offset
                for e in r.experts:
                    row[e] = base + (e - r.first) * r.stride
            rows.append(row)
        if not found:
            self.record(layer, proj, kind, self.nodes[0])  # raises the named error
        return rows


class LayerView:
    """One layer of a SegmentViews: the same methods without the layer argument."""

    def __init__(self, views: SegmentViews, layer: int) -> None:
        self.views = views
        self.layer = int(layer)

    @property
    def format(self) -> str:
        return self.views.format

    @property
    def split(self) -> str:
        return self.views.split

    @property
    def config(self) -> dict:
        return self.views.config

    @property
    def nodes(self) -> tuple[int, ...]:
        return self.views.nodes

    def records(self) -> list[ArrayRecord]:
        return self.views.records(self.layer)

    def record(self, proj: str, kind: str, node: int) -> ArrayRecord:
        return self.views.record(self.layer, proj, kind, node)

    def has(self, proj: str, kind: str, node: int | None = None) -> bool:
        return self.views.has(self.layer, proj, kind, node)

    def array(self, proj: str, kind: str, node: int):
        return self.views.array(self.layer, proj, kind, node)

    def tensor(self, expert: int, proj: str, kind: str, node: int | None = None):
        """Expert `expert`'s piece; `node` may be omitted when exactly one node holds it (ep)."""
        if node is None:
            holders = [n for n in self.nodes if (r := self.views._records.get((self.layer, proj, kind, n)))
                       is not None and expert in r.experts]
            if len(holders) != 1:
                raise BadInput(f"layer {self.layer} {proj} {kind}: expert {expert} is held by nodes {holders}; "
                               "name the node")
            node = holders[0]
        return self.views.tensor(self.layer, expert, proj, kind, node)

    def torch(self, proj: str, kind: str, node: int, expert: int | None = None):
        return self.views.torch(self.layer, proj, kind, node, expert)

    def pointers(self, proj: str, kind: str) -> list[list[int]]:
        return self.views.pointers(self.layer, proj, kind)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} layer {self.layer} {self.format} {self.split} nodes {list(self.nodes)}>"
