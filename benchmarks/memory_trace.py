"""Where a ``fixq`` command's memory peaks: runs the command in this process while a thread
samples ``/proc/self/status`` (VmRSS only: polling smaps_rollup would raise the peak itself),
glibc's ``mallinfo2`` (bytes in use, freed but kept in the heap, mmapped) and the main
thread's innermost fixq frames every 0.05 s (issue 14).

    PYTHONPATH=src python benchmarks/memory_trace.py --json /tmp/t.json -- quantize \
        --model efficientnet-lite0 --calib DIR --calib-size 32 --eval DIR --eval-size 64 --batch-size 32

Prints VmHWM, the highest samples with their stacks and the peak per 10 s; ``--json`` keeps
every sample ``(t, VmRSS kB, VmHWM kB, frames + [(in use, free in heap, mmapped) kB])``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
import time
import traceback


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_kb():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return lambda: None

    def read():
        m = libc.mallinfo2()
        return ((m.uordblks + m.hblkhd) >> 10, m.fordblks >> 10, m.hblkhd >> 10)
    return read


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--every", type=float, default=0.05, help="seconds between samples")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the fixq command line")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    main_id, samples, stop = threading.get_ident(), [], threading.Event()
    minfo = _malloc_kb()

    def sample():
        while not stop.is_set():
            r = _status()
            st = traceback.extract_stack(sys._current_frames().get(main_id))
            frames = [f"{s.filename.split('fixq/')[-1]}:{s.name}:{s.lineno}" for s in st if "fixq" in s.filename]
            samples.append((time.time(), r["VmRSS"], r["VmHWM"], frames[-4:] + [minfo()]))
            time.sleep(args.every)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    from fixq.app.cli import main as fixq_main
    t0 = time.time()
    try:
        rc = fixq_main(argv)
    finally:
        stop.set()
        th.join()
    print(f"VmHWM {_status()['VmHWM'] / 2 ** 20:.3f} GB, {time.time() - t0:.0f} s, exit {rc}", file=sys.stderr)
    for t, v, _, w in sorted(samples, key=lambda s: -s[1])[:8]:
        print(f"{v / 2 ** 20:.3f} GB t={t - t0:.0f}s malloc(in use, free, mmap kB)={w[-1]}  "
              + " <- ".join(reversed(w[:-1])), file=sys.stderr)
    peaks: dict[int, tuple] = {}
    for t, v, _, w in samples:
        k = int((t - t0) // 10)
        if k not in peaks or v > peaks[k][0]:
            peaks[k] = (v, w)
    for k, (v, w) in sorted(peaks.items()):
        print(f"t={10 * k:5d}s peak {v / 2 ** 20:.3f} GB {w[-1]} {' <- '.join(reversed(w[-3:-1]))}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([(t - t0, v, h, w) for t, v, h, w in samples], f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
