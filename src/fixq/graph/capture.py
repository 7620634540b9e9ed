"""Capture: trace an ``nn.Module`` with torch.fx and lower it to fixq's IR.

BatchNorm is folded into the preceding conv/linear (a standalone BatchNorm becomes a
depthwise 1x1 conv), dropout and identities disappear, ReLU/ReLU6/hardtanh fuse into the
producing conv/linear/add when that producer has no other user. Anything else raises
:class:`UnsupportedOpError` naming the node and the op, except a short list of ops with
no integer rule (sigmoid, softmax, LRN...) that become :class:`~fixq.graph.ir.FloatOp`.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.errors import FixqError
from .ir import (AdaptiveAvgPool, Add, AvgPool, Clamp, Concat, Conv, Flatten, FloatOp, Graph, Input, Linear, MaxPool,
                 Node, Pad, Slice, run_float)
from .mobile import MobileLowering
from .onnx_lower import is_onnx2torch, lower_onnx
from .passes import fold_affine, fold_bn, fuse_acts, users_of

__all__ = ["capture", "UnsupportedOpError", "CaptureError"]


class CaptureError(FixqError):
    """The model cannot be captured as given (tracing failed, bad weights...)."""


class UnsupportedOpError(CaptureError):
    """A node uses an op fixq has no rule for."""


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


_FLOAT_MODULES = (nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm)
_FLOAT_FUNCS = {Fn.softmax, torch.softmax, Fn.log_softmax, Fn.local_response_norm}
_MUL = {operator.mul, operator.imul, torch.mul}
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.AlphaDropout)
_IDENTITY_FUNCS = {Fn.dropout, Fn.dropout2d}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_ADD = {operator.add, operator.iadd, torch.add}
_RELU_FUNCS = {Fn.relu, torch.relu}


class _Lowering(MobileLowering):
    """One pass over the traced fx graph producing IR nodes (table functions, multiply,
    channel shuffle and chunks: :class:`fixq.graph.mobile.MobileLowering`)."""

    def __init__(self, gm: fx.GraphModule, values: dict[str, Any]):
        self.gm = gm
        self.values = values          # concrete value of every fx node on the example input
        self.alias: dict[str, str] = {}  # fx node name -> IR node name
        self.nodes: list[Node] = []
        self.bns: dict[str, tuple[str, nn.Module]] = {}
        self.used_names: set[str] = set()
        self.dep: set[str] = set()
        self.input: str | None = None
        self.output: str | None = None
        self.pending: dict[str, tuple] = {}  # fx node -> a channel shuffle in progress
        self.affine: set[str] = set()  # depthwise 1x1 convs from x * c / x + c (per-channel constants)

    # ---- helpers -------------------------------------------------------------------
    def is_tensor(self, a) -> bool:
        """A runtime tensor: computed from the model input (parameters and anything computed
        only from them are constants, folded through const())."""
        v = self.values.get(a.name) if isinstance(a, fx.Node) else None
        # integer tensors from the input are shape arithmetic (ONNX Shape/Gather/Concat): constants
        return isinstance(v, torch.Tensor) and a.name in self.dep and v.is_floating_point()

    def const(self, a):
        """Concrete value of an argument (fx nodes resolved from the example run)."""
        if isinstance(a, fx.Node):
            return self.values[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.const(v) for v in a)
        return a

    def ref(self, a: fx.Node) -> str:
        if a.name in self.pending:
            raise UnsupportedOpError(f"node '{a.name}' reshapes/transposes channels in a way fixq has no rule for: "
                                     "only ShuffleNet's channel shuffle (reshape (N, g, C/g, H, W), transpose(1, 2), "
                                     "reshape back to (N, C, H, W)) is supported")
        return self.alias[a.name]

    def name_for(self, n: fx.Node) -> str:
        base = n.target if n.op == "call_module" else n.name
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def emit(self, n: fx.Node, cls, inputs, **kw) -> None:
        node = cls(self.name_for(n), tuple(self.ref(i) for i in inputs), **kw)
        self.nodes.append(node)
        self.alias[n.name] = node.name

    def unsupported(self, n: fx.Node, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(
            f"node '{n.name}' ({n.op} {what}) is not supported by fixq: it has no fixed-point "
            f"rule. Replace it with a supported op (conv, linear, BatchNorm, ReLU/ReLU6, "
            f"max/avg pool, add, multiply, cat, flatten, pad, slicing, channel shuffle, or an "
            f"element-wise function such as sigmoid/hardswish/SiLU/tanh/GELU), or wrap the model "
            f"so that this op runs outside the part you quantize.")

    def tensor_args(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.args if self.is_tensor(a)]

    # ---- lowering --------------------------------------------------------------------
    def lower(self) -> None:
        self.dep = set()
        for n in self.gm.graph.nodes:
            if n.op == "placeholder" or any(a.name in self.dep for a in n.all_input_nodes):
                self.dep.add(n.name)
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if self.input is not None:
                    raise CaptureError("fixq models take exactly one input tensor; "
                                       f"found a second input '{n.name}'")
                node = Input(n.name, (), shape=tuple(self.values[n.name].shape))
                self.nodes.append(node)
                self.alias[n.name] = n.name
                self.used_names.add(n.name)
                self.input = n.name
            elif n.op == "get_attr":
                continue
            elif n.op == "output":
                out = n.args[0]
                if isinstance(out, (tuple, list)):
                    if len(out) != 1:
                        raise CaptureError("fixq models must return a single tensor "
                                           f"(the model returns {len(out)} values)")
                    out = out[0]
                if not self.is_tensor(out):
                    raise CaptureError("the model output is not a tensor")
                self.output = self.ref(out)
            elif not self.is_tensor(n):
                continue  # constants and shape arithmetic (x.size(0) ...), resolved by const()
            elif n.op == "call_module":
                self.lower_module(n, self.gm.get_submodule(n.target))
            elif n.op == "call_function":
                self.lower_function(n)
            elif n.op == "call_method":
                self.lower_method(n)
            else:
                raise self.unsupported(n, str(n.target))

    def lower_module(self, n: fx.Node, m: nn.Module) -> None:
        x = n.args[0]
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise self.unsupported(n, f"Conv2d(padding_mode={m.padding_mode!r})")
            self.conv(n, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.Linear):
            self.emit(n, Linear, [x], weight=m.weight.detach().clone(),
                      bias=None if m.bias is None else m.bias.detach().clone())
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self.emit(n, Conv, [x], weight=None)  # placeholder, folded below
            self.bns[self.alias[n.name]] = (self.ref(x), m)
        elif isinstance(m, nn.ReLU):
            self.emit(n, Clamp, [x], lo=0.0, hi=None)
        elif isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
            self.emit(n, Clamp, [x], lo=float(lo), hi=float(hi))
        elif isinstance(m, nn.MaxPool2d):
            self.emit(n, MaxPool, [x], kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                      padding=_pair(m.padding), dilation=_pair(m.dilation), ceil_mode=m.ceil_mode)
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override:
                raise self.unsupported(n, "AvgPool2d(divisor_override)")
            self.emit(n, AvgPool, [x], kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                      padding=_pair(m.padding), ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.adaptive(n, x, m.output_size)
        elif isinstance(m, _IDENTITY_MODULES):
            self.alias[n.name] = self.ref(x)
        elif isinstance(m, nn.Flatten):
            self.flatten(n, x)
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            if float(getattr(m, "value", 0.0)) != 0.0:
                raise self.unsupported(n, "ConstantPad2d with a non-zero value")
            self.emit(n, Pad, [x], pads=tuple(m.padding))
        elif isinstance(m, _FLOAT_MODULES):
            self.emit(n, FloatOp, self.tensor_args(n), op=type(m).__name__, fn=m)
        elif self.lower_mobile_module(n, m):
            pass
        elif is_onnx2torch(m):
            lower_onnx(self, n, m)
        else:
            raise self.unsupported(n, f"module {type(m).__name__} at '{n.target}'")

    def conv(self, n, x, weight, bias, stride, padding, dilation, groups) -> None:
        w = self.const(weight) if isinstance(weight, fx.Node) else weight
        b = self.const(bias) if isinstance(bias, fx.Node) else bias
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:
                raise self.unsupported(n, f"conv padding={padding!r} (use explicit padding)")
        self.emit(n, Conv, [x], weight=w.detach().clone(), bias=None if b is None else b.detach().clone(),
                  stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=int(groups))

    def adaptive(self, n, x, size) -> None:
        in_hw = tuple(self.values[x.name].shape[-2:])
        size = _pair(size)
        size = tuple(in_hw[i] if size[i] is None else size[i] for i in range(2))
        self.emit(n, AdaptiveAvgPool, [x], output_size=size)

    def flatten(self, n, x) -> None:
        if self.reshape_shuffle(n, x):
            return
        xs, ys = self.values[x.name].shape, self.values[n.name].shape
        if len(ys) == 2 and ys[0] == xs[0] and ys[1] == xs[1:].numel():
            if len(xs) == 2:
                self.alias[n.name] = self.ref(x)
            else:
                self.emit(n, Flatten, [x])
        else:
            raise self.unsupported(n, f"reshape {tuple(xs)} -> {tuple(ys)} (only flattening to (batch, -1))")

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
        k = _pair(p["kernel_size"])
        s = _pair(p.get("stride") or k)
        if f is Fn.max_pool2d:
            self.emit(n, MaxPool, [x], kernel=k, stride=s, padding=_pair(p.get("padding", 0)),
                      dilation=_pair(p.get("dilation", 1)), ceil_mode=bool(p.get("ceil_mode", False)))
        else:
            if p.get("divisor_override"):
                raise self.unsupported(n, "avg_pool2d(divisor_override)")
            self.emit(n, AvgPool, [x], kernel=k, stride=s, padding=_pair(p.get("padding", 0)),
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


class _Tracer(fx.Tracer):
    """fx's tracer, with onnx2torch's converter modules as leaves (their forwards branch
    on attributes; fixq lowers them by type)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_onnx2torch(m) or super().is_leaf_module(m, qualname)


def capture(model: nn.Module, example: torch.Tensor, check: bool = True) -> Graph:
    """Trace ``model`` (put in eval mode) and lower it to a :class:`~fixq.graph.ir.Graph`.

    >>> g = capture(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))  # doctest: +SKIP
    >>> [n.kind for n in g.nodes][:3]                                          # doctest: +SKIP
    ['input', 'conv', 'maxpool']
    """
    model = model.eval()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            layer = name.rsplit(".", 1)[0]
            raise CaptureError(f"layer '{layer}' has NaN or Inf in '{name}': fix or retrain the weights")
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as e:  # fx raises many types; all mean the same to the user
        raise CaptureError(f"torch.fx could not trace {type(model).__name__}: {e}. fixq needs a model "
                           f"without data-dependent control flow in forward().") from e
    values: dict[str, Any] = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            values[n.name] = v
            return v

    with torch.no_grad():
        ref = Rec(gm).run(example)
    low = _Lowering(gm, values)
    low.lower()
    nodes = low.nodes
    users = users_of(nodes, low.output)
    nodes, r1 = fold_bn(nodes, low.bns, users)
    output = r1.get(low.output, low.output)
    nodes, r1 = fold_affine(nodes, low.affine, users_of(nodes, output))
    output = r1.get(output, output)
    nodes, r2 = fuse_acts(nodes, users_of(nodes, output))
    output = r2.get(output, output)
    graph = Graph(nodes, low.input, output)
    graph.notes = list(getattr(model, "fixq_notes", []))
    with torch.no_grad():
        env = run_float(graph, example, keep=True)
    graph.shapes = {k: tuple(v.shape[1:]) for k, v in env.items()}
    if check:
        ref_t = ref[0] if isinstance(ref, (tuple, list)) else ref
        diff = (env[output] - ref_t).abs().max().item()
        scale = max(1.0, ref_t.abs().max().item())
        # a wrong rule gives O(1) relative errors; float32 reordering noise stays far below this
        if not diff <= 1e-3 * scale:
            raise CaptureError(f"captured graph differs from the model by {diff:.3g} (max abs); "
                               "please report this model")
    return graph
