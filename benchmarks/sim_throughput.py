"""Simulation speed vs float inference on the same device (issue: fast simulation >= 0.6x
float; exact mode close to float64 inference; calibration <= 2 float passes).

    python benchmarks/sim_throughput.py --device cuda --models resnet50,mobilenet_v2

Random weights with BatchNorm statistics from a random batch (speed does not depend on
the weights). PyTorch's own fake-quant model (torch.ao QAT prepare, eval mode) is timed
beside it as the reference. Writes results/throughput_<device>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from fixq.algorithms.calibrate import calibrate
from fixq.graph.capture import capture
from fixq.graph.ir import run_float
from fixq.planning.plan import LayerConfig, QuantConfig
from fixq.analysis.report import markdown_table
from fixq.backends.simulate import Simulator
from fixq.data.zoo import build_model, set_bn_statistics


def rate(fn, n, device, reps):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
    return reps * n / (time.perf_counter() - t)


def torch_fake_quant(model, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))
        m.apply(torch.ao.quantization.disable_observer)
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hw", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calib-batches", type=int, default=4, help="calibration set = this many batches")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        from fixq.algorithms.pipeline import strict_float32
        strict_float32()
    rows, out = [], {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, _ = build_model(name)
        x = torch.randn(args.batch, 3, args.hw, args.hw, device=dev)
        model = set_bn_statistics(model.to(dev), x[:16])
        g = capture(model, x[:2])
        t0 = time.perf_counter()
        plan = calibrate(g, [(x, None)] * args.calib_batches, QuantConfig(LayerConfig(coeff_mode="3D")),
                         device=dev, show_progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_cal = time.perf_counter() - t0
        fast, exact = Simulator(g, plan, device=dev), Simulator(g, plan, exact=True, device=dev)
        r = {"float32": rate(lambda: run_float(g, x), args.batch, dev, args.reps),
             "fast_sim": rate(lambda: fast(x), args.batch, dev, args.reps),
             "float64": rate(lambda: run_float(g, x.double()), args.batch, dev, max(1, args.reps // 2)),
             "exact_sim": rate(lambda: exact(x), args.batch, dev, max(1, args.reps // 2))}
        try:
            fq = torch_fake_quant(model, x[:2])
            r["torch_fake_quant"] = rate(lambda: fq(x), args.batch, dev, args.reps)
        except Exception as e:  # the peer failing is a result, not a crash
            r["torch_fake_quant_error"] = f"{type(e).__name__}: {e}"
        # calibration time over calib_batches batches, in units of one float pass over them
        r["calibration_float_passes"] = t_cal * r["float32"] / (args.batch * args.calib_batches)
        out[name] = r
        rows.append([name, r["float32"], r["fast_sim"], r["fast_sim"] / r["float32"],
                     r.get("torch_fake_quant", float("nan")) / r["float32"], r["exact_sim"] / r["float64"],
                     r["calibration_float_passes"]])
        print(rows[-1], flush=True)
    dname = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    table = markdown_table(["model", "float32 img/s", "fast sim img/s", "fast/float", "torch fake-quant/float",
                            "exact/float64", "calibration [float passes]"], rows)
    text = (f"Command: `python benchmarks/sim_throughput.py --device {args.device} --models {args.models} "
            f"--batch {args.batch} --hw {args.hw} --calib-batches {args.calib_batches}`; device: {dname}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"throughput_{dev.type}.json").write_text(json.dumps(out, indent=1))
    (Path(args.out) / f"throughput_{dev.type}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
