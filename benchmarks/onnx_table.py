"""ONNX in / QDQ out on real graphs: writes benchmarks/results/onnx.md.

1. Every ``light_*`` network graph shipped inside the onnx package: constants folded,
   weights redrawn (seed 0), fixq's imported float model vs onnxruntime (max relative error).
2. ResNet-20 (../shared weights) through fixq quantize --rounding nearest_even, exported as
   QDQ and run in onnxruntime: top-1 agreement with fixq's simulation on CIFAR-10 images.

    python benchmarks/onnx_table.py [--n 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from search_table import machine  # noqa: E402


def light_rows() -> list[list]:
    import onnx
    import onnxruntime as ort
    from fixq.graph.capture import capture
    from fixq.graph.ir import FloatOp, run_float
    from fixq.data.onnx_in import load_onnx, prepare_onnx, redraw_weights
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    rows = []
    for f in sorted(light.glob("light_*.onnx")):
        t0 = time.time()
        try:
            m = redraw_weights(prepare_onnx(onnx.load(str(f))), 0)
            last = m.graph.node[-1]
            if last.op_type == "Softmax":  # compare logits
                m.graph.output[0].name = last.input[0]
                del m.graph.node[-1]
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / f.name
                onnx.save(m, str(p))
                net = load_onnx(p)
                x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, *net.fixq_input_shape))
                                     .astype(np.float32))
                s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                ref = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
                g = capture(net, x)
            y = run_float(g, x)
            rel = float((y - ref).abs().max() / ref.abs().max())
            floats = sorted({n.op for n in g.nodes if isinstance(n, FloatOp)})
            rows.append([f.stem, len(g.layers()), ", ".join(floats) or "-", f"{rel:.1e}", f"{time.time() - t0:.0f}"])
        except Exception as e:  # report, do not hide: a row per graph
            rows.append([f.stem, "-", "-", f"error: {type(e).__name__}: {str(e)[:120]}", f"{time.time() - t0:.0f}"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    from fixq.analysis.report import markdown_table
    t0 = time.time()
    rows = light_rows()
    shared = Path(a.shared)
    w = shared / "models/cifar10-resnet/resnet20-12fca82f.th"
    cifar = shared / "data/cifar10-test"
    out = HERE / "out" / "onnx-r20"
    q = [sys.executable, "-m", "fixq", "quantize", "--model", "cifar10-resnet20", "--weights", str(w), "--calib",
         str(cifar), "--eval", str(cifar), "--eval-size", str(a.n), "--rounding", "nearest_even", "--quiet",
         "--out", str(out)]
    e = [sys.executable, "-m", "fixq", "export-onnx", "--plan", str(out / "plan.json"), "--weights", str(w),
         "--out", str(out / "resnet20_qdq.onnx"), "--n", str(a.n)]
    for cmd in (q, e):
        subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rep = json.loads((out / "resnet20_qdq.report.json").read_text())
    text = (f"### ONNX in / QDQ out\n\nCommand: `python benchmarks/onnx_table.py --n {a.n}`  \nDate: "
            f"{time.strftime('%Y-%m-%d')}; machine: {machine()}; wall time {time.time() - t0:.0f} s.\n\n"
            "Import of the network graphs shipped in the onnx package (weights redrawn with seed 0, logits of "
            "fixq's captured float model vs onnxruntime on 2 random inputs):\n\n"
            + markdown_table(["graph", "conv/linear layers", "float ops (no integer rule)", "max rel. error",
                              "wall s"], rows)
            + f"\n\nQDQ export of CIFAR ResNet-20 (`fixq quantize --rounding nearest_even`, <8b,8b> 3D/4D maxabs, "
            f"A=32, then `fixq export-onnx`), onnxruntime vs fixq's exact simulation on {rep['images']} CIFAR-10 "
            f"test images: top-1 agreement **{rep['agreement_top1_pct']:.2f}%**, largest output difference "
            f"{rep['max_diff_output_steps']:g} output steps, {rep['outputs_differing']} of {rep['images'] * 10} "
            f"outputs differ. Reasons reported: {'; '.join(rep['reasons']) or 'none'}.\n")
    (HERE / "results" / "onnx.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
