"""Formats derived from a plan: every node's data format (quantization points from the plan,
the rest propagated) and the per-2D-filter format grids of a conv/linear (DESIGN.md §5).

Notation: ``T`` a data word (:class:`fixq.numerics.formats.Word`: bits and signedness), ``F``
fractional bits (0-d for one format per tensor, one entry per channel or feature), ``Fw``
coefficient and ``Fx`` input formats, ``S[i] = max_j Fw[i,j] + Fx[j]`` the exact-sum format,
``A`` accumulator bits and ``Facc`` its format.

>>> import torch
>>> sum_format(torch.tensor([3, 5]), torch.tensor(4), (2, 3, 1, 1), 1).tolist()
[7, 9]
"""
from __future__ import annotations

import torch

from fixq.graph.ir import QUANT_POINTS, ChannelShuffle, Clamp, Concat, Flatten, Graph, MaxPool, Pad, Slice, shuffle_perm
from .plan import Formats, PlanError, filter_grid

__all__ = ["input_point", "propagate_formats", "filter_formats", "sum_format", "layer_sum_format", "accumulator_F"]


def input_point(graph: Graph, layer: str) -> str:
    """The quantization point whose format ``layer``'s input carries (walking back through
    the format-preserving nodes :func:`propagate_formats` derives: pads, pools, flatten...)."""
    name = graph.node(layer).inputs[0]
    while not isinstance(graph.node(name), QUANT_POINTS) and graph.node(name).inputs:
        name = graph.node(name).inputs[0]
    return name


def propagate_formats(graph: Graph, tensors: dict[str, Formats]) -> dict[str, tuple[int | None, torch.Tensor | None]]:
    """Data format ``(T, F)`` of every node's output: quantization points from the plan,
    the rest derived (max pool, clamp, pad, slice, flatten keep their input's format).
    T is a :class:`fixq.numerics.formats.Word` (bits and signedness); F is a 0-d tensor (4D) or one entry per channel/feature; ``(None, None)`` is float."""
    out: dict[str, tuple[int | None, torch.Tensor | None]] = {}
    for n in graph.nodes:
        if n.name in tensors:
            f = tensors[n.name]
            out[n.name] = (f.word, f.F_tensor()) if isinstance(f, Formats) else (f.T, None)
            continue
        if not n.inputs:
            out[n.name] = (None, None)
            continue
        T, F = out[n.inputs[0]]
        if F is None or F.dim() == 0 or isinstance(n, (Clamp, MaxPool)):
            out[n.name] = (T, F)
        elif isinstance(n, Flatten):
            hw = 1
            for s in graph.shapes[n.inputs[0]][1:]:
                hw *= s
            out[n.name] = (T, F.repeat_interleave(hw))
        elif isinstance(n, ChannelShuffle):
            out[n.name] = (T, F[shuffle_perm(F.numel(), n.groups)])
        elif isinstance(n, Slice):
            ch = n.index[1] if len(n.index) > 1 else (None, None, None)
            out[n.name] = (T, F[slice(*ch)])
        elif isinstance(n, Pad):
            pads = list(n.pads) + [0] * (6 - len(n.pads))
            before, after = pads[4], pads[5]
            fill = int(F.min())  # padded channels are zeros: any format holds them exactly
            out[n.name] = (T, torch.cat([F.new_full((before,), fill), F, F.new_full((after,), fill)]))
        elif isinstance(n, Concat):
            raise PlanError(f"concat '{n.name}' has no format in the plan")
        else:
            out[n.name] = (T, F)
    return out


def filter_formats(weight_F: torch.Tensor, Fx: torch.Tensor, weight_shape, groups: int):
    """``(Fw, Fx)`` as ``(N, M/groups)`` grids: each 2D filter (i, j)'s coefficient format
    and the format of the input channel it reads (kernel i sees only its group's inputs)."""
    N, Mg = weight_shape[0], weight_shape[1]
    Fw = filter_grid(weight_F, N, Mg)
    Fxv = Fx.expand(Mg * groups) if Fx.dim() == 0 else Fx
    return Fw, Fxv.reshape(groups, Mg)[torch.arange(N) // (N // groups)]


def sum_format(weight_F: torch.Tensor, Fx: torch.Tensor, weight_shape, groups: int) -> torch.Tensor:
    """``S[i] = max_j Fw[i,j] + Fx[j]`` over the input channels j of kernel i's group."""
    Fw, Fxg = filter_formats(weight_F, Fx, weight_shape, groups)
    return (Fw + Fxg).amax(dim=1)


def layer_sum_format(lp, Fx: torch.Tensor, weight_shape, groups: int) -> torch.Tensor:
    """``S[i]`` of a conv/linear plan ``lp`` reading data at ``Fx``. A K-means layer whose
    residuals read their own data format ``Fxr`` (``<4b,4b>``, DESIGN §9) sums both
    branches at ``S[i] = max_j max(Fr[i,j] + Fxr[j], Fg[l(i),j] + Fx[j])``."""
    N, Mg = weight_shape[0], weight_shape[1]
    km = lp.kmeans
    if km is None or km.data is None:
        return sum_format(lp.coeff_F(N, Mg), Fx, weight_shape, groups)
    Fg = filter_grid(km.basis.F_tensor(), km.K, Mg)[km.assign_tensor()]
    return torch.maximum(sum_format(lp.weight.F_tensor(), km.data.F_tensor(), weight_shape, groups),
                         sum_format(Fg, Fx, weight_shape, groups))


def accumulator_F(S: torch.Tensor, acc_I: torch.Tensor, A: int) -> tuple[int, ...]:
    """``Facc = min(S, A - 1 - I_acc)``: the exact-sum format unless the calibrated range
    needs more than A bits there (DESIGN §5)."""
    return tuple(int(v) for v in torch.minimum(S, (A - 1) - acc_I).tolist())
