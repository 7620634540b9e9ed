"""Capture of the ops of today's mobile CNNs (a mixin of :class:`fixq.graph.capture._Lowering`):
unary element-wise functions (sigmoid, hardsigmoid, hardswish, SiLU, tanh, GELU, ...) become
:class:`~fixq.graph.ir.Table` nodes, tensor x tensor products (squeeze-and-excitation) become
:class:`~fixq.graph.ir.Mul`, ShuffleNet's reshape/transpose/reshape becomes
:class:`~fixq.graph.ir.ChannelShuffle`, ``x.chunk(k, dim)`` pieces become slices, and
torchvision's ``stochastic_depth`` in eval mode is the identity.

>>> g = capture(torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64))  # doctest: +SKIP
>>> sorted({n.op for n in g.nodes if n.kind == "table"})                            # doctest: +SKIP
['hardsigmoid', 'hardswish']
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as Fn

from .ir import ChannelShuffle, Conv, Mul, Slice, Table

__all__ = ["MobileLowering", "TABLE_MODULES", "TABLE_FUNCS"]

# module type -> (op, alpha from the module)
TABLE_MODULES = {
    nn.Sigmoid: lambda m: ("sigmoid", None), nn.Hardsigmoid: lambda m: ("hardsigmoid", None),
    nn.Hardswish: lambda m: ("hardswish", None), nn.SiLU: lambda m: ("silu", None), nn.Tanh: lambda m: ("tanh", None),
    nn.GELU: lambda m: ("gelu_tanh" if m.approximate == "tanh" else "gelu", None), nn.Mish: lambda m: ("mish", None),
    nn.ELU: lambda m: ("elu", float(m.alpha)), nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.Softplus: lambda m: ("softplus", None) if (m.beta, m.threshold) == (1, 20) else None,
}
TABLE_FUNCS = {torch.sigmoid: "sigmoid", Fn.sigmoid: "sigmoid", Fn.hardsigmoid: "hardsigmoid",
               Fn.hardswish: "hardswish", Fn.silu: "silu", torch.tanh: "tanh", Fn.tanh: "tanh", Fn.gelu: "gelu",
               Fn.mish: "mish", Fn.elu: "elu", Fn.leaky_relu: "leaky_relu", Fn.softplus: "softplus"}
_ALPHA_ARG = {"elu": ("alpha", 1.0), "leaky_relu": ("negative_slope", 0.01)}
_CHUNKS = {"chunk", "split", "tensor_split"}


class MobileLowering:
    """Lowering rules for mobile-CNN ops; each ``lower_mobile_*`` returns False when the
    node is not one of them."""

    def table(self, n: fx.Node, x, op: str, alpha=None) -> None:
        self.emit(n, Table, [x], op=op, alpha=alpha)

    def mul(self, n: fx.Node, a, b) -> None:
        sa, sb = tuple(self.values[a.name].shape), tuple(self.values[b.name].shape)
        if len(sa) != len(sb) or sa[:2] != sb[:2] or not (sa == sb or all(d == 1 for d in sa[2:])
                                                          or all(d == 1 for d in sb[2:])):
            raise self.unsupported(n, f"multiply {sa} x {sb} (only equal shapes, or a (N, C, 1, 1) "
                                      "per-channel factor broadcast over H, W)")
        self.emit(n, Mul, [a, b])

    def affine_const(self, n: fx.Node, x, c, is_mul: bool) -> bool:
        """``x * c`` / ``x + c`` with a per-channel (or scalar) constant c on NCHW data (Caffe's
        Scale layer): a depthwise 1x1 conv, later folded into its producer (exact in float64,
        as BatchNorm folding). False when c's shape is not per channel."""
        xs = tuple(self.values[x.name].shape)
        c = torch.as_tensor(c)
        per_channel = c.numel() == 1 or (len(xs) == 4 and tuple(c.shape) in ((xs[1], 1, 1), (1, xs[1], 1, 1)))
        if len(xs) != 4 or not c.is_floating_point() or not per_channel:
            return False
        C = xs[1]
        dt = self.values[x.name].dtype
        v = c.detach().reshape(-1).expand(C).clone().to(dt)
        w = v.reshape(C, 1, 1, 1) if is_mul else torch.ones(C, 1, 1, 1, dtype=dt)
        self.emit(n, Conv, [x], weight=w, bias=None if is_mul else v, groups=C)
        self.affine.add(self.alias[n.name])
        return True

    def lower_mobile_module(self, n: fx.Node, m: nn.Module) -> bool:
        rule = TABLE_MODULES.get(type(m))
        if rule is not None and rule(m) is not None:
            self.table(n, n.args[0], *rule(m))
            return True
        if isinstance(m, nn.ChannelShuffle):
            self.emit(n, ChannelShuffle, [n.args[0]], groups=int(m.groups))
            return True
        if type(m).__name__ == "StochasticDepth" and not m.training:
            self.alias[n.name] = self.ref(n.args[0])
            return True
        if type(m).__name__ == "OnnxBinaryMathOperation" and len(n.args) == 2:
            op = getattr(m, "math_op_function", None)
            ts = self.tensor_args(n)
            if op in (torch.mul, operator.mul) and len(ts) == 2:
                self.mul(n, *ts)
                return True
            if op in (torch.mul, torch.add, operator.mul, operator.add) and len(ts) == 1:
                c = n.args[1] if n.args[0] is ts[0] else n.args[0]
                return self.affine_const(n, ts[0], self.const(c), op in (torch.mul, operator.mul))
            return False
        if type(m).__name__ == "OnnxTranspose":
            return self.transpose_shuffle(n, n.args[0], list(m.perm) if m.perm is not None else None)
        return False

    def lower_mobile_function(self, n: fx.Node, f) -> bool:
        args, kw = n.args, n.kwargs
        if f in TABLE_FUNCS:
            op = TABLE_FUNCS[f]
            if f is Fn.gelu and self.const(kw.get("approximate", "none")) == "tanh":
                op = "gelu_tanh"
            alpha = None
            if op in _ALPHA_ARG:
                k, d = _ALPHA_ARG[op]
                alpha = float(self.const(args[1]) if len(args) > 1 else self.const(kw.get(k, d)))
            if op == "softplus" and (len(args) > 1 or kw.get("beta", 1) != 1 or kw.get("threshold", 20) != 20):
                raise self.unsupported(n, "softplus with beta/threshold")
            self.table(n, args[0], op, alpha)
            return True
        if f in (torch.channel_shuffle, getattr(Fn, "channel_shuffle", None)):
            g = self.const(args[1]) if len(args) > 1 else self.const(kw["groups"])
            self.emit(n, ChannelShuffle, [args[0]], groups=int(g))
            return True
        if getattr(f, "__name__", "") == "stochastic_depth":
            training = self.const(args[3]) if len(args) > 3 else self.const(kw.get("training", True))
            if training:
                raise self.unsupported(n, "stochastic_depth in training mode (call model.eval())")
            self.alias[n.name] = self.ref(args[0])
            return True
        if f is torch.transpose:
            return self.transpose_shuffle(n, args[0], (self.const(args[1]), self.const(args[2])))
        return False

    def lower_mobile_method(self, n: fx.Node, m: str) -> bool:
        x = n.args[0]
        if m in ("sigmoid", "tanh"):
            self.table(n, x, m)
            return True
        if m == "transpose":
            return self.transpose_shuffle(n, x, (self.const(n.args[1]), self.const(n.args[2])))
        if m == "permute":
            return self.transpose_shuffle(n, x, list(self.const(n.args[1:]) if len(n.args) > 2 else self.const(n.args[1])))
        return False

    # ---- channel shuffle: reshape (N, g, C/g, H, W) -> transpose(1, 2) -> reshape (N, C, H, W) --
    def reshape_shuffle(self, n: fx.Node, x) -> bool:
        xs, ys = tuple(self.values[x.name].shape), tuple(self.values[n.name].shape)
        p = self.pending.get(x.name)
        if p is None:
            if len(xs) == 4 and len(ys) == 5 and ys[0] == xs[0] and ys[1] * ys[2] == xs[1] and ys[3:] == xs[2:]:
                self.pending[n.name] = ("split", x, ys[1])
                return True
            return False
        if p[0] == "shuffled" and ys == tuple(self.values[p[1].name].shape):
            self.emit(n, ChannelShuffle, [p[1]], groups=p[2])
            return True
        raise self.unsupported(n, f"reshape {xs} -> {ys} after a channel split (only a channel shuffle back to "
                                  "(N, C, H, W))")

    def transpose_shuffle(self, n: fx.Node, x, dims) -> bool:
        p = self.pending.get(x.name)
        if dims is None or p is None:
            return False
        swap = sorted(d % 5 for d in dims) == [1, 2] if len(dims) == 2 else list(dims) == [0, 2, 1, 3, 4]
        if p[0] != "split" or not swap:
            raise self.unsupported(n, f"transpose {dims} of a channel split (only dims 1 and 2: channel shuffle)")
        self.pending[n.name] = ("shuffled", p[1], p[2])
        return True

    # ---- x.chunk(k, dim) / x.split(s, dim) pieces ---------------------------------------
    def chunk_piece(self, n: fx.Node) -> bool:
        src, k = n.args[0], n.args[1]
        if not isinstance(src, fx.Node) or not isinstance(k, int):
            return False
        is_chunk = (src.op == "call_method" and src.target in _CHUNKS) or \
            (src.op == "call_function" and src.target in (torch.chunk, torch.split, torch.tensor_split))
        if not is_chunk:
            return False
        x = src.args[0]
        pieces = self.values[src.name]
        dim = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
        dim = int(self.const(dim)) % self.values[x.name].dim()
        if dim == 0:
            raise self.unsupported(n, "chunk/split along the batch dimension")
        k = k % len(pieces)
        start = sum(int(p.shape[dim]) for p in pieces[:k])
        index = [(None, None, None)] * (dim + 1)
        index[dim] = (start, start + int(pieces[k].shape[dim]), 1)
        self.emit(n, Slice, [x], index=tuple(index))
        return True
