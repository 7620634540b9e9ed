"""Peak memory of ``fixq quantize`` against the number of images, before and after streaming
(issue 14), on CPU.

    git worktree add /tmp/fixq-old 918aad5          # the code before streaming
    python benchmarks/memory_table.py --old /tmp/fixq-old/src [--shared ../shared] \
        [--lite0] [--cap-gb 9] [--big 2]

Each run is ``python -m fixq quantize`` in a child process, with ``PYTHONPATH`` set to the
old or the new ``src``; its memory is polled every 0.2 s from ``/proc``: the main process's
peak resident set (``VmHWM``, exact) and the peak of the whole process tree's summed
resident sets (``VmRSS``; an upper bound: pages shared after fork count in every process). A run
whose tree passes ``--cap-gb`` is stopped (the machine is shared) and reported as such.
Rows: CIFAR-10 ResNet-20 (256 calibration images, N evaluation images, batch 128) on the
shared test set and on a larger ImageFolder of symlinks to it (``--big`` copies), and with
``--lite0`` EfficientNet-Lite0 on the 1,000-image ImageNet sample (128 / 872, batch 32), and with
``--lite0-copies K`` also on a folder of that sample linked K times (128 / 1000 K - 128).
Writes benchmarks/results/memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ptq_table import cpu_name  # noqa: E402

NEW = str(Path(__file__).resolve().parents[1] / "src")


def _kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def measure(src: str, argv: list[str], cap_gb: float) -> dict:
    """Run ``python -m fixq`` + argv with PYTHONPATH=src; peak memory (GB), wall time, status.

    Only ``/proc/<pid>/status`` is polled (VmHWM, VmRSS): polling ``smaps_rollup`` (PSS) every
    0.2 s, as this script did before, raised the main process's own peak from 0.84-1.16 GB to
    2.0-2.3 GB on the same ResNet-20 command (3 of 3 runs against 4 of 4 without it), so it
    measured itself. The tree figure is the peak of the summed VmRSS of the process and its
    decoding workers: an upper bound (pages shared after fork are counted in every process)."""
    env = {**os.environ, "PYTHONPATH": src}
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "fixq", *argv], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    hwm = tree = 0
    status = "ok"
    while p.poll() is None:
        hwm = max(hwm, _kb(Path(f"/proc/{p.pid}/status"), "VmHWM:"))
        tot = sum(_kb(Path(f"/proc/{q}/status"), "VmRSS:") for q in _tree(p.pid))
        tree = max(tree, tot)
        if tot > cap_gb * 2 ** 20:
            p.kill()
            status = f"stopped at the {cap_gb:g} GB cap"
            break
        time.sleep(0.2)
    err = p.communicate()[1]
    if status == "ok" and p.returncode != 0:
        status = f"exit {p.returncode}: " + (err.strip().splitlines() or ["?"])[-1][:120]
    return {"hwm_gb": hwm / 2 ** 20, "tree_gb": tree / 2 ** 20, "wall_s": time.time() - t0, "status": status}


def big_folder(src: Path, copies: int, root: Path) -> Path:
    """An ImageFolder with every image of ``src`` linked ``copies`` times (distinct names)."""
    for c in sorted(d for d in src.iterdir() if d.is_dir()):
        (root / c.name).mkdir(parents=True, exist_ok=True)
        for f in c.iterdir():
            for k in range(copies):
                (root / c.name / f"{k}_{f.name}").symlink_to(f)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="src/ of the code before streaming (a git worktree of 918aad5); needed with "
                    "--which before")
    ap.add_argument("--new", default=NEW, help="src/ of the code of the *after* rows (default: this checkout)")
    ap.add_argument("--label", default="after", help="the code column of the *after* rows (e.g. a commit measured "
                    "with --new)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--lite0", action="store_true", help="also EfficientNet-Lite0, 128/872 (minutes on 2 cores)")
    ap.add_argument("--lite0-copies", type=int, default=0, help="with --lite0: also on a folder of the sample "
                    "linked this many times (20: 20,000 images; about an hour on 2 cores)")
    ap.add_argument("--no-cifar", action="store_true", help="skip the ResNet-20 rows (keep those measured before)")
    ap.add_argument("--cap-gb", type=float, default=9.0)
    ap.add_argument("--which", default="before,after", help="which code to run (rows of the other are kept)")
    ap.add_argument("--fresh", action="store_true", help="forget rows of earlier runs (measured another way)")
    ap.add_argument("--big", type=int, default=2, help="copies of the CIFAR test set in the large folder (0: none)")
    ap.add_argument("--sizes", default="1000,9744", help="CIFAR evaluation sizes on the test set")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.md"))
    args = ap.parse_args()
    if "before" in args.which.split(",") and not args.old:
        ap.error("--which before needs --old")
    sh = Path(args.shared)
    cifar = sh / "data" / "cifar10-test"
    w = sh / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
    rows = []
    codes = [(w_, s_) for w_, s_ in (("before", args.old), (args.label, args.new))
             if ("before" if w_ == "before" else "after") in args.which.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        def r20(data, n, which, src):
            argv = ["quantize", "--model", "cifar10-resnet20", "--weights", str(w), "--calib", str(cifar),
                    "--calib-size", "256", "--eval", str(data), "--eval-size", str(n), "--batch-size", "128",
                    "--quiet", "--out", f"{tmp}/o"]
            m = measure(src, argv, args.cap_gb)
            rows.append(["ResNet-20", f"{data.name}", n, which, m])
            print(rows[-1], flush=True)
        if not args.no_cifar:
            big = big_folder(cifar, args.big, Path(tmp) / f"cifar10-x{args.big}")
            for n in [int(v) for v in args.sizes.split(",")]:
                for which, src in codes:
                    r20(cifar, n, which, src)
            if args.big:
                for which, src in codes:
                    r20(big, 10000 * args.big, which, src)
        if args.lite0:
            im = sh / "data" / "imagenet-sample"
            folders = [im] + ([big_folder(im, args.lite0_copies, Path(tmp) / f"imagenet-sample-x{args.lite0_copies}")]
                              if args.lite0_copies else [])
            for data in folders:
                n = sum(1 for c in data.iterdir() for _ in c.iterdir()) - 128  # the rest of the calibration's folder
                for which, src in codes:
                    argv = ["quantize", "--model", "efficientnet-lite0", "--calib", str(data), "--calib-size", "128",
                            "--eval", str(data), "--coeff-mode", "3D", "--batch-size", "32", "--quiet", "--out",
                            f"{tmp}/o"]
                    m = measure(src, argv, args.cap_gb)
                    rows.append(["EfficientNet-Lite0", data.name, n, which, m])
                    print(rows[-1], flush=True)
    store = Path(args.out).with_suffix(".json")  # rows of earlier runs (e.g. --no-cifar --lite0 later)
    old_rows = json.loads(store.read_text()) if store.exists() and not args.fresh else []
    key = (lambda r: (r[0], r[1], r[2], r[3]))
    mine = {key(r) for r in rows}
    rows = [r for r in old_rows if tuple(key(r)) not in mine] + rows
    store.write_text(json.dumps(rows, indent=1))
    lines = ["# Peak memory vs number of images (issue 14: streaming)", "",
             "Command: `python benchmarks/memory_table.py --old <worktree of 918aad5>/src --cap-gb 9 --big 2 "
             "--sizes 2000,9744`, then the same with `--no-cifar --lite0` (rows of both runs; last: "
             f"`{' '.join(sys.argv[1:])}`)",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores (shared with other jobs), CPU only; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "`fixq quantize` (default formats: <8b,8b>, data range method mse: two calibration passes), "
             "256 (ResNet-20) / 128 (Lite0) calibration images; *before* = commit 918aad5 (whole image sets "
             "in memory, `--workers 0`), *after* = this branch (streamed, default `--workers` = CPUs). "
             "Main RSS = the fixq process's peak resident set (VmHWM); tree RSS = the peak of the summed "
             "resident sets of the process and its decoding workers (an upper bound: pages shared after "
             "fork count in each). Only /proc/<pid>/status is polled (polling smaps_rollup for PSS "
             "raised the main process's own peak by about 1 GB on ResNet-20). Wall times "
             "are side by side in one run on a shared machine.", "",
             "| model | eval folder | eval images | code | main peak RSS GB | tree peak RSS GB (sum) | wall s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for model, folder, n, which, m in rows:
        lines.append(f"| {model} | {folder} | {n} | {which} | {m['hwm_gb']:.2f} | {m['tree_gb']:.2f} | "
                     f"{m['wall_s']:.0f} | {m['status']} |")
    prev = Path(args.out).read_text() if Path(args.out).exists() else ""
    notes = prev[prev.find("\nNotes"):] if "\nNotes" in prev else ""  # hand-written notes are kept
    Path(args.out).write_text("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
