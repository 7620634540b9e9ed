"""Exact integer sums of products for the integer engine (DESIGN §5): conv/linear sums
``Σ_j (Σ_hw w[i,j] x[j]) << wshift[i,j]`` on int64 codes, computed in float32, float64 or
int64, whichever is the narrowest in which every partial sum is provably an exact integer.

Notation: codes ``x`` (int64, |x| <= max|x|), ``w`` (int64), ``wshift >= 0``; the bound is
``max|x| · max_i Σ_j,hw |w[i,j]| << (wshift[i,j] - m[i])`` with ``m[i] = min_j wshift[i,j]``
applied after the sum. No rounding and no saturation happen here.

>>> import torch
>>> from fixq.graph.ir import Linear
>>> w, x = torch.tensor([[[[3]], [[-2]]]]), torch.tensor([[5, 7]])
>>> product_sum(w, torch.tensor([[1, 0]]), Linear("l", ("x",)), x).tolist()  # (3*5 << 1) - 2*7
[[16]]
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from fixq.errors import FixqError
from fixq.graph.ir import Conv, Linear

__all__ = ["EngineError", "EXACT", "EXACT32", "INT64_SAFE", "exact_matmul", "sum_dtype", "product_sum", "sums_of_products",
           "shift_left", "pool_out_size", "windows", "bc"]

EXACT = 2 ** 53      # float64 holds every integer below this exactly
EXACT32 = 2 ** 24    # float32 likewise
INT64_SAFE = 2 ** 62


class EngineError(FixqError):
    """A plan or graph the integer engine (and the C export) cannot run."""


def exact_matmul(a: torch.Tensor, b: torch.Tensor, proved: bool = False) -> torch.Tensor:
    """Integer ``a @ b`` (int64 in, int64 out), exact: float64 only under a checked bound.
    ``proved``: every partial sum is already proved below 2**62 at plan time (DESIGN §5a)."""
    K = a.shape[-1]
    bound = int(a.abs().max()) * int(b.abs().max()) * K if a.numel() and b.numel() else 0
    dt = sum_dtype(bound, (torch.float64,))
    if dt is None and bound >= INT64_SAFE and not proved:
        raise EngineError(f"integer sum bound {bound:.3g} overflows int64; use fewer bits")
    return _matmul(a, b, dt)


def _matmul(a: torch.Tensor, b: torch.Tensor, dt) -> torch.Tensor:
    """``a @ b`` of int64 codes, carried in ``dt`` (a float type :func:`sum_dtype` chose) or
    in int64 when ``dt`` is None."""
    return torch.matmul(a, b) if dt is None else torch.matmul(a.to(dt), b.to(dt)).long()


def pool_out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Output length of a conv/pool window sweep, PyTorch's rule (ceil windows must start
    inside the input or its left padding)."""
    eff = d * (k - 1) + 1
    num = n + 2 * p - eff
    o = (-(-num // s) if ceil else num // s) + 1
    if ceil and (o - 1) * s >= n + p:
        o -= 1
    return o


def windows(x, k, s, p, d, fill, ceil=False):
    """(B, C, OH, OW, kh, kw) strided view of padded x."""
    B, C, H, W = x.shape
    oh, ow = (pool_out_size(H, k[0], s[0], p[0], d[0], ceil), pool_out_size(W, k[1], s[1], p[1], d[1], ceil))
    rh = max(0, (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1 - H - p[0])
    rw = max(0, (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1 - W - p[1])
    xp = Fn.pad(x, (p[1], rw, p[0], rh), value=fill)
    st = xp.stride()
    return xp.as_strided((B, C, oh, ow, k[0], k[1]),
                         (st[0], st[1], st[2] * s[0], st[3] * s[1], st[2] * d[0], st[3] * d[1]))


def bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v if v.dim() == 0 else v.reshape(1, -1, *([1] * (like.dim() - 2)))


def sum_dtype(bound: int, allowed=(torch.float32, torch.float64)):
    """The narrowest float type in which every partial sum of integer products, bounded in
    magnitude by ``bound``, is an exact integer (float32 below 2**24, float64 below 2**53);
    None: only int64 is exact. Any summation order is exact then: each partial sum is a sum
    of a subset of the products, so it is an integer no larger than ``bound``.

    >>> sum_dtype(2 ** 24 - 1), sum_dtype(2 ** 24), sum_dtype(2 ** 53)
    (torch.float32, torch.float64, None)
    """
    for dt, lim in ((torch.float32, EXACT32), (torch.float64, EXACT)):
        if dt in allowed and bound < lim:
            return dt
    return None


def product_sum(w: torch.Tensor, wshift: torch.Tensor, n, x: torch.Tensor, allowed=(torch.float32, torch.float64)):
    """``Σ_j (Σ_hw w[i,j] x[j]) << wshift[i,j]`` for every output i, exactly.

    The common shift ``m[i] = min_j wshift[i,j]`` is applied after the sum; the rest stays
    in the weights ``wr = w << (wshift - m)``. The products then run in float32 or float64
    when ``max|x| · max_i Σ|wr[i]|`` proves every partial sum exact (:func:`sum_dtype`), as
    im2col + matrix product (sums of products only, whatever the backend); else in int64
    (sum proved below 2**62 at plan time, DESIGN §5a). ``allowed``: float types it may use."""
    m = wshift.amin(dim=1) if wshift.numel() else torch.zeros(w.shape[0], dtype=torch.int64)
    wr = w << (wshift - m[:, None]).reshape(*wshift.shape, *([1] * (w.dim() - 2)))
    xmax = max(-int((mm := torch.aminmax(x))[0]), int(mm[1])) if x.numel() else 0
    wsum = int(wr.abs().reshape(w.shape[0], -1).sum(dim=1).max()) if wr.numel() else 0
    dt = sum_dtype(xmax * wsum, allowed)
    if isinstance(n, Linear):
        return shift_left(_matmul(x, wr.reshape(w.shape[0], -1).t(), dt), m)
    B, C = x.shape[:2]
    g, (kh, kw) = n.groups, tuple(w.shape[2:])
    K = (C // g) * kh * kw
    if dt is None:
        cols = windows(x, (kh, kw), n.stride, n.padding, n.dilation, 0)
        OH, OW = cols.shape[2:4]
        cols = cols.reshape(B, g, C // g, OH * OW, kh * kw).permute(0, 1, 2, 4, 3).reshape(B, g, K, OH * OW)
        y = _matmul(wr.reshape(g, -1, K).unsqueeze(0), cols, None)  # int64: the sum is proved < 2**62
    else:
        xf, wf = x.to(dt), wr.to(dt)
        with torch.backends.nnpack.flags(enabled=False):  # NNPACK may pick Winograd or FFT: not exact
            if sums_of_products(xf, wf, n):
                return shift_left(Fn.conv2d(xf, wf, None, n.stride, n.padding, n.dilation, g).long(), m)
        OH, OW = (pool_out_size(x.shape[2 + a], (kh, kw)[a], n.stride[a], n.padding[a], n.dilation[a], False)
                  for a in (0, 1))
        cols = Fn.unfold(xf, (kh, kw), n.dilation, n.padding, n.stride).reshape(B, g, K, OH * OW)
        y = _matmul(wf.reshape(g, -1, K), cols, dt)
    return shift_left(y.reshape(B, -1, OH, OW), m)


def shift_left(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``y << m`` per output channel, in place (``y`` is a new tensor); none when m == 0."""
    return y.__ilshift__(bc(m, y)) if bool(m.any()) else y


def sums_of_products(xf: torch.Tensor, wf: torch.Tensor, n: Conv) -> bool:
    """True when PyTorch's conv2d for these operands computes plain sums of products (so
    :func:`sum_dtype`'s bound makes it exact): im2col + GEMM (Slow2d), or oneDNN's direct
    convolution at full fp32 precision. Winograd, FFT (NNPACK) or reduced-precision paths
    are not exact; then the caller uses im2col + matrix product itself."""
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:
        return False
    try:
        b = select(xf, wf, None, n.stride, n.padding, n.dilation, False, (0, 0), n.groups, None)
    except (RuntimeError, TypeError):
        return False
    kinds = torch._C._ConvBackend
    if b in (kinds.Slow2d, kinds.SlowDilated2d):
        return True
    strict = ("none", "ieee")
    mk = torch.backends.mkldnn
    return (b == kinds.Mkldnn and getattr(mk, "fp32_precision", "none") in strict
            and getattr(getattr(mk, "conv", None), "fp32_precision", "none") in strict)
