"""QDQ ONNX out: the plan's fixed-point model as a standard quantized ONNX graph (opset 13).

Notation: codes ``q`` at ``F`` fractional bits, real value ``q * 2**-F``; a QDQ ``scale``
is ``2**-F`` with zero point 0. Patterns (all exact in real arithmetic):

- data: ``DequantizeLinear(QuantizeLinear(x, 2**-F), 2**-F)`` on int8 for per-tensor
  (4D) formats. Per-channel (3D) data: ``Mul(2**F) -> Q/DQ(scale 1) -> Mul(2**-F)``
  (exact; runtimes fuse DQ-op-Q into QLinear kernels that take only scalar scales).
  T < 8 inserts ``Clip(qmin, qmax)`` on the int8 codes. T > 8 is refused. Unsigned data
  formats U(T,F) are uint8 Q/DQ with zero point 0.
- coefficients: int8 codes -> ``DequantizeLinear`` (4D: one scale; 3D: per axis 0). 2D
  (per 2D filter) formats and mixed 8/4-bit filters: ``DequantizeLinear(codes, 1) *
  S2D`` where ``S2D[i, j] = 2**-F[i, j]`` (an initializer (N, M/groups, 1, 1)); 4-bit
  filters are int8 codes in [-8, 7]. K-means layers: ``Gather(DQ(basis), l) +
  DQ(residual)``; with ``<4b,4b>`` residuals ``Conv(x, Gather(DQ(basis), l)) +
  Conv(QDQ_r(x), DQ(residual))``, ``QDQ_r`` the residual branch's own data format. Bias: float32 initializer of the bias already aligned to S.
- fused activations: ``Max``/``Min`` with the bounds quantized on the accumulator grid.
- table functions (DESIGN §5b): the same lookup table, exactly: ``idx = Cast(x * 2**Fin +
  offset[c], int64)`` (x is on its grid, so exact), ``Gather(values, idx)`` with
  ``values = table codes * 2**-Fout`` (float32, exact), then the output's Q/DQ (an exact
  identity). Multiply: ``Mul`` then Q/DQ. Channel shuffle: ``Reshape -> Transpose -> Reshape``.

Known differences from fixq (reported by ``compare``): ONNX rounds half to even (use
``--rounding nearest_even``), and a float runtime accumulates in float32, not in an A-bit
integer accumulator (identical only where sums stay below 2**24 in float32).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fixq.graph.ir import (AdaptiveAvgPool, Add, AvgPool, ChannelShuffle, Clamp, Concat, Conv, Flatten, FloatOp, Graph,
                           Input, Linear, MaxPool, Mul, Pad, Slice, Table)
from fixq.numerics.formats import bound_codes, code_limits
from fixq.planning.elementwise import table_ready, table_refusal
from fixq.planning.partitions import filter_formats, propagate_formats
from fixq.planning.plan import AffineFormats, QuantPlan
from .engine import EngineError
from .lowering import lower
from .simulate import Simulator

if TYPE_CHECKING:
    import onnx

__all__ = ["export_qdq", "compare_qdq", "ONNX_EMITTERS", "QDQError"]

OPSET = 13


class QDQError(EngineError):
    """A plan or graph the QDQ export cannot express."""


class _B:
    """Graph builder: nodes and initializers with unique names."""

    def __init__(self, graph: Graph, plan: QuantPlan):
        from onnx import helper
        self.h, self.graph, self.plan = helper, graph, plan
        self.nodes, self.inits = [], []
        self.program = lower(graph, plan)  # DESIGN §5a proved; the integer tables every backend uses
        self.fmts = self.program.fmts
        self.k = 0
        self.out: dict[str, str] = {}

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}__{self.k}"

    def init(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), n))  # keeps 0-d scalars
        return n

    def node(self, op: str, inputs, base: str, **attrs) -> str:
        o = self.name(base)
        self.nodes.append(self.h.make_node(op, list(inputs), [o], name=o, **attrs))
        return o

    def qdq(self, x: str, name: str, fmt=None, tag: str | None = None) -> str:
        """Requantize ``x`` to the data format of IR node ``name`` (identity when flp), or
        to ``fmt = (T, F)`` on a tensor shaped like ``name``'s (``tag`` names its nodes)."""
        T, F = self.fmts[name] if fmt is None else fmt
        shape_of, name = name, tag or name
        if T is None or F is None:
            return x
        if T > 8:
            raise QDQError(f"'{name}' has {T}-bit data: the QDQ export writes int8 activations (T <= 8)")
        per_channel = F.dim() > 0 and bool((F != F.reshape(-1)[0]).any())
        if per_channel:  # x * 2**F (exact), then unit-scale Q/DQ, then * 2**-F
            dims = len(self.graph.shapes[shape_of]) + 1
            up = np.power(2.0, F.double().numpy()).astype(np.float32).reshape((1, -1) + (1,) * (dims - 2))
            x = self.node("Mul", [x, self.init(f"{name}_up", up)], f"{name}_up")
            scale = np.array(1.0, np.float32)
        else:
            scale = np.array(2.0 ** -int(F.reshape(-1)[0]), np.float32)
        code_t = np.int8 if getattr(T, "signed", True) else np.uint8  # U(T,F): uint8 codes, zero point 0
        s, z = self.init(f"{name}_scale", scale), self.init(f"{name}_zp", np.array(0, code_t))
        q = self.node("QuantizeLinear", [x, s, z], f"{name}_q")
        if T < 8:
            lo, hi = code_limits(T)
            q = self.node("Clip", [q, self.init("qmin", np.array(lo, code_t)), self.init("qmax", np.array(hi, code_t))],
                          f"{name}_clip")
        y = self.node("DequantizeLinear", [q, s, z], f"{name}_dq")
        if per_channel:
            y = self.node("Mul", [y, self.init(f"{name}_down", 1.0 / up)], f"{name}_down")
        return y

    def bounds(self, y: str, lo, hi, F: torch.Tensor, C: int, dims: int, name: str) -> str:
        """Fused clamp: codes on grid F (per channel) as float tensors broadcast over NC..."""
        shape = (1, C) + (1,) * (dims - 2)
        for code, op in ((lo, "Max"), (hi, "Min")):
            if code is not None:
                v = (code.double() * torch.pow(2.0, -F.double())).numpy().astype(np.float32).reshape(shape)
                y = self.node(op, [y, self.init(f"{name}_{op.lower()}", v)], f"{name}_{op.lower()}")
        return y


def _weights(b: _B, codes: torch.Tensor, F: torch.Tensor, tag: str) -> str:
    """int8 codes (N, ...) with formats F (0-d, (N,) or (N, Mg)) -> dequantized weight."""
    if int(codes.abs().max()) > 128 or int(codes.max()) > 127:
        raise QDQError(f"{tag}: coefficients wider than 8 bits cannot be int8 QDQ weights")
    q = b.init(f"{tag}_codes", codes.numpy().astype(np.int8))
    if F.dim() == 2 and bool((F == F[:, :1]).all()):
        F = F[:, 0]
    if F.dim() <= 1 and (F.dim() == 0 or bool((F == F[0]).all())):
        s = np.float32(2.0 ** -int(F.reshape(-1)[0]))
        return b.node("DequantizeLinear", [q, b.init(f"{tag}_scale", np.array(s)), b.init(f"{tag}_zp", np.array(0, np.int8))],
                      f"{tag}_dq")
    if F.dim() == 1:
        s = np.power(2.0, -F.double().numpy()).astype(np.float32)
        return b.node("DequantizeLinear", [q, b.init(f"{tag}_scale", s), b.init(f"{tag}_zp", np.zeros(len(s), np.int8))],
                      f"{tag}_dq", axis=0)
    # 2D formats: per-2D-filter power-of-two scales as an exact elementwise product
    d = b.node("DequantizeLinear", [q, b.init(f"{tag}_one", np.array(1.0, np.float32)),
                                    b.init(f"{tag}_zp", np.array(0, np.int8))], f"{tag}_dq")
    s = np.power(2.0, -F.double().numpy()).astype(np.float32).reshape(tuple(F.shape) + (1,) * (codes.dim() - 2))
    return b.node("Mul", [d, b.init(f"{tag}_s2d", s)], f"{tag}_s2d")


def _layer(b: _B, n, x: str) -> str:
    lp = b.plan.layers[n.name]
    if lp.weight is None or lp.acc_F is None or isinstance(lp.weight, AffineFormats):
        raise QDQError(f"layer '{n.name}' has no power-of-two fixed-point coefficients/data in the plan")
    L = b.program.layers.get(n.name)
    if L is None:
        raise QDQError(f"layer '{n.name}' keeps coefficients or data in floating point (flp): the QDQ export needs "
                       "fixed-point formats for every conv/linear layer")
    groups = n.groups if isinstance(n, Conv) else 1
    Fr, _ = filter_formats(lp.weight.F_tensor(), b.fmts[n.inputs[0]][1], L.w.shape, groups)
    codes = L.w if isinstance(n, Conv) else L.w[:, :, 0, 0]
    w = _weights(b, codes, Fr if len(lp.weight.shape) == 2 else lp.weight.F_tensor(), n.name)
    xr = None
    if L.basis is not None:
        km = lp.kmeans
        bc = L.basis.w if isinstance(n, Conv) else L.basis.w[:, :, 0, 0]
        g = _weights(b, bc, km.basis.F_tensor(), f"{n.name}_basis")
        g = b.node("Gather", [g, b.init(f"{n.name}_assign", L.basis.assign.numpy().astype(np.int64))],
                   f"{n.name}_gather", axis=0)
        if km.data is None:
            w = b.node("Add", [g, w], f"{n.name}_kmeans")
        else:  # <4b,4b>: the residual conv reads x requantized to its own data format
            xr = b.qdq(x, n.inputs[0], (km.data.word, km.data.F_tensor()), f"{n.name}_rx")
            w, g = g, w  # basis conv on x (with the bias), then the residual conv on xr
    bias = (L.bias.double() * torch.pow(2.0, -L.S.double())).numpy().astype(np.float32)
    bi = b.init(f"{n.name}_bias", bias)

    def apply(inp, weight, bias_in, tag):
        if isinstance(n, Conv):
            p = list(n.padding)
            return b.node("Conv", [inp, weight] + bias_in, tag, strides=list(n.stride), pads=p + p,
                          dilations=list(n.dilation), group=n.groups, kernel_shape=list(L.w.shape[2:]))
        return b.node("Gemm", [inp, weight] + bias_in, tag, transB=1)

    y = apply(x, w, [bi], n.name)
    if xr is not None:
        y = b.node("Add", [y, apply(xr, g, [], f"{n.name}_residual")], f"{n.name}_sum")
    if n.act is not None:
        y = b.bounds(y, L.lo, L.hi, L.Facc, L.w.shape[0], 4 if isinstance(n, Conv) else 2, n.name)
    return b.qdq(y, n.name)


def _add(b: _B, n: Add, x: str, z: str) -> str:
    y = b.node("Add", [x, z], n.name)
    if n.act is not None:
        Fm = torch.maximum(b.fmts[n.inputs[0]][1], b.fmts[n.inputs[1]][1])
        C = b.graph.shapes[n.name][0]
        lo, hi = bound_codes(n.act, Fm, C, b.plan.rounding)
        y = b.bounds(y, lo, hi, Fm if Fm.dim() else Fm.expand(C), C, len(b.graph.shapes[n.name]) + 1, n.name)
    return b.qdq(y, n.name)


def _clamp(b: _B, n: Clamp, x: str) -> str:
    F = b.fmts[n.inputs[0]][1]
    C = b.graph.shapes[n.name][0]
    lo, hi = bound_codes((n.lo, n.hi), F, C, b.plan.rounding)
    return b.bounds(x, lo, hi, F if F.dim() else F.expand(C), C, len(b.graph.shapes[n.name]) + 1, n.name)


def _pool_attrs(n) -> dict:
    p = list(n.padding)
    return {"kernel_shape": list(n.kernel), "strides": list(n.stride), "pads": p + p, "ceil_mode": int(n.ceil_mode)}


def _maxpool(b: _B, n: MaxPool, x: str) -> str:
    return b.node("MaxPool", [x], n.name, dilations=list(n.dilation), **_pool_attrs(n))


def _avgpool(b: _B, n, x: str) -> str:
    if isinstance(n, AdaptiveAvgPool):
        C, H, W = b.graph.shapes[n.inputs[0]]
        oh, ow = n.output_size
        if (oh, ow) == (1, 1):
            y = b.node("GlobalAveragePool", [x], n.name)
        elif H % oh == 0 and W % ow == 0:
            y = b.node("AveragePool", [x], n.name, kernel_shape=[H // oh, W // ow], strides=[H // oh, W // ow])
        else:
            raise QDQError(f"'{n.name}': adaptive average pool {H}x{W} -> {oh}x{ow} has uneven windows")
    else:
        y = b.node("AveragePool", [x], n.name, count_include_pad=int(n.count_include_pad), **_pool_attrs(n))
    return b.qdq(y, n.name)


def _concat(b: _B, n: Concat, *xs) -> str:
    return b.qdq(b.node("Concat", list(xs), n.name, axis=1), n.name)


def _pad(b: _B, n: Pad, x: str) -> str:
    rank = len(b.graph.shapes[n.inputs[0]]) + 1
    pads = list(n.pads) + [0] * (2 * rank - len(n.pads))
    begin = [0] * rank
    end = [0] * rank
    for k in range(len(n.pads) // 2):  # torch order: last dim first, (before, after) pairs
        begin[rank - 1 - k], end[rank - 1 - k] = pads[2 * k], pads[2 * k + 1]
    return b.node("Pad", [x, b.init(f"{n.name}_pads", np.array(begin + end, np.int64))], n.name)


def _slice(b: _B, n: Slice, x: str) -> str:
    starts, ends, axes, steps = [], [], [], []
    for ax, (s, e, st) in enumerate(n.index):
        if (s, e, st) in ((None, None, None), (None, None, 1)):
            continue
        starts.append(0 if s is None else s)
        ends.append(np.iinfo(np.int64).max if e is None else e)
        axes.append(ax)
        steps.append(1 if st is None else st)
    arrs = [np.array(v, np.int64) for v in (starts, ends, axes, steps)]
    return b.node("Slice", [x, *(b.init(f"{n.name}_{k}", a) for k, a in zip(("s", "e", "a", "t"), arrs))], n.name)


def _table(b: _B, n: Table, x: str) -> str:
    if not table_ready(n, b.fmts, b.plan.tensors):
        raise QDQError(table_refusal(n, b.fmts, b.plan.tensors))
    shape = b.graph.shapes[n.name]
    C = shape[0]
    ti = b.program.tables[n.name]
    tables, _ = ti.dense()  # a segmented table (inputs > 10 bits) expanded: a Gather has no search
    size = tables.shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 1)
    up = np.power(2.0, ti.Fin.double().numpy()).astype(np.float32).reshape(bshape)
    off = (ti.index * size - ti.qmin).numpy().astype(np.float32).reshape(bshape)
    v = b.node("Mul", [x, b.init(f"{n.name}_up", up)], f"{n.name}_codes")
    v = b.node("Add", [v, b.init(f"{n.name}_offset", off)], f"{n.name}_index")
    idx = b.node("Cast", [v], f"{n.name}_cast", to=7)  # INT64
    vals = np.concatenate([tables[k].double().numpy() * 2.0 ** -int(ti.Fout[int((ti.index == k).nonzero()[0])])
                           for k in range(tables.shape[0])]).astype(np.float32)
    y = b.node("Gather", [b.init(f"{n.name}_table", vals), idx], n.name, axis=0)
    return b.qdq(y, n.name)


def _shuffle(b: _B, n: ChannelShuffle, x: str) -> str:
    C, *hw = b.graph.shapes[n.name]
    split = b.init(f"{n.name}_split", np.array([0, n.groups, C // n.groups, *hw], np.int64))
    y = b.node("Reshape", [x, split], f"{n.name}_split")
    y = b.node("Transpose", [y], f"{n.name}_transpose", perm=[0, 2, 1] + list(range(3, 3 + len(hw))))
    return b.node("Reshape", [y, b.init(f"{n.name}_shape", np.array([0, C, *hw], np.int64))], n.name)


def _float(b: _B, n: FloatOp, x: str) -> str:
    m = n.fn
    if n.op == "LocalResponseNorm":
        y = b.node("LRN", [x], n.name, size=int(m.size), alpha=float(m.alpha), beta=float(m.beta), bias=float(m.k))
    elif n.op in ("Softmax", "OnnxSoftmaxV1V11"):
        y = b.node("Softmax", [x], n.name, axis=1)
    else:
        raise QDQError(f"node '{n.name}' ({n.op}) has no ONNX rule in the QDQ export")
    return b.qdq(y, n.name)


ONNX_EMITTERS = {
    Conv: _layer, Linear: _layer, Add: _add, Concat: _concat, AvgPool: _avgpool, AdaptiveAvgPool: _avgpool,
    MaxPool: _maxpool, Clamp: _clamp, Pad: _pad, Slice: _slice,
    Flatten: lambda b, n, x: b.node("Flatten", [x], n.name, axis=1), FloatOp: _float,
    Table: _table, Mul: lambda b, n, x, z: b.qdq(b.node("Mul", [x, z], n.name), n.name), ChannelShuffle: _shuffle,
}


def export_qdq(graph: Graph, plan: QuantPlan, path) -> "onnx.ModelProto":
    """Write the QDQ model to ``path``; checked with ``onnx.checker``.

    >>> m = export_qdq(graph, plan, "model_qdq.onnx")     # doctest: +SKIP
    """
    import onnx
    if plan.is_affine:
        raise QDQError("affine (TensorFlow-style) plans are not powers of two; the QDQ export writes 2**-F scales")
    if graph.input not in plan.tensors:
        raise QDQError("the plan keeps the input in floating point: the QDQ export needs data bits")
    b = _B(graph, plan)  # lowers the plan: DESIGN §5a, the bounds every integer program relies on
    out = {graph.input: b.qdq("input", graph.input)}
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        rule = ONNX_EMITTERS.get(type(n))
        if rule is None:
            raise QDQError(f"node '{n.name}' ({n.kind}) has no ONNX rule")
        out[n.name] = rule(b, n, *(out[i] for i in n.inputs))
    b.nodes.append(onnx.helper.make_node("Identity", [out[graph.output]], ["logits"], name="output"))
    shape_in = ["N", *graph.shapes[graph.input]]
    shape_out = ["N", *graph.shapes[graph.output]]
    g = onnx.helper.make_graph(b.nodes, f"fixq_{plan.model}",
                               [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, shape_in)],
                               [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, shape_out)],
                               b.inits)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="fixq")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def compare_qdq(path, graph: Graph, plan: QuantPlan, x: torch.Tensor, batch_size: int = 64) -> dict:
    """Run the exported model in onnxruntime and fixq's exact simulation on ``x``: top-1
    agreement (%) and the largest output difference in output steps ``2**-F``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sim = Simulator(graph, plan, exact=True)
    F = propagate_formats(graph, plan.tensors)[graph.output][1]
    step = torch.pow(2.0, -(F.double() if F is not None else torch.zeros(())))
    agree, worst, n, diff_outputs = 0, 0.0, 0, 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        yo = torch.from_numpy(sess.run(None, {"input": xb.float().numpy()})[0]).double()
        ys = sim(xb).double()
        agree += int((yo.argmax(1) == ys.argmax(1)).sum())
        d = (yo - ys).abs() / step
        worst = max(worst, float(d.max()))
        diff_outputs += int((d > 0).sum())
        n += xb.shape[0]
    reasons = []
    if plan.rounding != "nearest_even":
        reasons.append(f"the plan rounds {plan.rounding} but ONNX QuantizeLinear rounds half to even: "
                       "re-plan with --rounding nearest_even")
    accs = {lp.acc_bits for lp in plan.layers.values() if lp.acc_bits}
    if accs and min(accs) < 32:
        reasons.append(f"{min(accs)}-bit accumulators are not expressible in QDQ (the runtime accumulates in float)")
    if worst > 0:
        reasons.append("the runtime sums products in float32 (24-bit mantissa); fixq sums exactly: large sums "
                       "can round differently and flip a requantization step")
    return {"images": n, "agreement_top1_pct": 100.0 * agree / max(n, 1), "max_diff_output_steps": worst,
            "outputs_differing": diff_outputs, "reasons": reasons}
