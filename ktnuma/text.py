"""Plain-text helpers shared by the library and the CLI: byte counts and id ranges."""
from __future__ import annotations


def human(n: float) -> str:
    """Bytes in decimal units (GB = 1e9), like the GB/s figures."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def ranges(ids) -> str:
    """(0, 1, 2, 5) -> "0-2,5": the kernel's list format, also used for --layers."""
    out: list[str] = []
    ls = sorted(ids)
    i = 0
    while i < len(ls):
        j = i
        while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
            j += 1
        out.append(str(ls[i]) if i == j else f"{ls[i]}-{ls[j]}")
        i = j + 1
    return ",".join(out)
