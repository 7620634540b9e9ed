"""Ties at the top of 8-bit logits: a saved search plan and the all-8-bit plan, scored with the
plan's own output format and with wider ones (same data otherwise), on the search's tuning and
test halves (the split of ``fixq mixed`` / ``fixq kmeans``, seed 0). Top-1 is argmax's (the
first largest logit); "ties" counts images with two or more classes at the largest logit.

    PYTHONPATH=src python benchmarks/output_ties.py benchmarks/results/kmeans_efficientnet-lite0-s17.md \\
        benchmarks/out/kmeans-efficientnet-lite0-s17 --shared ../shared

The first argument is a search's result file (its command line rebuilds the session), the second
the folder with its ``plan.json``.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result_md")
    ap.add_argument("run_dir")
    ap.add_argument("--shared", default="../shared")
    a = ap.parse_args()
    from fixq.algorithms.search import PlanBench, base_config
    from fixq.app.common import search_config, session_for
    from fixq.app.parser import build_parser
    from fixq.numerics.formats import code_limits
    from fixq.planning.plan_io import load_plan
    t0 = time.time()
    cmd = re.search(r"Command: `python -m fixq (.*?)`", Path(a.result_md).read_text()).group(1)
    argv = cmd.replace("../shared", a.shared).split()
    argv[argv.index("--out") + 1] = "/tmp/fixq-output-ties"
    args = build_parser().parse_args(argv)
    session = session_for(args)
    bench = PlanBench(session, base_config(search_config(args), 8), None, 0, 1.0)
    plan = load_plan(Path(a.run_dir) / "plan.json")
    out = session.graph.output
    f = plan.tensors[out]

    def fmt(p, T, dF):
        g = p.tensors[out]
        return replace(p, tensors={**p.tensors, out: replace(g, T=T, F=tuple(x + dF for x in g.F))})
    tops = session.float_logits.max(1).values
    big = code_limits(f.word)[1] * 2.0 ** -f.F[0]  # the planned format's largest value
    print(f"### {Path(a.result_md).name}: output `{out}` at Q({f.T},{f.F[0]})\n")
    print(f"Plan: `{Path(a.run_dir) / 'plan.json'}`; largest float logit over the {len(tops)} evaluation images "
          f"{float(tops.max()):.2f}; {int((tops >= big).sum())} images have a top float logit at or above {big:g}.\n")
    print("| plan | output format | tune top-1 err % | tune ties | test top-1 err % | test ties |")
    print("|---|---|---|---|---|---|")
    for name, p in (("saved", plan), ("all 8-bit", bench.base_plan)):
        pf = p.tensors[out]  # each plan's own output format
        # twice the range at 8 bits; 8 more fractional bits; 8 more bits split 5 fraction / 3 range
        for lab, q in ((f"Q({pf.T},{pf.F[0]}) (planned)", p), (f"Q(8,{pf.F[0] - 1})", fmt(p, 8, -1)),
                       (f"Q(16,{pf.F[0] + 8})", fmt(p, 16, 8)), (f"Q(16,{pf.F[0] + 5})", fmt(p, 16, 5))):
            cells = []
            for part in ("tune", "test"):
                e1, _, lg = bench.measure(q, part)  # top-1 as the reports count it (ties: first class)
                mx = lg.max(1, keepdim=True).values
                cells += [f"{e1:.2f}", f"{int(((lg == mx).sum(1) > 1).sum())} of {len(lg)}"]
            print(f"| {name} | {lab} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nWall time {time.time() - t0:.0f} s; {time.strftime('%Y-%m-%d')}; CPU.\n")


if __name__ == "__main__":
    main()
