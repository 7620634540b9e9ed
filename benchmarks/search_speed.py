"""Search trial time side by side (issue 16): the same trial plans of ``fixq mixed``, measured
on the same tuning images by a PlanBench as before (no kept prefix, plain torch formula) and by
the default one (base reuse, kept prefix, compiled quantizer, channels-last), alternating,
in one process. Every trial's logits must be identical (checked); writes
``benchmarks/results/search_speed_<model>.md``.

    python benchmarks/search_speed.py --model cifar10-resnet20
    python benchmarks/search_speed.py --model efficientnet-lite0 --batch-size 64
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL_NAMES = ["cifar10-resnet20", "cifar10-resnet32", "efficientnet-lite0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar10-resnet20", choices=MODEL_NAMES)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--fs", default="1,0,0.35,0.2", help="mixed thresholds f of the trial plans")
    a = ap.parse_args()
    from fixq.algorithms.mixed import eligible_layers, filter_bits, filter_energies
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench, base_config
    from fixq.planning.plan import QuantConfig
    sys.path.insert(0, str(HERE))
    from search_table import MODELS, machine
    weights, data, ncal = MODELS[a.model]
    sh = Path(a.shared)
    t_all = time.time()
    s = open_session(a.model, str(sh / data), str(sh / data), weights=str(sh / weights) if weights else None,
                     calib_size=ncal, batch_size=a.batch_size, show_progress=False)
    cfg = base_config(QuantConfig(), 8)
    before = PlanBench(s, cfg, cache_mb=0, fast=False)
    after = PlanBench(s, cfg)
    names = eligible_layers(s.graph, "first,last")
    probe = s.calib_stream.subset(range(min(64, len(s.calib_stream))), batch_size=32)
    energies = filter_energies(s.graph, probe, names, s.device, False)
    rows = []
    for label, plan in [("all-base (require_base)", before.base_plan)] + [
            (f"f = {f:g}", before.plan(filter_bits=filter_bits(energies, f, 8, 4))) for f in map(float, a.fs.split(","))]:
        t = {}
        for name, bench in (("before", before), ("after", after)):
            t0 = time.time()
            t[name] = (bench.measure(plan), time.time() - t0)
        same = torch.equal(t["before"][0][2], t["after"][0][2])
        if not same:
            print(f"{label}: logits differ", file=sys.stderr)
            return 1
        rows.append((label, t["before"][1], t["after"][1]))
        print(f"{label}: before {t['before'][1]:.1f} s, after {t['after'][1]:.1f} s", flush=True)
    tb, ta = sum(r[1] for r in rows[1:]), sum(r[2] for r in rows[1:])
    cmd = "python benchmarks/search_speed.py " + " ".join(sys.argv[1:]).replace(str(sh), "../shared")
    md = [f"### Search trials side by side: {a.model}", "",
          f"Command: `{cmd}`  ",
          f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; "
          f"wall time {time.time() - t_all:.0f} s.", "",
          f"{before.n_tune} tuning images, batch {a.batch_size}; each trial plan measured by a PlanBench without "
          "a kept prefix (cache_mb=0) and with the plain torch formula (before) and by the default one (after), one after the other "
          "in this process; the logits of every trial are identical (checked).", "",
          "| trial plan | before s | after s | ratio |", "|---|---|---|---|"]
    md += [f"| {lb} | {b:.1f} | {af:.1f} | {f'{b / af:.1f}x' if min(b, af) >= 0.05 else '-'} |" for lb, b, af in rows]
    md += [f"| trials after the base (sum) | {tb:.1f} | {ta:.1f} | {tb / max(ta, 1e-9):.1f}x |", "",
           "The all-base row is the first measurement of the base plan in both; both benches then reuse "
           "that measurement for f = 0 (the same plan: no ratio). The after-bench's first trial with a "
           "change keeps the prefix tensors the later trials resume from.", ""]
    out = HERE / "results" / f"search_speed_{a.model}.md"
    out.write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
