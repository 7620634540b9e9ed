"""Lowering of onnx2torch's own modules (kept as fx leaves when an imported ONNX graph is
traced) to fixq's IR; ``low`` is the :class:`fixq.graph.capture._Lowering` in progress."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .ir import Add, Concat, FloatOp, Pad, Slice

__all__ = ["is_onnx2torch", "lower_onnx"]


def is_onnx2torch(m: nn.Module) -> bool:
    """A module onnx2torch generated (fixq lowers these by type instead of tracing into them)."""
    return type(m).__module__.startswith("onnx2torch.")


def lower_onnx(low, n: fx.Node, m: nn.Module) -> None:
    """onnx2torch's own modules (kept as leaves when tracing an imported ONNX graph)."""
    kind = type(m).__name__
    ts = low.tensor_args(n)
    if kind == "OnnxConcat":
        if m.axis % low.values[n.name].dim() != 1:
            raise low.unsupported(n, f"ONNX Concat along axis {m.axis} (only channels, axis=1)")
        low.emit(n, Concat, ts, dim=1)
    elif kind == "OnnxReshape" or kind == "OnnxFlatten":
        low.flatten(n, ts[0])
    elif kind.startswith("OnnxGlobalAveragePool"):
        low.adaptive(n, ts[0], 1)
    elif kind in ("OnnxSum", "OnnxBinaryMathOperation") and len(ts) == 2 and \
            getattr(m, "math_op_function", torch.add) in (torch.add, operator.add) and len(n.args) == 2:
        low.emit(n, Add, ts)
    elif kind.startswith("OnnxSoftmax"):
        low.emit(n, FloatOp, ts, op="Softmax", fn=m)
    elif kind == "OnnxSlice":
        onnx_slice(low, n, ts[0], [low.const(a) for a in n.args[1:]])
    elif kind in ("OnnxPadStatic", "OnnxPadDynamic"):
        value = m.constant_value if kind == "OnnxPadStatic" else (low.const(n.args[2]) if len(n.args) > 2 else 0)
        if m.mode != "constant" or float(value or 0.0) != 0.0:
            raise low.unsupported(n, f"ONNX Pad mode={m.mode!r} value={value} (only zero padding)")
        if kind == "OnnxPadStatic":
            pads = list(m.pads)
        else:
            on = [int(v) for v in torch.as_tensor(low.const(n.args[1])).tolist()]
            r = len(on) // 2
            pads = [v for ax in reversed(range(r)) for v in (on[ax], on[ax + r])]
        while pads and pads[-1] == 0 and pads[-2] == 0 and len(pads) > 2:
            pads = pads[:-2]
        low.emit(n, Pad, [ts[0]], pads=tuple(int(v) for v in pads))
    else:
        raise low.unsupported(n, f"ONNX op converted to {kind} at '{n.target}'")


def onnx_slice(low, n: fx.Node, x: fx.Node, consts) -> None:
    shape = tuple(low.values[x.name].shape)
    starts, ends = [int(v) for v in torch.as_tensor(consts[0]).tolist()], [int(v) for v in torch.as_tensor(consts[1]).tolist()]
    axes = list(range(len(starts))) if len(consts) < 3 or consts[2] is None else \
        [int(v) % len(shape) for v in torch.as_tensor(consts[2]).tolist()]
    steps = [1] * len(starts) if len(consts) < 4 or consts[3] is None else [int(v) for v in torch.as_tensor(consts[3]).tolist()]
    index = [(None, None, None)] * (max(axes) + 1)
    for a, s0, e, st in zip(axes, starts, ends, steps):
        if a == 0 or st <= 0:
            raise low.unsupported(n, "ONNX Slice on the batch axis or with a negative step")
        s0, e, _ = slice(s0, e, st).indices(shape[a])
        index[a] = (s0, e, st)
    low.emit(n, Slice, [x], index=tuple(index))
