"""Golden digests: a fixed matrix of models x configurations, and the sha256 of everything
fixq produces for each (plan.json bytes, exact-simulation logits, engine codes, generated C
files, QDQ ONNX bytes). A behaviour-preserving change (refactor, speed-up) leaves every
digest identical; a change that means to alter an output regenerates them with a reason:

    python tests/test_golden.py --regen "why the outputs changed"

which rewrites ``tests/golden/digests.json`` and appends the reason to its ``history``.
The float32 simulation is left out on purpose (its sums are not exact, so its last bits may
depend on the machine's BLAS); the exact simulation's float64 logits are exact integers
times powers of two and do not. The learned-rounding cells store a digest of the float
weights (``LayerCodes.digest``), so their BatchNorm statistics are measured in float64: in
float32 the conv sums' last bits depend on the CPU's vector width (an AVX-512 machine's
folded weights differed from an AVX2 machine's in the last bit; the codes did not).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fixq.algorithms.calibrate import observe, plan_from  # noqa: E402
from fixq.backends.engine import Engine  # noqa: E402
from fixq.backends.export_c import export_c  # noqa: E402
from fixq.algorithms.kmeans import cluster_kernels  # noqa: E402
from fixq.algorithms.mixed import filter_bits, filter_energies  # noqa: E402
from fixq.planning.plan import LayerConfig, QuantConfig  # noqa: E402
from fixq.backends.simulate import Simulator  # noqa: E402
from fixq.data.zoo import CifarResNet, build_model  # noqa: E402

from helpers import DepthwiseNet, make_graph  # noqa: E402
from test_mobile import MobileNet  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "digests.json"

PAPER = dict(method="maxabs", data_method="maxabs", data_sign="signed")
CONFIGS = {  # name -> (LayerConfig kwargs, rounding, extra): extra is "mixed", "kmeans" or None
    "default": ({}, "half_up", None),
    "paper-8b-3D": (dict(PAPER), "half_up", None),
    "4b-2D-even-acc24": (dict(coeff_bits=4, coeff_mode="2D", data_mode="3D", acc_bits=24), "nearest_even", None),
    "8b-4D-floor-pct": (dict(coeff_mode="4D", method="percentile:99.99"), "floor", None),
    "mixed-2D": (dict(coeff_mode="2D", data_mode="3D", acc_bits=20), "half_up", "mixed"),
    "kmeans-3D": (dict(coeff_mode="3D", data_mode="4D", acc_bits=24), "half_up", "kmeans"),
    "kmeans44-2D": (dict(coeff_mode="2D", data_mode="3D", acc_bits=24), "half_up", "kmeans44"),
    "learned-4b-2D": (dict(coeff_bits=4, coeff_mode="2D"), "half_up", "learned"),
}


MODELS = {"lenet-digits": (lambda: build_model("lenet-digits")[0].eval(), (1, 8, 8), 0.5),
          "depthwise": (DepthwiseNet, (3, 16, 16), 1.5),
          "resnet20-random": (lambda: CifarResNet(20), (3, 32, 32), 1.5),
          "mobile": (MobileNet, (3, 16, 16), 1.5)}


def _model(name: str):
    """One cell's network, its weights drawn from a fixed seed (not from whatever the cells
    run before it left in the global generator: any subset of cells reproduces its digests)."""
    make, shape, scale = MODELS[name]
    torch.manual_seed(0)
    return make(), shape, scale


SMALL = ("lenet-digits", "depthwise")
MATRIX = ([(m, c) for m in SMALL + ("resnet20-random",) for c in CONFIGS
           if not (m == "resnet20-random" and c not in ("default", "paper-8b-3D", "mixed-2D", "kmeans-3D"))]
          + [("mobile", c) for c in ("default", "paper-8b-3D", "4b-2D-even-acc24")])


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:32]


def _plan(g, x, cfg: str):
    kw, rounding, extra = CONFIGS[cfg]
    obs = observe(g, [(x, None)], show_progress=False)
    qc = QuantConfig(LayerConfig(**kw), rounding)
    if extra == "mixed":
        E = filter_energies(g, [x], show_progress=False)
        eligible = [n for n in E if n != g.nodes[1].name][:3]
        return plan_from(obs, qc, "golden", filter_bits=filter_bits({k: E[k] for k in eligible}, 0.3))
    if extra in ("kmeans", "kmeans44"):
        convs = [n for n in E_names(g)][1:3]
        km = {n: cluster_kernels(g.node(n).weight, 2, seed=0) for n in convs}
        return plan_from(obs, qc, "golden", kmeans=km, kmeans_bits=(8, 4, 4) if extra == "kmeans44" else (8, 4))
    plan = plan_from(obs, qc, "golden")
    if extra == "learned":
        from fixq.algorithms.learned import RoundingOptions, learn_rounding
        plan = learn_rounding(g, plan, x, RoundingOptions(iters=40, samples=2048, batch=256), show_progress=False)[0]
    return plan


def E_names(g):
    """Ungrouped conv/linear layers, in graph order (K-means candidates)."""
    return [n.name for n in g.nodes if getattr(n, "weight", None) is not None and getattr(n, "groups", 1) == 1]


def digests(model: str, cfg: str) -> dict[str, str]:
    """Every output of one matrix cell, as short sha256 digests."""
    net, shape, scale = _model(model)
    torch.manual_seed(0)
    bn_dtype = torch.float64 if CONFIGS[cfg][2] == "learned" else torch.float32  # module docstring
    g = make_graph(net, shape, bn_dtype=bn_dtype) if model != "lenet-digits" else _capture(net, shape)
    torch.manual_seed(1)
    x = torch.randn(32, *shape) * scale
    plan = _plan(g, x, cfg)
    torch.manual_seed(2)
    xt = torch.randn(4, *shape) * scale
    out = {"plan.json": _sha(json.dumps(plan.to_json(), indent=1).encode())}
    out["sim64"] = _sha(Simulator(g, plan, exact=True)(xt).double().numpy().tobytes())
    eng = Engine(g, plan)
    out["engine"] = _sha(eng.run(eng.quantize_input(xt)).to(torch.int64).numpy().tobytes())
    with tempfile.TemporaryDirectory() as d:
        res = export_c(g, plan, Path(d) / "c")
        for f in sorted(p.name for p in res.out.iterdir() if p.name.startswith("model")):
            out[f"c/{f}"] = _sha((res.out / f).read_bytes())
        rt = sorted(p for p in res.out.iterdir() if p.name.startswith("fixq_rt"))  # the hand-written runtime
        out["c/runtime"] = _sha(b"".join(p.name.encode() + p.read_bytes() for p in rt))
        try:
            importlib.import_module("onnx")
        except ImportError:
            pass
        else:
            from fixq.backends.onnx_out import export_qdq
            m = export_qdq(g, plan, Path(d) / "m.onnx")
            m.producer_version = ""
            out["qdq.onnx"] = _sha(m.SerializeToString(deterministic=True))
    return out


def _capture(net, shape):
    from fixq.graph.capture import capture
    return capture(net, torch.zeros(2, *shape))


def _load() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"history": [], "cells": {}}


@pytest.mark.parametrize("model,cfg", MATRIX, ids=[f"{m}:{c}" for m, c in MATRIX])
def test_outputs_match_golden_digests(model, cfg):
    want = _load()["cells"].get(f"{model}:{cfg}")
    assert want is not None, f"no golden digests for {model}:{cfg}; run tests/test_golden.py --regen REASON"
    got = digests(model, cfg)
    if "qdq.onnx" not in got:
        want = {k: v for k, v in want.items() if k != "qdq.onnx"}
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not changed, (f"{model}:{cfg}: {changed} differ from tests/golden/digests.json; if intended, "
                         "regenerate with `python tests/test_golden.py --regen REASON`")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--regen" or not sys.argv[2].strip():
        sys.exit("usage: python tests/test_golden.py --regen \"reason the outputs changed\"")
    from datetime import date
    data = _load()
    cells = {f"{m}:{c}": digests(m, c) for m, c in MATRIX}
    changed = sorted(k for k in cells if data["cells"].get(k) != cells[k])
    data["history"].append({"date": date.today().isoformat(), "reason": sys.argv[2], "changed": changed})
    data["cells"] = cells
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(cells)} cells, {len(changed)} changed: {', '.join(changed) or '-'}")
