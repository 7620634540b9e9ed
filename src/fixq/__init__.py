"""fixq: fixed-point quantization of trained CNNs (dynamic fixed point, hybrid 4D/3D/2D
partitions, exact simulation) for DSPs, FPGAs and MCUs.

The public flow, in Python::

    from fixq import build_model, capture, calibrate, QuantConfig, LayerConfig, Simulator
    model, _ = build_model("lenet-digits")
    graph = capture(model, example_batch)
    plan = calibrate(graph, calib_batches, QuantConfig(LayerConfig(coeff_bits=8, coeff_mode="3D")))
    logits = Simulator(graph, plan, exact=True)(images)
    plan.save("plan.json"); plan = load_plan("plan.json")   # QuantPlan.load before 0.1's layout
"""
from fixq.algorithms.calibrate import calibrate
from fixq.algorithms.pipeline import open_session, run_config
from fixq.analysis.complexity import analyze
from fixq.backends.simulate import Simulator
from fixq.data.zoo import build_model
from fixq.graph.capture import capture
from fixq.numerics.formats import QFormat
from fixq.planning.plan import LayerConfig, QuantConfig, QuantPlan
from fixq.planning.plan_io import load_plan

__all__ = ["QFormat", "capture", "calibrate", "analyze", "QuantConfig", "LayerConfig", "QuantPlan",
           "load_plan", "Simulator", "build_model", "open_session", "run_config"]
__version__ = "0.1.0"
