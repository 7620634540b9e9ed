"""One-pass fake quantization for the fast (float32) simulation on CUDA (Triton).

Notation as in :mod:`fixq.numerics.formats`: ``y = sat_T(round(x * 2**F)) * 2**-F`` with F per
channel (or one F), rounding ``half_up`` or ``floor``, saturation counted. With
``relu=True`` the lower bound is 0 and only upper overflows count, which equals
``requant(relu(x))`` exactly (rounding is monotone and round(0) = 0).

The torch formula in :func:`fixq.numerics.formats.fake_quantize` stays the reference: the CPU, the
exact float64 mode and ``nearest_even`` use it, and a CUDA test checks both agree.
"""
from __future__ import annotations

import warnings

import torch

from .formats import code_limits

__all__ = ["fused_available", "fused_fake_quantize"]

_KERNEL = None
ENABLED = True  # tests switch it off to compare with the torch formula
_WHY_NOT: str | None = None  # why the kernel cannot be built here (warned once)


def _build():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def fq_kernel(x_ptr, y_ptr, s_ptr, inv_ptr, cnt_ptr, n, inner, C, qlo, qmin, qmax,
                  PER_CH: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if PER_CH:
            ch = (offs // inner) % C
            s = tl.load(s_ptr + ch, mask=mask, other=1.0)
            inv = tl.load(inv_ptr + ch, mask=mask, other=1.0)
        else:
            s = tl.load(s_ptr)
            inv = tl.load(inv_ptr)
        v = x * s
        if FLOOR:
            r = tl.floor(v)
        else:
            r = tl.floor(v + 0.5)
        over = ((r > qmax) | (r < qmin)) & mask
        r = tl.minimum(tl.maximum(r, qlo), qmax)
        tl.store(y_ptr + offs, r * inv, mask=mask)  # 2**-F: exact, unlike an approximate divide
        tl.atomic_add(cnt_ptr, tl.sum(over.to(tl.int32), axis=0))

    _KERNEL = fq_kernel
    return _KERNEL


def fused_available(x: torch.Tensor, rounding: str) -> bool:
    if not (ENABLED and x.is_cuda and x.dtype == torch.float32 and rounding in ("half_up", "floor") and x.is_contiguous()):
        return False
    global _WHY_NOT
    if _WHY_NOT is not None:
        return False
    try:
        _build()
        return True
    except Exception as e:  # no triton, or it cannot compile here: the torch path gives the same numbers
        _WHY_NOT = f"{type(e).__name__}: {e}"
        warnings.warn(f"fused CUDA quantizer unavailable ({_WHY_NOT}); the fast simulation falls back to the "
                      "torch formula (same numbers, slower)", RuntimeWarning, stacklevel=2)
        return False


def fused_fake_quantize(x: torch.Tensor, scale: torch.Tensor, T: int, rounding: str,
                        relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` = ``2**F`` as float32, 0-d or one per channel (dim 1 of x)."""
    kernel = _build()
    y = torch.empty_like(x)
    cnt = torch.zeros((), dtype=torch.int32, device=x.device)
    n = x.numel()
    C = x.shape[1] if x.dim() > 1 else 1
    inner = n // (x.shape[0] * C) if x.dim() > 1 else 1
    lo, hi = code_limits(T)  # T may be an unsigned Word: codes 0 .. 2**T - 1
    qmin, qmax = float(lo), float(hi)
    per_ch = scale.numel() > 1
    s = scale.reshape(-1).contiguous().to(torch.float32)
    inv = 1.0 / s  # powers of two: exact
    BLOCK = 1024
    # relu: the lower clamp is 0 and negative values are not saturation events
    kernel[(triton_cdiv(n, BLOCK),)](x, y, s, inv, cnt, n, inner, C, 0.0 if relu else qmin, qmin if not relu else -float("inf"),
                                     qmax, PER_CH=per_ch, FLOOR=rounding == "floor", BLOCK=BLOCK)
    return y, cnt


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
