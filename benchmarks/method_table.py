"""Choose fixq's default range rules by measurement (issue: 8-bit that holds on unseen models).

    python benchmarks/method_table.py --model cifar10-resnet20 [--device cpu] [--shared ../shared]

For one model: <8b,8b>, 3D coefficients (maxabs, paper eq. 6), 4D data, and every data range
method (maxabs, percentile at several P, mse) with signed data (the paper) and with
``--data-sign auto`` (unsigned U(T,F) where the graph proves x >= 0). Same calibration and
evaluation images as ``ptq_table.py`` (512/9,488 CIFAR-10, 128/872 ImageNet sample, seed 0).
Writes benchmarks/results/methods_<model>.md (+ .json): top-1/top-5 error, the loss against
float in points, and top-1 agreement with float.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ptq_table import cpu_name, setup_args, setup_session  # noqa: E402

from fixq.app.common import make_config  # noqa: E402
from fixq.algorithms.pipeline import run_config  # noqa: E402
from fixq.analysis.report import markdown_table  # noqa: E402

DATA_METHODS = ("maxabs", "percentile:99.9", "percentile:99.99", "percentile:99.999", "mse")
SIGNS = ("signed", "auto")


def main() -> None:
    ap = argparse.ArgumentParser()
    setup_args(ap)
    ap.add_argument("--coeff-method", default="maxabs")
    args = ap.parse_args()
    t_start = time.time()
    session, data = setup_session(args)
    session.observations(True)
    rows, js = [["float", "-", session.float_top1, "-", session.float_top5, 100.0, "-"]], []
    for sign in SIGNS:
        for m in DATA_METHODS:
            t0 = time.time()
            cfg = make_config(coeff_bits="8", data_bits="8", coeff_mode="3D", method=args.coeff_method)
            cfg = cfg.__class__(cfg.default.__class__(**{**cfg.default.__dict__, "data_method": m, "data_sign": sign}),
                                cfg.rounding)
            r = run_config(session, cfg)
            n_uns = sum(1 for f in r.plan.tensors.values() if not getattr(f, "signed", True))
            row = [m, f"{sign} ({n_uns} of {len(r.plan.tensors)} unsigned)", r.result.top1_error,
                   round(r.result.top1_error - session.float_top1, 2), r.result.top5_error, r.result.agreement_top1,
                   round(time.time() - t0, 1)]
            rows.append(row)
            js.append({"data_method": m, "data_sign": sign, "unsigned_tensors": n_uns, "top1": r.result.top1_error,
                       "top5": r.result.top5_error, "loss": row[3], "agreement": r.result.agreement_top1})
            print(row, flush=True)
    table = markdown_table(["data method", "data sign", "top-1 err %", "loss (points)", "top-5 err %",
                            "agreement %", "wall s"], rows)
    dev = torch.cuda.get_device_name(0) if session.device.type == "cuda" else cpu_name()
    head = (f"### {args.model}: data range methods at <8b,8b>, 3D coefficients ({args.coeff_method}), 4D data\n\n"
            f"Command: `python benchmarks/method_table.py --model {args.model} --device {args.device}`  \n"
            f"Date: {time.strftime('%Y-%m-%d')}; machine: {dev} ({torch.get_num_threads()} threads); "
            f"torch {torch.__version__}  \nCalibration: {session.images['n_calib']} images, evaluation: the other "
            f"{session.images['n_eval']} of `{data}` (seed 0). Total wall time {time.time() - t_start:.0f} s.\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"methods_{args.model}.md").write_text(head + table + "\n")
    (out / f"methods_{args.model}.json").write_text(json.dumps({"float_top1": session.float_top1, "rows": js}, indent=1))
    print(head + table)


if __name__ == "__main__":
    main()
