"""Energy-based 8/4-bit mixed precision (paper §5, Table 3 shape), fixq's defaults beside
``--paper``, on one calibration set and one evaluation set split into tuning/test halves,
written to benchmarks/results/paper_mixed_<model>.md (issue #20).

    python benchmarks/paper_mixed.py --model cifar10-resnet20 [--eval-size 2000]

Both settings run the same ``fixq mixed`` search (same target drop, trials, strategies);
``--paper`` changes only the paper's fixed choices (maxabs signed data, FC 4D, nearest
coefficient rounding, ...). Since session 17 the default learns rounding, so the "default"
row does too; results/paper_mixed_*.md were measured before, when it rounded to nearest.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from paper_kmeans import fixq_argv, paper_args  # noqa: E402
from search_table import machine  # noqa: E402

from fixq.app.cli import main as fixq  # noqa: E402
from fixq.analysis.report import markdown_table  # noqa: E402


def main() -> None:
    args = paper_args(2000, "/tmp/fixq-paper-mixed").parse_args()
    base, nc = fixq_argv("mixed", args)
    t0 = time.time()
    rows, search = [], []
    for setting in ("default", "--paper"):
        out = Path(args.work) / setting.strip("-")
        argv = base + ["--out", str(out)] + (["--paper"] if setting == "--paper" else [])
        t = time.time()
        code = fixq(argv)
        if code != 0:
            raise SystemExit(f"fixq mixed failed ({code}): {' '.join(argv)}")
        s = round(time.time() - t)
        rep = json.loads((out / "report.json").read_text())
        for r in rep["table3"]:
            rows.append([setting, r["plan"], r["top1_error"], r["top5_error"], r["low_precision_filters_pct"],
                         r["rel_complexity_mmacs"], r["savings_pct"]])
        st = rep["strategies"][rep["strategy"]]
        search.append([setting, rep["target"]["top1_error"], rep["strategy"], st["best_f"],
                       st["best_tune_top1_error"], st["best_savings_pct"], len(rep["trials"]), s])
        print(rows[-3:], search[-1], flush=True)
    fl = rep["float"]
    md = (f"### {args.model}: mixed precision, default vs --paper (Table 3 shape)\n\n"
          f"Command: `python benchmarks/paper_mixed.py --model {args.model} --eval-size {args.eval_size}"
          f"{' --device ' + args.device if args.device != 'cpu' else ''}` (`fixq mixed` with its default "
          "target, 1.0 point of top-1 over float on the tuning half, without and with `--paper`)  \n"
          f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; device {args.device}; "
          f"total wall time {time.time() - t0:.0f} s.  \n"
          f"Images: calibration {nc}, evaluation {args.eval_size} split in halves ({rep['n_tune']} tuning / "
          f"{rep['n_test']} test; errors below on the test half). Float top-1 error on the test half "
          f"{fl['top1_error']:.2f}%, on the tuning half {fl['top1_error_tune']:.2f}%. Savings are against 2D-HQ "
          "<8b,8b> everywhere, in <8b,8b> MAC units.\n\n"
          + markdown_table(["setting", "plan", "top-1 err %", "top-5 err %", "low-precision filters %",
                            "complexity [M MACs <8b,8b>]", "savings %"], rows)
          + "\n\nSearch (on the tuning half):\n\n"
          + markdown_table(["setting", "target top-1 err %", "strategy", "f", "tuning top-1 err %", "savings %",
                            "trials", "run wall s"], search) + "\n\n")
    (Path(args.out) / f"paper_mixed_{args.model}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
