"""The paper's choices (``--paper``) beside fixq's defaults, in the shape of the paper's
Tables 2 and 5, on one calibration and one evaluation split (issue #20).

    python benchmarks/paper_switch.py --model cifar10-resnet20 [--eval-size N] [--append]

Rows per setting (default / --paper): <8b,8b> with 4D, 3D, 2D coefficients (Table 2's
modes; Table 5's 4D and 3D rows), <4b,8b> 3D and 2D; then the fully connected rule
(fc_mode auto vs 4D, paper §3) with each setting's other choices. Writes (or appends to)
benchmarks/results/paper_switch.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ptq_table import setup_args, setup_session  # noqa: E402
from search_table import machine  # noqa: E402

from fixq.app.common import make_config  # noqa: E402
from fixq.analysis.complexity import analyze  # noqa: E402
from fixq.app.paper import apply_paper  # noqa: E402
from fixq.algorithms.pipeline import run_config  # noqa: E402
from fixq.analysis.report import markdown_table  # noqa: E402


def setting(paper: bool, **kw):
    """The CLI's config for ``quantize`` with (or without) ``--paper``; ``kw`` explicit options."""
    a = argparse.Namespace(method=None, data_method=None, data_sign="auto", rounding="half_up", acc_bits=32,
                           acc_overflow="saturate", bias_bits=8, fc_mode="auto", coeff_bits="8", data_bits="8",
                           coeff_mode="3D", data_mode="4D")
    for k, v in kw.items():
        setattr(a, k, v)
    if paper:
        apply_paper(a, "quantize", set(kw))
    return make_config(a.coeff_bits, a.data_bits, a.coeff_mode, a.data_mode, a.method, a.bias_bits, a.acc_bits,
                       a.acc_overflow, a.rounding, data_method=a.data_method, data_sign=a.data_sign,
                       fc_mode=a.fc_mode)


def main() -> None:
    ap = argparse.ArgumentParser()
    setup_args(ap)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    if args.device == "cpu":
        torch.set_num_threads(2)
    session, data = setup_session(args)
    grid = [("8", "4D"), ("8", "3D"), ("8", "2D"), ("4", "3D"), ("4", "2D")]
    rows = []
    for paper in (False, True):
        name = "--paper" if paper else "default"
        for cb, cm in grid:
            r = run_config(session, setting(paper, coeff_bits=cb, coeff_mode=cm))
            d = r.plan.config.default
            rows.append([name, f"<{cb}b,8b>", f"{cm}/4D", d.fc_mode, f"{d.effective_data_method}+{d.data_sign}",
                         r.result.top1_error, r.result.top5_error, r.result.agreement_top1,
                         analyze(session.graph, r.plan).rel_complexity_mmacs, round(r.seconds, 1)])
            print(rows[-1], flush=True)
        other = "4D" if not paper else "auto"  # the FC rule flipped, everything else as the setting
        r = run_config(session, setting(paper, coeff_bits="8", coeff_mode="3D", fc_mode=other))
        d = r.plan.config.default
        rows.append([name + f" + --fc-mode {other}", "<8b,8b>", "3D/4D", d.fc_mode,
                     f"{d.effective_data_method}+{d.data_sign}", r.result.top1_error, r.result.top5_error,
                     r.result.agreement_top1, analyze(session.graph, r.plan).rel_complexity_mmacs,
                     round(r.seconds, 1)])
        print(rows[-1], flush=True)
    table = markdown_table(["setting", "<coeff,data>", "mode (coeff/data)", "FC", "data range", "top-1 err %",
                            "top-5 err %", "agreement %", "complexity [M MACs <8b,8b>]", "wall s"],
                           [["float", "<flp,flp>", "-", "-", "-", session.float_top1, session.float_top5, 100.0,
                             analyze(session.graph).rel_complexity_mmacs, "-"]] + rows)
    im = session.images
    md = (f"### {args.model}: default vs --paper (Tables 2/5 shape)\n\n"
          f"Command: `python benchmarks/paper_switch.py --model {args.model}"
          f"{' --eval-size ' + str(args.eval_size) if args.eval_size else ''}"
          f"{' --device ' + args.device if args.device != 'cpu' else ''}`  \n"
          f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; device {args.device}; "
          f"Python {platform.python_version()}  \n"
          f"Calibration: {im['n_calib']} images, evaluation: {im['n_eval']} other images of `{data}` (seed 0). "
          f"Total wall time {time.time() - t0:.0f} s.\n\n"
          "default = fixq's defaults (maxabs coefficients, mse data, unsigned data after ReLU, FC follows the "
          "coefficient mode); --paper = the paper's choices (maxabs coefficients and data, signed Q(T,F) data, "
          "half-up rounding, 32-bit accumulators, 8-bit biases, FC 4D). Agreement = top-1 agreement with float.\n\n"
          + table + "\n\n")
    out = Path(args.out) / "paper_switch.md"
    if args.append and out.exists():
        md = out.read_text() + md
    out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
