"""Capture: trace an ``nn.Module`` with torch.fx and lower it to fixq's IR.

BatchNorm is folded into the preceding conv/linear (a standalone BatchNorm becomes a
depthwise 1x1 conv), dropout and identities disappear, ReLU/ReLU6/hardtanh fuse into the
producing conv/linear/add when that producer has no other user. Anything else raises
:class:`UnsupportedOpError` naming the node and the op, except a short list of ops with
no integer rule (sigmoid, softmax, LRN...) that become :class:`~fixq.graph.ir.FloatOp`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fixq.errors import FixqError
from .functional import FunctionLowering, pair
from .ir import (AdaptiveAvgPool, AvgPool, Clamp, Conv, Flatten, FloatOp, Graph, Input, Linear, MaxPool, Node, Pad,
                 run_float)
from .mobile import MobileLowering
from .onnx_lower import is_onnx2torch, lower_onnx
from .passes import fold_affine, fold_bn, fuse_acts, users_of

__all__ = ["capture", "UnsupportedOpError", "CaptureError"]


class CaptureError(FixqError):
    """The model cannot be captured as given (tracing failed, bad weights...)."""


class UnsupportedOpError(CaptureError):
    """A node uses an op fixq has no rule for."""


_FLOAT_MODULES = (nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm)
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.AlphaDropout)


class _Lowering(FunctionLowering, MobileLowering):
    """One pass over the traced fx graph producing IR nodes (torch functions and tensor
    methods: :class:`fixq.graph.functional.FunctionLowering`; table functions, multiply,
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
            self.emit(n, MaxPool, [x], kernel=pair(m.kernel_size), stride=pair(m.stride or m.kernel_size),
                      padding=pair(m.padding), dilation=pair(m.dilation), ceil_mode=m.ceil_mode)
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override:
                raise self.unsupported(n, "AvgPool2d(divisor_override)")
            self.emit(n, AvgPool, [x], kernel=pair(m.kernel_size), stride=pair(m.stride or m.kernel_size),
                      padding=pair(m.padding), ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad)
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
                  stride=pair(stride), padding=pair(padding), dilation=pair(dilation), groups=int(groups))

    def adaptive(self, n, x, size) -> None:
        in_hw = tuple(self.values[x.name].shape[-2:])
        size = pair(size)
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
