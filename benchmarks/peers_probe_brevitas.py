"""Why Brevitas scores far below float on EfficientNet-Lite0 (issue 13, peers): the same
``quantize_model`` settings as ``peers_table.py`` (po2 scales, per-channel weights, 99.999th
percentile activations), with one side at 16 bits, and both at 16 bits; the preprocessed float
model first. Run with the peers interpreter (see ``peers_table.py``):

    /tmp/peers/bin/python benchmarks/peers_probe_brevitas.py --shared ../shared

Session 14 ran this code from a scratch copy (same statements, other paths); its output is
quoted in ``results_intro.md`` (preprocessed float 12.50%; 8/16: 39.91%, 16/8: 41.86%, 16/16: 39.91% top-1 error).
"""
import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peers_table import _eval  # noqa: E402
from ptq_table import setup_session  # noqa: E402


def main() -> None:
    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--model", default="efficientnet-lite0")
    a = ap.parse_args()
    s, _ = setup_session(argparse.Namespace(model=a.model, shared=a.shared, device="cpu", eval_size=None, workers=0))
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import calibrate, quantize_model
    from fixq.analysis.evaluate import batches
    from fixq.data.zoo import build_model
    m, _ = build_model(s.model_name, s.weights)
    print("preprocessed, no quant:", _eval(preprocess_for_quantize(m.cpu().eval(), relu6_to_relu=False), s), flush=True)
    for wb, ab in [(8, 16), (16, 8), (16, 16)]:
        m, _ = build_model(s.model_name, s.weights)
        p = preprocess_for_quantize(m.cpu().eval(), relu6_to_relu=False)
        q = quantize_model(p, backend="fx", weight_bit_width=wb, act_bit_width=ab, bias_bit_width=32,
                           weight_quant_granularity="per_channel", act_quant_percentile=99.999, act_quant_type="sym",
                           scale_factor_type="po2_scale", quant_format="int")
        calibrate([(xb, None) for xb, _ in batches(s.calib_stream.tensor(), None, 64)], q)
        print(f"weights {wb} bits, activations {ab} bits:", _eval(q, s), flush=True)


if __name__ == "__main__":
    main()
