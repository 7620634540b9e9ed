"""K-means with <4b,8b> and <4b,4b> residuals (paper §6, Tables 4 and 6), fixq's defaults
beside ``--paper``, with one fixed K per layer (no K search), written to
benchmarks/results/paper_kmeans_<model>.md and quoted in paper_switch.md (issue #20).

    python benchmarks/paper_kmeans.py --model cifar10-resnet20 [--eval-size 4000]

The K per layer are the ones ``fixq kmeans`` chose on ResNet-20 (benchmarks/results/
kmeans_cifar10-resnet20.md); every other model gets K=2 everywhere.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ptq_table import SETUPS  # noqa: E402
from search_table import machine  # noqa: E402

from fixq.app.cli import main as fixq  # noqa: E402
from fixq.analysis.report import markdown_table  # noqa: E402

KS = {"cifar10-resnet20": "layer1.0.conv1=1,layer1.0.conv2=1,layer1.1.conv1=2,layer1.1.conv2=1,layer1.2.conv1=2,"
      "layer1.2.conv2=1,layer2.0.conv1=1,layer2.0.conv2=1,layer2.1.conv1=1,layer2.1.conv2=1,layer2.2.conv1=1,"
      "layer2.2.conv2=1,layer3.0.conv1=1,layer3.0.conv2=1,layer3.1.conv1=1,layer3.1.conv2=1,layer3.2.conv1=1,"
      "layer3.2.conv2=1,linear=2"}


def paper_args(eval_size: int, work: str) -> argparse.ArgumentParser:
    """The options of the paper_* scripts that run a fixq search twice (default, --paper)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=list(SETUPS))
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--eval-size", type=int, default=eval_size)
    ap.add_argument("--work", default=work)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--device", default="cpu")
    return ap


def fixq_argv(command: str, args) -> tuple[list[str], int]:
    """``fixq <command>`` on the model's standard split (SETUPS), batch 256, JSON report;
    returns (argv without --out, calibration images)."""
    if args.device == "cpu":
        torch.set_num_threads(2)
    data, weights, nc, _ = SETUPS[args.model]
    shared = Path(args.shared)
    argv = [command, "--model", args.model, "--calib", str(shared / data), "--calib-size", str(nc),
            "--eval", str(shared / data), "--eval-size", str(args.eval_size), "--batch-size", "256",
            "--quiet", "--json", "--device", args.device]
    return argv + (["--weights", str(shared / weights)] if weights else []), nc


def main() -> None:
    ap = paper_args(4000, "/tmp/fixq-paper-kmeans")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    base, nc = fixq_argv("kmeans", args)
    base += ["--k", KS.get(args.model, "2"), "--sensitivity-size", "128"]
    if args.workers is not None:
        base += ["--workers", str(args.workers)]
    t0 = time.time()
    t4, t6 = [], []
    for setting in ("default", "--paper"):
        for rdb in (4,):  # with --residual-data-bits 4 the tables show <4b,8b> and <4b,4b> rows side by side
            out = Path(args.work) / f"{setting.strip('-')}-{rdb or 8}"
            argv = base + ["--out", str(out)] + (["--paper"] if setting == "--paper" else []) + (
                ["--residual-data-bits", str(rdb)] if rdb else [])
            t = time.time()
            code = fixq(argv)
            if code != 0:
                raise SystemExit(f"fixq kmeans failed ({code}): {' '.join(argv)}")
            rep = json.loads((out / "report.json").read_text())
            s = round(time.time() - t)
            tab4 = rep["table4"]
            for r in tab4["rows"]:
                t4.append([setting, f"{tab4['layer']} (N={tab4['N']})", r["plan"], r["top1_error"], r["logit_sqnr_db"],
                           r["layer_rel_complexity_mmacs"], r["layer_savings_pct"], r["network_savings_pct"]])
            for r in rep["table6"]:
                t6.append([setting, r["plan"], r["top1_error"], r["top5_error"], r["logit_sqnr_db"],
                           r["rel_complexity_mmacs"], r["network_savings_pct"], s])
            print(t6[-1], flush=True)
    fl = rep["float"]
    md = (f"### {args.model}: K-means <4b,8b> and <4b,4b> residuals, default vs --paper (Tables 4/6 shape)\n\n"
          f"Command: `python benchmarks/paper_kmeans.py --model {args.model} --eval-size {args.eval_size}"
          f"{' --device ' + args.device if args.device != 'cpu' else ''}` "
          f"(fixq kmeans with a fixed K per layer: `--k {KS.get(args.model, '2')}`; no K search)  \n"
          f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; device {args.device}; "
          f"total wall time {time.time() - t0:.0f} s.  \n"
          f"Images: calibration {nc}, evaluation {args.eval_size} split in halves (tuning / test; errors on the "
          f"{rep['n_test']} test images). Float top-1 error on them {fl['top1_error']:.2f}%.\n"
          "With --paper, Table 4's other layers are in floating point (the paper's Table 4) and its network "
          "savings are that layer's savings over the all-base network; default: the other layers are the 2D-HQ "
          "<8b,8b> base plan. `<4b,4b>`: the residual kernels read the layer input requantized to their own "
          "4-bit data format (calibrated with the setting's data range rule); the basis kernels read 8-bit data.\n\n"
          "Table 4 shape (one layer):\n\n"
          + markdown_table(["setting", "layer", "plan", "top-1 err %", "logit SQNR dB", "layer [M MACs <8b,8b>]",
                            "layer savings %", "network savings %"], t4)
          + "\n\nTable 6 shape (network):\n\n"
          + markdown_table(["setting", "plan", "top-1 err %", "top-5 err %", "logit SQNR dB",
                            "complexity [M MACs <8b,8b>]", "network savings %", "run wall s"], t6) + "\n\n")
    (Path(args.out) / f"paper_kmeans_{args.model}.md").write_text(md)  # joined into paper_switch.md by hand
    print(md)


if __name__ == "__main__":
    main()
