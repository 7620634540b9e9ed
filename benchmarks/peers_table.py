"""Peers a user would try instead of fixq, through their own documented PTQ APIs, on the same
calibration and evaluation images as ``ptq_table.py`` / ``method_table.py``:

- Brevitas (``brevitas_examples.imagenet_classification.ptq.ptq_common.quantize_model``, FX
  backend, 8-bit per-channel weights, 8-bit per-tensor activations at the 99.999th
  percentile, **power-of-two scales** ``scale_factor_type="po2_scale"``, then its
  ``calibrate``), and the same with float scales;
- Sony's Model Compression Toolkit (``mct.ptq.pytorch_post_training_quantization`` with its
  default target platform: symmetric weights, power-of-two activation thresholds).

Peer packages are benchmark-only (never fixq dependencies); install them apart, e.g.
``python -m venv --system-site-packages /tmp/peers && /tmp/peers/bin/pip install brevitas==0.13.4
model-compression-toolkit==2.6.1 torch==2.14.1 torchvision==0.29.1`` and run with that
interpreter:

    /tmp/peers/bin/python benchmarks/peers_table.py --model cifar10-resnet20

Where a peer fails, its row says how (one line). Writes benchmarks/results/peers_<model>.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ptq_table import cpu_name, setup_args, setup_session  # noqa: E402

from fixq.analysis.evaluate import batches, topk_errors  # noqa: E402
from fixq.analysis.report import markdown_table  # noqa: E402
from fixq.data.zoo import build_model  # noqa: E402


def _eval(model, session, bs=256) -> dict:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb, _ in batches(session.eval_stream.tensor(), None, bs)])
    t1, t5 = topk_errors(logits, session.eval_y)
    agree = 100.0 * (logits.argmax(1) == session.float_logits.argmax(1)).float().mean().item()
    return {"top1": t1, "top5": t5, "agree": agree}


def _cifar_forward_adaptive(self, x):
    """CifarResNet.forward with ``avg_pool2d(out, out.size()[3])`` written as the identical
    ``adaptive_avg_pool2d(out, 1)`` (Brevitas's functional-to-module pass cannot take a kernel
    size computed from the tensor)."""
    import torch.nn.functional as Fn
    out = Fn.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = Fn.adaptive_avg_pool2d(out, 1)
    return self.linear(out.view(out.size(0), -1))


def brevitas_row(session, po2: bool, adaptive_pool: bool = False) -> dict:
    import types
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import calibrate, quantize_model
    model, _ = build_model(session.model_name, session.weights)
    if adaptive_pool:
        model.__class__ = types.new_class(type(model).__name__ + "Adaptive", (type(model),),
                                          exec_body=lambda ns: ns.update(forward=_cifar_forward_adaptive))
    model = preprocess_for_quantize(model.cpu().eval(), relu6_to_relu=False)
    q = quantize_model(model, backend="fx", weight_bit_width=8, act_bit_width=8, bias_bit_width=32,
                       weight_quant_granularity="per_channel", act_quant_percentile=99.999, act_quant_type="sym",
                       scale_factor_type="po2_scale" if po2 else "float_scale", quant_format="int")
    calibrate([(xb, None) for xb, _ in batches(session.calib_stream.tensor(), None, 64)], q)
    return _eval(q, session)


def mct_row(session) -> dict:
    import model_compression_toolkit as mct
    model, _ = build_model(session.model_name, session.weights)
    calib = [xb for xb, _ in batches(session.calib_stream.tensor(), None, 64)]

    def gen():
        for xb in calib:
            yield [xb]

    q, _ = mct.ptq.pytorch_post_training_quantization(copy.deepcopy(model).cpu().eval(), gen)
    return _eval(q.cpu(), session)


def main() -> None:
    ap = argparse.ArgumentParser()
    setup_args(ap)
    args = ap.parse_args()
    t_start = time.time()
    session, data = setup_session(args)
    rows = [["float", session.float_top1, 0.0, session.float_top5, 100.0, "-"]]
    peers = [("Brevitas 0.13 PTQ, po2 scales (per-channel weights, act 99.999th pct)", lambda: brevitas_row(session, True)),
             ("Brevitas 0.13 PTQ, float scales (same settings)", lambda: brevitas_row(session, False)),
             *([("Brevitas 0.13 PTQ, po2 scales, avg_pool2d(x, x.size()[3]) written as adaptive_avg_pool2d(x, 1)",
                 lambda: brevitas_row(session, True, True))] if args.model.startswith("cifar10") else []),
             ("MCT 2.6 PTQ, default TPC (symmetric weights, po2 activation thresholds)", lambda: mct_row(session))]
    for label, fn in peers:
        t0 = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = fn()
            rows.append([label, r["top1"], round(r["top1"] - session.float_top1, 2), r["top5"], r["agree"],
                         round(time.time() - t0, 1)])
        except Exception as e:  # a peer's failure is a result: one line, the error
            traceback.print_exc()
            rows.append([f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})",
                         None, None, None, None, round(time.time() - t0, 1)])
        print(rows[-1], flush=True)
    import brevitas
    import model_compression_toolkit as mct
    table = markdown_table(["<8b,8b> peer", "top-1 err %", "loss (points)", "top-5 err %", "agreement %", "wall s"],
                           rows)
    head = (f"### {args.model}: peers (power-of-two PTQ)\n\nCommand: `/tmp/peers/bin/python benchmarks/peers_table.py "
            f"--model {args.model}`  \nDate: {time.strftime('%Y-%m-%d')}; machine: {cpu_name()} "
            f"({torch.get_num_threads()} threads); torch {torch.__version__}, brevitas {brevitas.__version__}, "
            f"model-compression-toolkit {mct.__version__}  \nCalibration: {session.images['n_calib']} images, "
            f"evaluation: the other {session.images['n_eval']} of `{data}` (seed 0). Total wall time "
            f"{time.time() - t_start:.0f} s.\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peers_{args.model}.md").write_text(head + table + "\n")
    print(head + table)


if __name__ == "__main__":
    main()
