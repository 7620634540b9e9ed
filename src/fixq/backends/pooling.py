"""Pooling geometry shared by simulation, engine and C export: window sums and divisors.

Average pooling is ``y_q = round(sum * 2**(Fy - Fx) / K)`` with an integer division
(DESIGN.md §5); ``K`` here is the number PyTorch divides by for each output position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from fixq.graph.ir import AdaptiveAvgPool, AvgPool

__all__ = ["adaptive_windows", "pool_divisors", "window_sum"]


def adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows ``[floor(i*in/out), ceil((i+1)*in/out))``."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def _membership(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    m = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for i, (a, b) in enumerate(adaptive_windows(n_in, n_out)):
        m[i, a:b] = 1
    return m


def pool_divisors(node: AvgPool | AdaptiveAvgPool, in_hw: tuple[int, int]) -> torch.Tensor:
    """Integer divisor K of every output position, shape (OH, OW)."""
    if isinstance(node, AdaptiveAvgPool):
        ch = [b - a for a, b in adaptive_windows(in_hw[0], node.output_size[0])]
        cw = [b - a for a, b in adaptive_windows(in_hw[1], node.output_size[1])]
        return torch.tensor(ch, dtype=torch.int64)[:, None] * torch.tensor(cw, dtype=torch.int64)[None, :]
    ones = torch.ones(1, 1, *in_hw, dtype=torch.float64)
    counted = Fn.avg_pool2d(ones, node.kernel, node.stride, node.padding, node.ceil_mode,
                            node.count_include_pad, divisor_override=1)
    mean = Fn.avg_pool2d(ones, node.kernel, node.stride, node.padding, node.ceil_mode, node.count_include_pad)
    return torch.round(counted / mean)[0, 0].to(torch.int64)


def window_sum(node: AvgPool | AdaptiveAvgPool, x: torch.Tensor) -> torch.Tensor:
    """Exact window sums of a float tensor (exact in float64 for integer multiples)."""
    if isinstance(node, AdaptiveAvgPool):
        H, W = x.shape[-2:]
        mh = _membership(H, node.output_size[0], x.dtype, x.device)
        mw = _membership(W, node.output_size[1], x.dtype, x.device)
        if node.output_size == (1, 1):
            return x.sum(dim=(-2, -1), keepdim=True)
        return torch.einsum("oh,nchw,pw->ncop", mh, x, mw)
    return Fn.avg_pool2d(x, node.kernel, node.stride, node.padding, node.ceil_mode,
                         node.count_include_pad, divisor_override=1)
