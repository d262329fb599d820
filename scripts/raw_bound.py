#!/usr/bin/env python3
"""The raw bound: the floor a loader cannot beat on this machine. Standard library only.

    python scripts/raw_bound.py --procs N SPEC.json [--shm-dir /dev/shm] [--chunk MiB] [--keep] [--sendfile]

SPEC.json: {"files": [path, ...], "ranges": [[file_index, offset, length], ...]} -- the model's
whole expert tensors. The ranges are concatenated and cut into N contiguous shares of equal
bytes; N child processes (this script with --child) each create a fresh shared-memory file of
its share's size, posix_fallocate it, mmap it and do nothing but large preadv's of its share into
it. Timed from before the first child starts to after the last one exits. Prints one JSON line:
{"procs", "bytes", "seconds", "gbps", "segments": [paths]}. The segments are removed unless --keep.
--sendfile: an additional floor (not the bound): the children copy with sendfile(2) into the
fallocated segment's fd instead of preadv into its mapping (the kernel-copy path ktnuma's workers use).
"""
import json
import mmap
import os
import subprocess
import sys
import time


def shares(ranges, n):
    """Cut the concatenated ranges into n contiguous shares of (almost) equal bytes."""
    total = sum(r[2] for r in ranges)
    bounds = [total * i // n for i in range(n + 1)]
    out = [[] for _ in range(n)]
    pos = 0
    for fi, off, length in ranges:
        lo, hi = pos, pos + length
        for i in range(n):
            a, b = max(lo, bounds[i]), min(hi, bounds[i + 1])
            if a < b:
                out[i].append((fi, off + a - lo, b - a))
        pos = hi
    return out


def child(spec_path, index, n, seg_path, chunk, use_sendfile=False):
    with open(spec_path) as f:
        spec = json.load(f)
    mine = shares(spec["ranges"], n)[index]
    size = sum(r[2] for r in mine)
    fd = os.open(seg_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(size, 1))
        os.posix_fallocate(fd, 0, max(size, 1))
        if use_sendfile:
            return _sendfile_share(spec, mine, fd, chunk)
        mm = mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)
    view = memoryview(mm)
    fds = {}
    dest = 0
    for fi, off, length in mine:
        src = fds.get(fi)
        if src is None:
            src = fds[fi] = os.open(spec["files"][fi], os.O_RDONLY)
        end = off + length
        while off < end:
            want = min(chunk, end - off)
            got = os.preadv(src, [view[dest:dest + want]], off)
            if got <= 0:
                raise SystemExit(f"{spec['files'][fi]}: unexpected end of file at {off}")
            off += got
            dest += got
    view.release()
    mm.close()
    for fd in fds.values():
        os.close(fd)
    return 0


def _sendfile_share(spec, mine, out, chunk):
    """Copy the share with sendfile into the segment fd (written at the fd's position)."""
    os.lseek(out, 0, os.SEEK_SET)
    fds = {}
    for fi, off, length in mine:
        src = fds.get(fi)
        if src is None:
            src = fds[fi] = os.open(spec["files"][fi], os.O_RDONLY)
        end = off + length
        while off < end:
            got = os.sendfile(out, src, off, min(chunk, end - off))
            if got <= 0:
                raise SystemExit(f"{spec['files'][fi]}: unexpected end of file at {off}")
            off += got
    for fd in fds.values():
        os.close(fd)
    return 0


def main(argv):
    args = list(argv)
    if args and args[0] == "--child":
        _, spec, index, n, seg, chunk, how = args
        return child(spec, int(index), int(n), seg, int(chunk), how == "sendfile")
    procs, shm_dir, chunk, keep, spec, how = 1, "/dev/shm", 64, False, None, "preadv"
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        if a == "--procs":
            procs, i = int(args[i + 1]), i + 1
        elif a == "--shm-dir":
            shm_dir, i = args[i + 1], i + 1
        elif a == "--chunk":
            chunk, i = int(args[i + 1]), i + 1
        elif a == "--keep":
            keep = True
        elif a == "--sendfile":
            how = "sendfile"
        else:
            spec = a
        i += 1
    if spec is None or procs < 1:
        print("usage: raw_bound.py --procs N SPEC.json", file=sys.stderr)
        return 2
    with open(spec) as f:
        total = sum(r[2] for r in json.load(f)["ranges"])
    tag = f"ktnuma.raw.{os.getpid()}"
    segs = [os.path.join(shm_dir, f"{tag}.{i}") for i in range(procs)]
    try:
        t0 = time.perf_counter()
        ps = [subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), "--child", spec, str(i),
                                str(procs), segs[i], str(chunk << 20), how]) for i in range(procs)]
        rcs = [p.wait() for p in ps]
        seconds = time.perf_counter() - t0
    finally:
        if not keep:
            for s in segs:
                try:
                    os.unlink(s)
                except FileNotFoundError:
                    pass
    if any(rcs):
        print(f"raw_bound: a child failed: exit codes {rcs}", file=sys.stderr)
        return 1
    print(json.dumps({"procs": procs, "how": how, "bytes": total, "seconds": round(seconds, 4),
                      "gbps": round(total / seconds / 1e9, 3), "segments": segs if keep else []}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
