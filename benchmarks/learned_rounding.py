"""Learned rounding and bias correction (issue #18) on <4b,8b> plans: plain nearest rounding
vs bias correction vs learned rounding (+ bias correction), 2D and 3D coefficients, on the
model's standard split (calibration images disjoint from the evaluation images).

    python benchmarks/learned_rounding.py --model cifar10-resnet20 [--iters 1000] [--eval-size 2000]

Writes benchmarks/results/learned_rounding.md (``--append`` adds a model's section) and
learned_rounding_<model>.json: top-1 error, drop vs float,
agreement with float, CPU wall time of the code decisions, beside the published anchors of
the issue (float scales, other models: not run here).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from dataclasses import replace

from fixq.app.common import make_config
from fixq.algorithms.learned import RoundingOptions, learn_rounding
from fixq.algorithms.pipeline import run_config
from fixq.analysis.report import markdown_table
from fixq.graph.ir import Conv

from ptq_table import setup_args, setup_session
from search_table import machine

PUBLISHED = [  # (tool, model, scales, float top-1, W4A8 top-1): from the issue; not run here
    ("AIMET (CLE + AdaRound)", "EfficientNet-Lite0 ImageNet", "float scales", 75.40, 74.46),
    ("MQBench AdaRound", "ResNet-18 ImageNet", "float scales", 71.06, 70.35),
    ("MQBench AdaRound", "MobileNetV2 ImageNet", "float scales", 72.68, 71.82),
    ("MQBench min/max rounding", "MobileNetV2 ImageNet", "float scales", 72.68, 24.76),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    setup_args(ap)
    ap.add_argument("--modes", default="2D,3D")
    ap.add_argument("--iters", type=int, default=1000, help="optimiser steps per layer")
    ap.add_argument("--variants", default="bc,learned+bc")
    ap.add_argument("--append", action="store_true", help="add this model's section to learned_rounding.md")
    ap.add_argument("--depthwise-bits", default=None,
                    help="coefficient bits of depthwise layers (groups == channels > 1); default: as the others")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    session, data = setup_session(args)
    n_calib, n_eval = session.images["n_calib"], session.images["n_eval"]
    rows, js = [], {"model": args.model, "n_calib": n_calib, "n_eval": n_eval, "iters": args.iters,
                    "float_top1_error": session.float_top1, "rows": []}
    rows.append(["float", "-", "-", session.float_top1, 0.0, 100.0, "-"])
    variants = {"bc": RoundingOptions(learned=False, bias_correction=True),
                "learned": RoundingOptions(iters=args.iters, bias_correction=False),
                "learned+bc": RoundingOptions(iters=args.iters, bias_correction=True)}
    for mode in args.modes.split(","):
        cfg = make_config("4", "8", mode, "4D")
        if args.depthwise_bits:
            dw = [n.name for n in session.graph.layers() if isinstance(n, Conv) and n.groups > 1
                  and n.groups == n.weight.shape[0]]
            cfg = replace(cfg, overrides=tuple((name, {"coeff_bits": args.depthwise_bits}) for name in dw))
        plain = run_config(session, cfg)
        todo = [("nearest (plain)", plain.plan, 0.0, None)]
        for v in args.variants.split(","):
            t1 = time.time()
            plan, lrows = learn_rounding(session.graph, plain.plan, session.calib_stream.tensor(), variants[v], session.device,
                                         show_progress=False)
            todo.append((v, plan, time.time() - t1, lrows))
        for label, plan, secs, lrows in todo:
            r = plain if lrows is None else run_config(session, cfg, plan=plan)
            e = r.result.top1_error
            kept = "-" if lrows is None else f"{sum(x['kept'] == 'learned' for x in lrows)}/{len(lrows)}"
            rows.append([f"<4b,8b> {mode}", label, kept, e, e - session.float_top1, r.result.agreement_top1,
                         "-" if lrows is None else f"{secs:.0f}"])
            js["rows"].append({"mode": mode, "codes": label, "top1_error": e, "drop": e - session.float_top1,
                               "agreement_top1": r.result.agreement_top1, "codes_seconds": secs,
                               "layers": lrows})
            print(rows[-1], flush=True)
    wall = time.time() - t0
    head = ["coefficients", "codes", "layers learned", "top-1 err %", "drop (points)", "agreement %",
            "codes wall s"]
    pub = markdown_table(["tool (published, not run here)", "model", "scales", "float top-1 %", "W4A8 top-1 %",
                          "drop"], [[a, b, c, f, q, f"{f - q:.2f}"] for a, b, c, f, q in PUBLISHED])
    md = (f"## {args.model}\n\n"
          f"`python benchmarks/learned_rounding.py --model {args.model} --iters {args.iters}"
          f"{' --eval-size ' + str(args.eval_size) if args.eval_size else ''}"
          f"{' --modes ' + args.modes if args.modes != '2D,3D' else ''}"
          f"{' --depthwise-bits ' + args.depthwise_bits if args.depthwise_bits else ''}"
          f"{' --device ' + args.device if args.device != 'cpu' else ''}`\n\n"
          f"{time.strftime('%Y-%m-%d')}, {machine()}, device {args.device}, wall time {wall / 60:.1f} min "
          f"in all. Calibration: {n_calib} images of `{data}`; evaluation: the other {n_eval} images (seed 0, "
          f"disjoint). Data: 8-bit, 4D, mse (fixq's defaults); coefficients 4-bit maxabs per kernel (3D) or per 2D "
          f"filter (2D){'; depthwise layers ' + args.depthwise_bits + '-bit' if args.depthwise_bits else ''}; rounding half_up. Learned rounding: {args.iters} Adam steps per layer, 1,024 sampled pixels per step, "
          "seed 0; a layer keeps nearest rounding when learned rounding does not lower its output error on the "
          "calibration images (\"layers learned\" counts the others). \"codes wall s\" is the time to decide "
          "the codes (learned rounding and/or bias correction), measured in this run.\n\n"
          + markdown_table(head, rows) +
          "\n\nPublished anchors quoted in issue #18 (float scales, other models and data: **published, not run "
          "here**; fixq uses power-of-two formats):\n\n" + pub + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "learned_rounding.md"
    title = "# Learned rounding and bias correction on <4b,8b> plans (issue #18)\n\n"
    prev = path.read_text() if args.append and path.exists() else title
    path.write_text(prev.rstrip("\n") + "\n\n" + md if args.append else title + md)
    js["wall_s"] = wall
    (out / f"learned_rounding_{args.model}.json").write_text(json.dumps(js, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()
