"""fixq's graph IR: a topologically ordered list of typed op nodes (DESIGN.md §1, §5).

Each node names its tensor inputs; weights live on the node. Simulation, integer engine
and C export each keep one registry keyed on these node classes, and a test checks the
registries cover the same op set. ``run_float`` is the reference float interpreter that
capture is checked against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as Fn

__all__ = [
    "Node", "Input", "Conv", "Linear", "Add", "Concat", "MaxPool", "AvgPool",
    "AdaptiveAvgPool", "Clamp", "Pad", "Slice", "Flatten", "FloatOp", "Table", "Mul", "ChannelShuffle",
    "UNARY_FUNCS", "NONNEG_UNARY", "shuffle_perm", "Graph",
    "FLOAT_RULES", "run_float", "apply_act", "pre_activation", "QUANT_POINTS", "nonnegative_nodes",
]


@dataclass
class Node:
    name: str
    inputs: tuple[str, ...]

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()


@dataclass
class Input(Node):
    shape: tuple[int, ...] = ()


@dataclass
class Conv(Node):
    """2D convolution; ``act`` is a fused clamp ``(lo, hi)`` (ReLU: ``(0, None)``)."""
    weight: torch.Tensor = None
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    act: tuple[float | None, float | None] | None = None


@dataclass
class Linear(Node):
    weight: torch.Tensor = None
    bias: torch.Tensor | None = None
    act: tuple[float | None, float | None] | None = None


@dataclass
class Add(Node):
    act: tuple[float | None, float | None] | None = None


@dataclass
class Concat(Node):
    dim: int = 1


@dataclass
class MaxPool(Node):
    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False


@dataclass
class AvgPool(Node):
    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True


@dataclass
class AdaptiveAvgPool(Node):
    output_size: tuple[int, int] = (1, 1)


@dataclass
class Clamp(Node):
    """Standalone ReLU / ReLU6 / hardtanh: ``clamp(x, lo, hi)`` (None = unbounded)."""
    lo: float | None = 0.0
    hi: float | None = None


@dataclass
class Pad(Node):
    """Zero padding in ``torch.nn.functional.pad`` order (last dim first): spatial or channel."""
    pads: tuple[int, ...] = ()


@dataclass
class Slice(Node):
    """``x[index]`` with one ``(start, stop, step)`` per leading dim."""
    index: tuple[tuple[int | None, int | None, int | None], ...] = ()


@dataclass
class Flatten(Node):
    pass


@dataclass
class FloatOp(Node):
    """An op with no integer rule (sigmoid, softmax, LRN...): runs in float in simulation."""
    op: str = ""
    fn: Callable[..., torch.Tensor] | None = None


# Unary element-wise functions with a table rule (DESIGN §5b): name -> f(x, alpha) in float64.
UNARY_FUNCS: dict[str, Callable[[torch.Tensor, float | None], torch.Tensor]] = {
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "hardsigmoid": lambda x, a: Fn.hardsigmoid(x),
    "hardswish": lambda x, a: Fn.hardswish(x),
    "silu": lambda x, a: Fn.silu(x),
    "tanh": lambda x, a: torch.tanh(x),
    "gelu": lambda x, a: Fn.gelu(x),
    "gelu_tanh": lambda x, a: Fn.gelu(x, approximate="tanh"),
    "mish": lambda x, a: Fn.mish(x),
    "elu": lambda x, a: Fn.elu(x, 1.0 if a is None else a),
    "leaky_relu": lambda x, a: Fn.leaky_relu(x, 0.01 if a is None else a),
    "softplus": lambda x, a: Fn.softplus(x),
    "relu6": lambda x, a: torch.clamp(x, 0.0, 6.0),  # (benchmarks: ReLU6 as a table instead of a clamp)
}
NONNEG_UNARY = {"sigmoid", "hardsigmoid", "softplus", "relu6"}  # f(x) >= 0 for every x


@dataclass
class Table(Node):
    """A unary element-wise function ``UNARY_FUNCS[op]`` (``alpha``: its parameter, e.g. the
    leaky ReLU slope). Integer rule: a lookup table over every input code (DESIGN §5b)."""
    op: str = "sigmoid"
    alpha: float | None = None

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return UNARY_FUNCS[self.op](x, self.alpha)


@dataclass
class Mul(Node):
    """Element-wise product of two tensors; either may be (C, 1, 1) and broadcast over H, W
    (squeeze-and-excitation). Integer rule: exact product, one rounding (DESIGN §5b)."""


@dataclass
class ChannelShuffle(Node):
    """ShuffleNet's ``reshape(N, g, C/g, H, W) -> transpose(1, 2) -> reshape(N, C, H, W)``:
    output channel ``k = i * g + j`` is input channel ``j * C/g + i``. Exact."""
    groups: int = 2


def shuffle_perm(C: int, groups: int) -> torch.Tensor:
    """Input channel of every output channel of a channel shuffle.

    >>> shuffle_perm(6, 2).tolist()
    [0, 3, 1, 4, 2, 5]
    """
    return torch.arange(C).reshape(groups, C // groups).t().reshape(-1)


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x[:, shuffle_perm(x.shape[1], groups).to(x.device)]


# Ops whose output gets its own data format (a requantization point).
QUANT_POINTS = (Input, Conv, Linear, Add, Concat, AvgPool, AdaptiveAvgPool, FloatOp, Table, Mul)


@dataclass
class Graph:
    nodes: list[Node]
    input: str
    output: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no layer named {name!r}; layers: {', '.join(n.name for n in self.nodes)}")

    def users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.name)
        out[self.output].append("<output>")
        return out

    def layers(self) -> list[Node]:
        """Conv and linear nodes, in execution order."""
        return [n for n in self.nodes if isinstance(n, (Conv, Linear))]


def apply_act(y: torch.Tensor, act, inplace: bool = False) -> torch.Tensor:
    """The fused clamp ``act = (lo, hi)`` (None: identity). ``inplace`` clamps ``y`` itself (a
    tensor the caller just made and owns: no second tensor of its size; same values) unless
    autograd tracks it.

    >>> y = torch.tensor([-1.0, 3.0, 9.0])
    >>> apply_act(y, (0.0, 6.0), inplace=True) is y, y.tolist()
    (True, [0.0, 3.0, 6.0])
    """
    if act is None:
        return y
    lo, hi = act
    if inplace and not y.requires_grad:
        return y.clamp_(min=lo, max=hi)
    return torch.clamp(y, min=lo, max=hi)


def _slice(x, node):
    return x[tuple(slice(*s) for s in node.index)]


def pre_activation(n: Conv | Linear, x: torch.Tensor, weight=None, bias="same") -> torch.Tensor:
    """Conv/linear output before the fused activation (the accumulator, in float)."""
    w = (n.weight if weight is None else weight).to(x.dtype)
    b = n.bias if isinstance(bias, str) else bias
    b = None if b is None else b.to(x.dtype)
    if isinstance(n, Conv):
        return Fn.conv2d(x, w, b, n.stride, n.padding, n.dilation, n.groups)
    return Fn.linear(x, w, b)


FLOAT_RULES: dict[type, Callable] = {
    Input: lambda n, x: x,
    Conv: lambda n, x: apply_act(pre_activation(n, x), n.act, inplace=True),  # on the new output
    Linear: lambda n, x: apply_act(pre_activation(n, x), n.act, inplace=True),
    Add: lambda n, a, b: apply_act(a + b, n.act, inplace=True),
    Concat: lambda n, *xs: torch.cat(xs, dim=n.dim),
    MaxPool: lambda n, x: Fn.max_pool2d(x, n.kernel, n.stride, n.padding, n.dilation, n.ceil_mode),
    AvgPool: lambda n, x: Fn.avg_pool2d(x, n.kernel, n.stride, n.padding, n.ceil_mode, n.count_include_pad),
    AdaptiveAvgPool: lambda n, x: Fn.adaptive_avg_pool2d(x, n.output_size),
    Clamp: lambda n, x: torch.clamp(x, min=n.lo, max=n.hi),
    Pad: lambda n, x: Fn.pad(x, n.pads),
    Slice: lambda n, x: _slice(x, n),
    Flatten: lambda n, x: torch.flatten(x, 1),
    FloatOp: lambda n, *xs: n.fn(*xs),
    Table: lambda n, x: n.fn(x),
    Mul: lambda n, a, b: a * b,
    ChannelShuffle: lambda n, x: _shuffle(x, n.groups),
}


def run_float(graph: Graph, x: torch.Tensor, keep: bool = False):
    """Run the captured graph in float; returns the output, or every node's output when
    ``keep`` is set (a dict name -> tensor)."""
    env: dict[str, torch.Tensor] = {graph.input: x}
    users = graph.users()
    remaining = {k: len(v) for k, v in users.items()}
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        env[n.name] = FLOAT_RULES[type(n)](n, *(env[i] for i in n.inputs))
        if not keep:
            for i in n.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i != graph.output:
                    del env[i]
    return env if keep else env[graph.output]


def _clamps_nonneg(act) -> bool:
    return act is not None and act[0] is not None and act[0] >= 0


def nonnegative_nodes(graph: Graph) -> set[str]:
    """Nodes whose output is >= 0 by construction (a graph rule, never observed data):
    conv/linear/add with a fused clamp at >= 0 (ReLU, ReLU6), a standalone clamp at >= 0,
    a table function that is >= 0 everywhere (sigmoid, hardsigmoid, softplus),
    and max/average pooling, multiply, channel shuffle, zero padding, slicing, flattening, concat or add of such
    tensors. Their data formats can be unsigned, ``U(T, F)`` (DESIGN.md §2).

    >>> g = Graph([Input("x", ()), Clamp("r", ("x",)), MaxPool("p", ("r",)), Add("a", ("p", "x"))], "x", "a")
    >>> sorted(nonnegative_nodes(g))
    ['p', 'r']
    """
    out: set[str] = set()
    for n in graph.nodes:
        if isinstance(n, (Conv, Linear)):
            ok = _clamps_nonneg(n.act)
        elif isinstance(n, Add):
            ok = _clamps_nonneg(n.act) or all(i in out for i in n.inputs)
        elif isinstance(n, Clamp):
            ok = (n.lo is not None and n.lo >= 0) or n.inputs[0] in out
        elif isinstance(n, (MaxPool, AvgPool, AdaptiveAvgPool, Pad, Slice, Flatten, Concat, Mul, ChannelShuffle)):
            ok = all(i in out for i in n.inputs)
        elif isinstance(n, Table):
            ok = n.op in NONNEG_UNARY
        else:  # Input, FloatOp: unknown sign
            ok = False
        if ok:
            out.add(n.name)
    return out
