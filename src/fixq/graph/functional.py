"""Capture of torch functions and tensor methods (a mixin of :class:`fixq.graph.capture._Lowering`):
``F.conv2d``/``F.linear``, functional pools, ``torch.cat``, adds and multiplies, slicing,
``mean`` over the spatial axes, flatten/reshape/view, dropout and identities, and the ops
with no integer rule (softmax, LRN) that become :class:`~fixq.graph.ir.FloatOp`. The
methods call back into the lowering (``emit``, ``ref``, ``unsupported``...).

>>> pair(3), pair((1, 2))
((3, 3), (1, 2))
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as Fn

from .ir import AdaptiveAvgPool, Add, AvgPool, Clamp, Concat, Flatten, FloatOp, Linear, MaxPool, Pad, Slice

__all__ = ["FunctionLowering", "pair"]


def pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


_FLOAT_FUNCS = {Fn.softmax, torch.softmax, Fn.log_softmax, Fn.local_response_norm}
_MUL = {operator.mul, operator.imul, torch.mul}
_IDENTITY_FUNCS = {Fn.dropout, Fn.dropout2d}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_ADD = {operator.add, operator.iadd, torch.add}
_RELU_FUNCS = {Fn.relu, torch.relu}


class FunctionLowering:
    """Lowering of ``call_function`` and ``call_method`` fx nodes."""

    def lower_function(self, n: fx.Node) -> None:
        f = n.target
        args = n.args
        kw = n.kwargs
        if f in _ADD:
            ts = self.tensor_args(n)
            if len(ts) == 1 and len(args) == 2 and self.affine_const(
                    n, ts[0], self.const(args[1] if args[0] is ts[0] else args[0]), False):
                return
            if len(ts) != 2 or len(args) != 2:
                raise self.unsupported(n, "add with a constant (only tensor + tensor, or a per-channel "
                                          "constant, has an integer rule)")
            self.emit(n, Add, ts)
        elif f is torch.cat:
            xs = args[0]
            dim = self.const(args[1]) if len(args) > 1 else kw.get("dim", 0)
            nd = self.values[n.name].dim()
            if dim % nd != 1:
                raise self.unsupported(n, f"cat along dim {dim} (only channels, dim=1)")
            self.emit(n, Concat, list(xs), dim=1)
        elif f is torch.flatten:
            start = self.const(args[1]) if len(args) > 1 else kw.get("start_dim", 0)
            if start != 1:
                raise self.unsupported(n, f"flatten(start_dim={start})")
            self.flatten(n, args[0])
        elif f in _RELU_FUNCS:
            self.emit(n, Clamp, [args[0]], lo=0.0, hi=None)
        elif f is Fn.relu6:
            self.emit(n, Clamp, [args[0]], lo=0.0, hi=6.0)
        elif f is Fn.hardtanh:
            lo = self.const(args[1]) if len(args) > 1 else kw.get("min_val", -1.0)
            hi = self.const(args[2]) if len(args) > 2 else kw.get("max_val", 1.0)
            self.emit(n, Clamp, [args[0]], lo=float(lo), hi=float(hi))
        elif f is Fn.conv2d:
            c = [self.const(a) if not self.is_tensor(a) else a for a in args]
            get = lambda i, k, d: c[i] if len(c) > i else self.const(kw.get(k, d))  # noqa: E731
            self.conv(n, args[0], get(1, "weight", None), get(2, "bias", None), get(3, "stride", 1),
                      get(4, "padding", 0), get(5, "dilation", 1), get(6, "groups", 1))
        elif f is Fn.linear:
            w = self.const(args[1])
            b = self.const(args[2]) if len(args) > 2 else self.const(kw.get("bias"))
            self.emit(n, Linear, [args[0]], weight=w.detach().clone(), bias=None if b is None else b.detach().clone())
        elif f in (Fn.max_pool2d, Fn.avg_pool2d):
            self.lower_pool_fn(n)
        elif f is Fn.adaptive_avg_pool2d:
            self.adaptive(n, args[0], self.const(args[1]) if len(args) > 1 else kw["output_size"])
        elif f is Fn.pad:
            pads = tuple(self.const(args[1]) if len(args) > 1 else kw["pad"])
            mode = self.const(args[2]) if len(args) > 2 else kw.get("mode", "constant")
            value = self.const(args[3]) if len(args) > 3 else kw.get("value", 0)
            if mode != "constant" or (value or 0) != 0:
                raise self.unsupported(n, f"pad(mode={mode!r}, value={value!r}) (only zero padding)")
            self.emit(n, Pad, [args[0]], pads=pads)
        elif f is operator.getitem:
            if not self.chunk_piece(n):
                self.slice(n)
        elif f in _IDENTITY_FUNCS:
            self.alias[n.name] = self.ref(args[0])
        elif f in _FLOAT_FUNCS:
            self.float_fn(n, f)
        elif f in _MUL and len(self.tensor_args(n)) == 2 and len(args) == 2:
            self.mul(n, *self.tensor_args(n))
        elif f in _MUL and len(self.tensor_args(n)) == 1 and len(args) == 2 and self.affine_const(
                n, self.tensor_args(n)[0], self.const(args[1] if self.is_tensor(args[0]) else args[0]), True):
            pass
        elif f in _MUL:
            self.float_fn(n, f)
        elif self.lower_mobile_function(n, f):
            pass
        elif f is torch.mean:
            self.mean(n, args[0], args[1:], kw)
        else:
            raise self.unsupported(n, getattr(f, "__name__", str(f)))

    def lower_pool_fn(self, n) -> None:
        f, x = n.target, n.args[0]
        names = (["kernel_size", "stride", "padding", "dilation", "ceil_mode"] if f is Fn.max_pool2d
                 else ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"])
        p = {k: self.const(v) for k, v in zip(names, n.args[1:])}
        p.update({k: self.const(v) for k, v in n.kwargs.items()})
        k = pair(p["kernel_size"])
        s = pair(p.get("stride") or k)
        if f is Fn.max_pool2d:
            self.emit(n, MaxPool, [x], kernel=k, stride=s, padding=pair(p.get("padding", 0)),
                      dilation=pair(p.get("dilation", 1)), ceil_mode=bool(p.get("ceil_mode", False)))
        else:
            if p.get("divisor_override"):
                raise self.unsupported(n, "avg_pool2d(divisor_override)")
            self.emit(n, AvgPool, [x], kernel=k, stride=s, padding=pair(p.get("padding", 0)),
                      ceil_mode=bool(p.get("ceil_mode", False)),
                      count_include_pad=bool(p.get("count_include_pad", True)))

    def slice(self, n) -> None:
        x, idx = n.args[0], self.const(n.args[1])
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(i, slice) for i in idx):
            raise self.unsupported(n, f"indexing {idx!r} (only slices like x[:, :, ::2, ::2])")
        self.emit(n, Slice, [x], index=tuple((s.start, s.stop, s.step) for s in idx))

    def float_fn(self, n, f) -> None:
        ts = self.tensor_args(n)
        consts = [None if self.is_tensor(a) else self.const(a) for a in n.args]
        kw = {k: self.const(v) for k, v in n.kwargs.items()}

        def fn(*xs, _f=f, _c=tuple(consts), _kw=kw):
            it = iter(xs)
            return _f(*[next(it) if c is None else c for c in _c], **_kw)
        self.emit(n, FloatOp, ts, op=getattr(f, "__name__", str(f)), fn=fn)

    def mean(self, n, x, rest, kw) -> None:
        dims = self.const(rest[0]) if rest else self.const(kw.get("dim"))
        keep = self.const(rest[1]) if len(rest) > 1 else self.const(kw.get("keepdim", False))
        dims = tuple(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
        if self.values[x.name].dim() != 4 or sorted(dims) != [2, 3]:
            raise self.unsupported(n, f"mean over dims {dims} (only global average pooling over H, W)")
        node = AdaptiveAvgPool(self.name_for(n), (self.ref(x),), output_size=(1, 1))
        self.nodes.append(node)
        self.alias[n.name] = node.name
        if not keep:
            flat = Flatten(node.name + ".flatten", (node.name,))
            self.nodes.append(flat)
            self.alias[n.name] = flat.name

    def lower_method(self, n: fx.Node) -> None:
        m, x = n.target, n.args[0]
        if m in ("view", "reshape", "flatten"):
            self.flatten(n, x)
        elif m in _IDENTITY_METHODS and x.name in self.pending:
            self.pending[n.name] = self.pending[x.name]
        elif m in _IDENTITY_METHODS:
            self.alias[n.name] = self.ref(x)
        elif m in ("relu", "relu_"):
            self.emit(n, Clamp, [x], lo=0.0, hi=None)
        elif m in ("add", "add_", "__add__"):
            self.lower_function(fx.Node(n.graph, n.name, "call_function", operator.add, n.args, n.kwargs))
        elif m == "mean":
            self.mean(n, x, n.args[1:], n.kwargs)
        elif m in ("mul", "mul_", "__mul__"):
            self.lower_function(fx.Node(n.graph, n.name, "call_function", operator.mul, n.args, n.kwargs))
        elif m == "softmax":
            self.float_fn(n, getattr(torch, m))
        elif self.lower_mobile_method(n, m):
            pass
        else:
            raise self.unsupported(n, f"method .{m}()")
