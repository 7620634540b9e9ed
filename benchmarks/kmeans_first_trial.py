"""The first trial of ``fixq kmeans`` alone: every eligible layer at its smallest K, judged on
the tuning images by the search's own acceptance rule, then the run stops. It tells whether a
``fixq kmeans`` result measured before the first trial existed (session 17) still stands: when
that trial misses, the search after it is the earlier one, unchanged.

    python benchmarks/kmeans_first_trial.py --model cifar10-resnet20 [--shared ../shared] [-- extra fixq args]

Appends one row to ``benchmarks/results/kmeans_first_trial.md`` (command, machine, date, wall time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from search_table import MODELS, machine  # noqa: E402


class _Stop(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    a, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    from fixq.algorithms import search
    from fixq.app.commands_kmeans import cmd_kmeans
    from fixq.app.parser import build_parser
    weights, data, ncal = MODELS[a.model]
    shared = Path(a.shared)
    argv = ["kmeans", "--model", a.model, "--calib", str(shared / data), "--calib-size", str(ncal),
            "--eval", str(shared / data), "--device", "cpu", "--out", str(HERE / "out" / "first-trial"), "--quiet",
            *extra]
    if weights:
        argv[3:3] = ["--weights", str(shared / weights)]
    got, judge = {}, search.PlanBench.judge

    def first(self, logits, target):  # the search's first judge call is the first trial's
        ok, d = judge(self, logits, target)
        got.update(d, meets=ok)
        raise _Stop
    search.PlanBench.judge = first
    t0 = time.time()
    try:
        cmd_kmeans(build_parser().parse_args(argv))
    except _Stop:
        pass
    wall = time.time() - t0
    if not got:
        print("the search made no trial (a given K?)", file=sys.stderr)
        return 1
    row = (f"| {a.model} | `{' '.join(extra) or '(defaults)'}` | {got['drop']:+.2f} | {got['margin']:.2f} | "
           f"{got['bound']:.2f} | {'yes' if got['meets'] else 'no'} | {time.strftime('%Y-%m-%d')} | {wall:.0f} s |")
    res = HERE / "results" / "kmeans_first_trial.md"
    if not res.exists():
        res.write_text("### fixq kmeans: the first trial alone (every eligible layer at its smallest K)\n\n"
                       "Command: `python benchmarks/kmeans_first_trial.py --model M [-- fixq args]`; machine: "
                       f"{machine()}. Tuning-half drop vs float, margin (standard errors of the paired difference "
                       "to the all-base plan) and their sum against the target (default 2.0 points).\n\n"
                       "| model | fixq args | tuning drop | margin | drop + margin | meets | date | wall time |\n"
                       "|---|---|---|---|---|---|---|---|\n")
    with res.open("a") as f:
        f.write(row + "\n")
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
