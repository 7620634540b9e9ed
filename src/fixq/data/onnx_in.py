"""ONNX models in: an ``.onnx`` file becomes a torch.fx GraphModule through ``onnx2torch``,
then follows fixq's normal capture/calibrate/plan/simulate flow.

Before conversion the graph is canonicalised (no home-made interpreter: every rewrite is
exact): constant subgraphs (e.g. ``ConstantOfShape`` weights) are folded into
initializers with ONNX's reference evaluator, Dropout (identity at inference) is removed,
an AveragePool whose window covers its whole input is a GlobalAveragePool, shapes are
inferred. After conversion, a ``-inf`` pad in front of a max pool (ONNX's asymmetric
pooling pads) becomes ``ceil_mode`` where that is the same window set, and a trailing
Softmax is dropped when asked (argmax, hence top-1/top-5, is unchanged).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from fixq.errors import FixqError

if TYPE_CHECKING:
    import onnx

__all__ = ["OnnxImportError", "load_onnx", "onnx_input_shape", "prepare_onnx", "redraw_weights"]


class OnnxImportError(FixqError):
    """An ONNX file fixq cannot import (missing, not ONNX, an op without a converter)."""


def _read(path) -> "onnx.ModelProto":
    import onnx
    p = Path(path)
    if not p.is_file():
        raise OnnxImportError(f"ONNX file {path} does not exist")
    try:
        m = onnx.load(str(p))
    except Exception as e:  # protobuf raises DecodeError and friends
        raise OnnxImportError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None
    if not m.graph.node:
        raise OnnxImportError(f"{path} is not an ONNX model (no graph nodes)")
    return m


def _data_inputs(m) -> list:
    inits = {i.name for i in m.graph.initializer}
    return [i for i in m.graph.input if i.name not in inits]


def onnx_input_shape(path) -> tuple[int, ...] | None:
    """``(C, H, W)`` of the model's single data input, or None when it is dynamic."""
    ins = _data_inputs(_read(path))
    if len(ins) != 1:
        raise OnnxImportError(f"{path}: fixq models take one input tensor, the graph has {len(ins)}")
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in ins[0].type.tensor_type.shape.dim]
    return tuple(dims[1:]) if len(dims) >= 2 and all(d > 0 for d in dims[1:]) else None


def prepare_onnx(m):
    """Fold constants, drop Dropout, canonicalise whole-input average pools, infer shapes."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    opsets = {d.domain: d.version for d in m.opset_import}
    keep, rename = [], {}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
        if n.op_type == "Dropout":
            rename[n.output[0]] = n.input[0]
            continue
        if n.input and all((not i) or i in consts for i in n.input):
            # the model's own opsets: a bare node would run under the newest one (Unsqueeze's
            # axes moved from attribute to input in opset 13)
            sub = onnx.helper.make_graph([n], "fold", [onnx.helper.make_empty_tensor_value_info(i) for i in n.input if i],
                                         [onnx.helper.make_empty_tensor_value_info(o) for o in n.output])
            outs = ReferenceEvaluator(sub, opsets=opsets).run(None, {i: consts[i] for i in n.input if i})
            for o, v in zip(n.output, outs):
                consts[o] = np.asarray(v)
            continue
        keep.append(n)
    for o in g.output:
        if o.name in rename:
            o.name = rename[o.name]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items() if k in used)
    inits = {i.name for i in g.initializer}
    ins = [i for i in g.input if i.name not in inits and i.name in used]
    del g.input[:]
    g.input.extend(ins)
    # a batch of any size: the data input's batch dim becomes symbolic, and a Reshape to a
    # constant shape that starts with that batch size (1) copies the batch dim instead (0)
    for i in list(g.input)[:1]:  # (protobuf extend() copied: edit the graph's own messages)
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "N"
        for o in g.output:
            od = o.type.tensor_type.shape.dim
            if od and od[0].HasField("dim_value") and od[0].dim_value == 1:
                od[0].dim_param = "N"
    for n in g.node:
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in consts:
            shp = consts[n.input[1]]
            if shp.ndim == 1 and shp.size >= 2 and shp[0] == 1:
                new = shp.copy()
                new[0] = 0
                name = n.input[1] + "__fixq_batch"
                g.initializer.append(numpy_helper.from_array(new.astype(np.int64), name))
                n.input[1] = name
    del g.value_info[:]  # stale, shapeless entries would block inference
    m.ir_version = max(m.ir_version, 7)  # initializers need not be graph inputs
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.input)}
    for n in m.graph.node:
        if n.op_type == "AveragePool":
            at = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            s, k = shapes.get(n.input[0]), at.get("kernel_shape")
            p = at.get("pads", [0] * 4)
            if s and len(s) == 4 and k and not at.get("count_include_pad", 0) and \
                    all(s[2 + i] <= k[i] <= s[2 + i] + p[i] + p[i + 2] for i in range(2)):
                n.op_type = "GlobalAveragePool"  # one window over the whole input: the same mean
                del n.attribute[:]
    return m


def _convert(m):
    """onnx2torch, one node at a time first so that a failure names the ONNX node."""
    from onnx2torch import convert
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    opsets = {o.domain: o.version for o in m.opset_import}
    og = OnnxGraph(m.graph)
    for name, node in og.nodes.items():
        try:
            get_converter(node.operation_type, opsets.get(node.domain, opsets.get("", 1)), node.domain)(node, og)
        except Exception as e:
            raise OnnxImportError(f"ONNX node '{node.name or name}' (op {node.operation_type}) cannot be imported: "
                                  f"{e}") from None
    return convert(m)


def _fix_pad_maxpool(tm: nn.Module, x: torch.Tensor) -> None:
    """``Sequential(pad -inf at the end, MaxPool2d)`` -> ``MaxPool2d(ceil_mode=True)`` when
    both give the same output size (then the windows are the same)."""
    seen = {}
    def hook(k):
        def h(mod, i, o):
            seen[k] = (i[0].shape, o.shape)
        return h
    hooks = [m.register_forward_hook(hook(k)) for k, m in tm.named_modules() if isinstance(m, nn.Sequential)]
    with torch.no_grad():
        tm.eval()(x)  # eval: a training-mode BatchNorm would overwrite its running statistics
    for h in hooks:
        h.remove()
    for name, m in list(tm.named_modules()):
        if not (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.MaxPool2d)
                and type(m[0]).__name__ == "OnnxPadStatic" and name in seen):
            continue
        pad, pool = m[0], m[1]
        if not (pad.constant_value == float("-inf") and pool.padding in (0, (0, 0))):
            continue
        ceil = nn.MaxPool2d(pool.kernel_size, pool.stride, 0, pool.dilation, ceil_mode=True)
        with torch.no_grad():
            if ceil(torch.zeros(seen[name][0])).shape == seen[name][1]:
                parent = tm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tm
                setattr(parent, name.rsplit(".", 1)[-1], ceil)


def load_onnx(path, input_shape: tuple[int, ...] | None = None, drop_softmax: bool = True) -> nn.Module:
    """Import an ONNX file as a torch module fixq can capture; ``module.fixq_notes`` says
    what was changed (e.g. a dropped trailing Softmax).

    >>> net = load_onnx("model.onnx")        # doctest: +SKIP
    >>> graph = capture(net, torch.zeros(1, *net.fixq_input_shape))   # doctest: +SKIP
    """
    m = _read(path)
    shape = input_shape or onnx_input_shape(path)
    if shape is None:
        raise OnnxImportError(f"{path} has a dynamic input shape: give --input-shape C,H,W")
    m = prepare_onnx(m)
    notes = []
    last = m.graph.node[-1]
    if drop_softmax and last.op_type == "Softmax" and last.output[0] == m.graph.output[0].name:
        m.graph.output[0].name = last.input[0]
        del m.graph.node[-1]
        notes.append(f"trailing Softmax '{last.name or last.output[0]}' dropped: outputs are logits "
                     "(argmax, top-1 and top-5 unchanged)")
    tm = _convert(m)
    _fix_pad_maxpool(tm, torch.zeros(1, *shape))
    tm.fixq_notes = notes
    tm.fixq_input_shape = tuple(shape)
    return tm.eval()


def redraw_weights(m, seed: int = 0):
    """Replace every float weight of Conv/Gemm/BatchNormalization by seeded random values
    of the same shape (He-scaled weights, positive variances); other initializers stay.
    Used to test graphs that ship with constant placeholder weights."""
    from onnx import numpy_helper
    rng = np.random.default_rng(seed)
    role = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            role[n.input[1]] = ("w", n.op_type, trans_b)
            if len(n.input) > 2 and n.input[2]:
                role[n.input[2]] = ("b",)
        elif n.op_type == "BatchNormalization":
            for k, r in zip(n.input[1:5], ("scale", "shift", "mean", "var")):
                role[k] = (r,)
    out = []
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        r = role.get(init.name)
        if r is None or a.dtype.kind != "f":
            out.append(init)
            continue
        if r[0] == "w":
            fan_in = int(np.prod(a.shape[1:])) if r[1] == "Conv" else (a.shape[1] if r[2] else a.shape[0])
            v = rng.standard_normal(a.shape) * np.sqrt(2.0 / max(fan_in, 1))
        elif r[0] in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, a.shape)
        else:
            v = rng.standard_normal(a.shape) * 0.1
        out.append(numpy_helper.from_array(v.astype(a.dtype), init.name))
    del m.graph.initializer[:]
    m.graph.initializer.extend(out)
    return m
