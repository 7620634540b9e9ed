"""Mobile-CNN ops (issue #21, DESIGN §5b): per-op SQNR of the table / multiply rules against
plain quantization of the float op's output to the same format, and the C ROM/RAM of
MobileNetV3-Small and EfficientNet-B0.

    flock /tmp/fixq-heavy.lock python benchmarks/mobile_ops.py   # writes benchmarks/results/mobile_ops.md

For every Table and Mul node, on the quantized model's own (on-grid) inputs ``x`` of that
node (exact simulation): ``ref = f(x)`` in float64 (``a * b`` for a multiply), ``rule`` =
the node's output, ``plain = quantize(ref)`` to the node's output format with the plan's
rounding; SQNR = ``10 log10(sum ref^2 / sum (out - ref)^2)``. The table's only error is the
output rounding, so rule == plain is expected (``max |rule - plain|`` in output steps).
torchvision nets use random weights (fixed seed) with BatchNorm statistics measured on the
images; EfficientNet-Lite0 uses its ImageNet weights with every fused ReLU6 moved into a
standalone ``relu6`` table node.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fixq.algorithms.calibrate import calibrate  # noqa: E402
from fixq.backends.export_c import export_c  # noqa: E402
from fixq.backends.export_c.run import STRICT_FLAGS, strict_build  # noqa: E402
from fixq.numerics.formats import fake_quantize  # noqa: E402
from fixq.graph.capture import capture  # noqa: E402
from fixq.graph.ir import Add, Conv, Graph, Linear, Mul, Table, run_float  # noqa: E402
from fixq.planning.plan import LayerConfig, QuantConfig  # noqa: E402
from fixq.analysis.report import markdown_table  # noqa: E402
from fixq.backends.simulate import Simulator  # noqa: E402
from fixq.data.zoo import PRESETS, build_model, set_bn_statistics  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def images(pre: str, n: int, seed: int = 0) -> torch.Tensor:
    """n ImageNet-sample images with the preset's preprocessing (random normal without the data)."""
    if not SHARED.is_dir():
        return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    from fixq.analysis.evaluate import ImageSet, load_images
    s = ImageSet.scan(SHARED)
    idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return load_images(s, idx, PRESETS[pre], show_progress=False)[0]


def relu6_as_table(g: Graph) -> Graph:
    """Every fused ReLU6 of a conv/linear/add becomes a standalone ``relu6`` table node."""
    nodes, rename = [], {}
    for n in g.nodes:
        n.inputs = tuple(rename.get(i, i) for i in n.inputs)
        nodes.append(n)
        if isinstance(n, (Conv, Linear, Add)) and n.act == (0.0, 6.0):
            n.act = None
            t = Table(n.name + ".relu6", (n.name,), op="relu6")
            nodes.append(t)
            rename[n.name] = t.name
    out = rename.get(g.output, g.output)
    g2 = Graph(nodes, g.input, out, notes=list(g.notes))
    with torch.no_grad():
        env = run_float(g2, torch.zeros(1, *g.shapes[g.input]), keep=True)
    g2.shapes = {k: tuple(v.shape[1:]) for k, v in env.items()}
    return g2


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    e = float(((out - ref) ** 2).sum())
    return float("inf") if e == 0 else 10 * torch.log10((ref ** 2).sum() / e).item()


def op_rows(model_name: str, g: Graph, plan, x: torch.Tensor) -> list[list]:
    sim = Simulator(g, plan, exact=True)
    acc: dict[str, list] = {}
    for k in range(0, x.shape[0], 4):
        env = sim.run(x[k:k + 4], keep=True)
        for n in g.nodes:
            if not isinstance(n, (Table, Mul)):
                continue
            ins = [env[i].double() for i in n.inputs]
            ref = n.fn(ins[0]) if isinstance(n, Table) else ins[0] * ins[1]
            T, F = sim.formats[n.name]
            Fb = F if F.dim() == 0 else F.reshape(1, -1, *([1] * (ref.dim() - 2)))
            plain = fake_quantize(ref, Fb, T, plan.rounding)[0]
            a = acc.setdefault(n.name, [n.op if isinstance(n, Table) else "mul", [], [], [], 0.0, T])
            a[1].append(ref.reshape(-1))
            a[2].append(env[n.name].double().reshape(-1))
            a[3].append(plain.reshape(-1))
            step = torch.pow(2.0, -Fb.double())
            a[4] = max(a[4], float(((env[n.name].double() - plain).abs() / step).max()))
    rows = []
    for name, (op, ref, out, plain, worst, T) in acc.items():
        ref, out, plain = torch.cat(ref), torch.cat(out), torch.cat(plain)
        rows.append([model_name, name, op, str(T), f"{sqnr(ref, out):.2f}", f"{sqnr(ref, plain):.2f}", f"{worst:g}"])
    return rows


def build(name: str, n_calib: int):
    torch.manual_seed(0)
    if name == "efficientnet-lite0 (ReLU6 as table)":
        from fixq.data.zoo import ZOO
        entry = ZOO["efficientnet-lite0"]
        model, _ = build_model("efficientnet-lite0", entry.default_weights())
        x = images(entry.preprocess, 2 * n_calib)
        return relu6_as_table(capture(model, x[:2])), x
    model, entry = build_model(name)
    x = images(entry.preprocess, 2 * n_calib)
    set_bn_statistics(model, x[:n_calib])
    return capture(model, x[:2]), x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8, help="calibration images (as many again are measured)")
    ap.add_argument("--models", default="mobilenet_v3_small,efficientnet_b0,mobilenet_v3_large,"
                    "efficientnet-lite0 (ReLU6 as table)", help="comma-separated subset")
    args = ap.parse_args()
    t0 = time.time()
    cfg = QuantConfig(LayerConfig())  # fixq's defaults: 8-bit, 3D coefficients, mse data, half_up
    rows, crows = [], []
    for name in args.models.split(","):
        t = time.time()
        g, x = build(name, args.images)
        plan = calibrate(g, [(x[:args.images], None)], cfg, name, show_progress=False)
        rows += op_rows(name, g, plan, x[args.images:])
        if name in ("mobilenet_v3_small", "efficientnet_b0"):
            with tempfile.TemporaryDirectory() as tmp:
                res = export_c(g, plan, Path(tmp) / "c")
                tab = sum(tb["bytes"] for tb in res.tables)
                r = strict_build(res.out, cc="gcc")
                ok = "yes" if r.returncode == 0 else "NO: " + r.stderr[-300:]
                crows.append([name, f"{res.rom_bytes:,}", f"{tab:,}", len(res.tables),
                              len({tb['shared_with'] for tb in res.tables if tb['shared_with']}), f"{res.ram_bytes:,}",
                              res.act_type, ok])
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
    wall = time.time() - t0
    t1 = markdown_table(["model", "node", "op", "output word", "SQNR rule [dB]", "SQNR plain quantization [dB]",
                         "max |rule - plain| [steps]"], rows)
    t2 = markdown_table(["model (224x224, 1000 classes, 8-bit plan)", "ROM [B]", "of which tables [B]", "table nodes",
                         "tables shared", "RAM [B]", "arena type", "gcc " + " ".join(STRICT_FLAGS)], crows)
    data = "ImageNet-sample images (../shared)" if SHARED.is_dir() else "random normal inputs (no ../shared)"
    text = (f"# Mobile-CNN ops: table / multiply SQNR and C size\n\nCommand: `python benchmarks/mobile_ops.py "
            f"--images {args.images} --models '{args.models}'`; {time.strftime('%Y-%m-%d')}; {platform.machine()} 2-core CPU; wall "
            f"{wall:.0f} s. {args.images} calibration images, {args.images} more measured; {data}. "
            "torchvision nets: random weights (seed 0), BatchNorm statistics from the calibration images; "
            "EfficientNet-Lite0: its ImageNet weights. Default plan (8-bit, 3D coefficients, mse data, half_up, "
            "unsigned data where the graph rule allows).\n\n"
            "## Per-op SQNR: rule vs plain quantization of the float op's output\n\n"
            "Reference: the float64 op on the node's quantized inputs. Equal SQNR and 0 steps: the table "
            "(and the multiply) adds no error beyond rounding the exact result into the output format.\n\n"
            f"{t1}\n" + (f"\n## C export\n\nROM counts weights, shift/bias tables and the lookup tables (with "
                         f"their per-channel index and saturation flags); RAM is the activation arena.\n\n{t2}\n"
                         if crows else ""))
    out = Path(__file__).parent / "results" / "mobile_ops.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
