"""Integer engine and generated C: throughput vs float PyTorch on this CPU, ROM/RAM of the
exports, and the accumulator table of ResNet-20.

    python benchmarks/engine_c_table.py [--shared ../shared]

Writes benchmarks/results/engine_c.md. <8b,8b>, 3D coefficients, 4D data, maxabs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fixq.analysis.accumulators import accumulator_table
from fixq.app.common import make_config
from fixq.backends.engine import Engine
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.run import build
from fixq.graph.ir import run_float
from fixq.algorithms.pipeline import open_session, run_config
from fixq.analysis.report import markdown_table
from fixq.backends.simulate import Simulator

from ptq_table import cpu_name

SETUPS = {"cifar10-resnet20": ("data/cifar10-test", "models/cifar10-resnet/resnet20-12fca82f.th", 256, 64),
          "efficientnet-lite0": ("data/imagenet-sample", None, 64, 4)}


def rate(fn, n):
    fn()
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    shared = Path(args.shared)
    rows, acc_md = [], ""
    for name, (data, weights, nc, ne) in SETUPS.items():
        s = open_session(name, str(shared / data), str(shared / data), str(shared / weights) if weights else None,
                         calib_size=nc, eval_size=ne, show_progress=False)
        run = run_config(s, make_config(coeff_mode="3D"))
        g, plan, x = s.graph, run.plan, s.eval_stream.tensor()
        eng = Engine(g, plan)
        q = eng.quantize_input(x)
        res = export_c(g, plan, Path("/tmp/fixq-bench-c") / name)
        build(res.out)
        with torch.no_grad():
            r_float = rate(lambda: run_float(g, x), len(x))
            r_fast = rate(lambda: Simulator(g, plan)(x), len(x))
            r_exact = rate(lambda: Simulator(g, plan, exact=True)(x), len(x))
            r_eng = rate(lambda: eng.run(q), len(x))
        t = time.perf_counter()
        c_out, _ = run_c_program(res.out, q)
        r_c = len(x) / (time.perf_counter() - t)
        ref = eng.run(q)
        same = torch.equal(c_out, ref.reshape(len(x), -1))
        with torch.no_grad():  # how often the float32 fast mode differs from the integer spec
            fast_out = Simulator(g, plan)(x).double()
        mismatch = 100.0 * (fast_out != eng.dequantize(ref)).double().mean().item()
        rows.append([name, len(x), r_float, r_eng, r_eng / r_float, r_c, r_c / r_float, r_fast / r_float,
                     r_exact / r_float, res.rom_bytes, res.ram_bytes, "yes" if same else "NO", mismatch])
        print(rows[-1], flush=True)
        if name == "cifar10-resnet20":
            acc = accumulator_table(g, plan, s.calib_stream.tensor())
            acc_md = markdown_table(["layer", "S (sum F)", "calibrated I_acc", "A exact sum", "A bit-identical to A=32"],
                                    [[r.name, f"{r.S_min}..{r.S_max}", r.acc_I_max, r.A_exact, r.A_identical]
                                     for r in acc])
    table = markdown_table(["model", "images", "float32 img/s", "engine img/s", "engine/float", "C img/s", "C/float",
                            "fast sim/float", "exact sim/float", "ROM bytes", "RAM bytes", "C == engine",
                            "fast sim != engine [% of outputs]"], rows)
    text = (f"Command: `python benchmarks/engine_c_table.py`; {time.strftime('%Y-%m-%d')}; {cpu_name()}, "
            f"{torch.get_num_threads()} threads; C: gcc -std=c99 -O2, one core, batch 1; PyTorch batched.\n\n"
            f"{table}\n\nAccumulator table, ResNet-20 (<8b,8b> 3D, {SETUPS['cifar10-resnet20'][2]} calibration "
            f"images; `fixq accumulators`):\n\n{acc_md}\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "engine_c.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
