"""One-pass fake quantization for the fast (float32) simulation on the CPU (``torch.compile``).

Notation as in :mod:`fixq.numerics.formats`: ``y = sat_T(round(x * 2**F)) * 2**-F`` with F per
channel (or one F), rounding ``half_up`` (``floor(x * 2**F + 1/2)``) or ``floor``, saturation
to the word's codes ``[lo, hi]`` (signed or unsigned), events = elements the clamp changed.
With ``relu=True`` the input is ``max(x, 0)`` first, which is ``fake_quantize(relu(x))``.

The torch formula (:func:`fixq.numerics.formats.fake_quantize`) takes about five passes over
memory; the compiled kernel one. Every step is exact in float32 (``x * 2**F`` and
``r * 2**-F`` are exact scalings, ``+ 1/2`` is one rounding as in ``addcmul``), so both give the
same values and counts; a test checks it. Used only where the caller asks for it (the plan
searches, which run the same shapes many times) and on tensors of at least
``MIN_NUMEL`` elements, where one compilation (seconds; cached on disk by torch) pays off;
``FIXQ_COMPILE=0`` turns it off; without a working compiler it warns once and the torch
formula runs (same numbers).

>>> y, events = cpu_fused_fake_quantize(torch.tensor([0.3, 9.0]), torch.tensor(16.0), 8, "half_up")  # doctest: +SKIP
>>> y, int(events)                                                                                   # doctest: +SKIP
(tensor([0.3125, 7.9375]), 1)
"""
from __future__ import annotations

import os
import warnings

import torch

from .formats import code_limits

__all__ = ["cpu_fused_available", "cpu_fused_fake_quantize", "MIN_NUMEL"]

MIN_NUMEL = 1 << 18  # smaller tensors: the torch formula (a compilation would not pay off)
ENABLED = os.environ.get("FIXQ_COMPILE", "1") != "0"
_WHY_NOT: str | None = None
_FNS: dict = {}


# one function (one code object, one compile cache) per variant: ranks and sizes are dynamic
def _fq_half_up(x, s, inv, lo, hi):
    r = torch.floor(x * s + 0.5)
    y = torch.minimum(torch.maximum(r, lo), hi)
    return y * inv, (y != r).sum()


def _fq_floor(x, s, inv, lo, hi):
    r = torch.floor(x * s)
    y = torch.minimum(torch.maximum(r, lo), hi)
    return y * inv, (y != r).sum()


def _fq_half_up_relu(x, s, inv, lo, hi):
    r = torch.floor(torch.clamp(x, min=0.0) * s + 0.5)
    y = torch.minimum(torch.maximum(r, lo), hi)
    return y * inv, (y != r).sum()


def _fq_floor_relu(x, s, inv, lo, hi):
    r = torch.floor(torch.clamp(x, min=0.0) * s)
    y = torch.minimum(torch.maximum(r, lo), hi)
    return y * inv, (y != r).sum()


_VARIANTS = {("half_up", False): _fq_half_up, ("floor", False): _fq_floor,
             ("half_up", True): _fq_half_up_relu, ("floor", True): _fq_floor_relu}


def cpu_fused_available(x: torch.Tensor, rounding: str) -> bool:
    """Whether :func:`cpu_fused_fake_quantize` takes ``x`` (CPU float32, contiguous, large enough)."""
    return (ENABLED and _WHY_NOT is None and x.device.type == "cpu" and x.dtype == torch.float32
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) and x.numel() >= MIN_NUMEL and rounding in ("half_up", "floor")
            and not x.requires_grad)


def cpu_fused_fake_quantize(x: torch.Tensor, scale: torch.Tensor, T, rounding: str,
                            relu: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, events)``; ``scale`` = ``2**F`` as float32, 0-d or broadcastable over ``x``
    (one per channel: shape (1, C, 1, ...)). ``None`` when the kernel cannot be built here
    (warned once; the caller runs the torch formula)."""
    global _WHY_NOT
    key = (rounding, bool(relu))
    lo, hi = code_limits(T)
    args = (x, scale, torch.reciprocal(scale), torch.tensor(float(lo)), torch.tensor(float(hi)))
    try:
        if key not in _FNS:
            _FNS[key] = torch.compile(_VARIANTS[key], dynamic=True)
        return _FNS[key](*args)
    except Exception as e:  # no C++ compiler, or inductor cannot build here: same numbers from torch
        _WHY_NOT = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"compiled CPU quantizer unavailable ({_WHY_NOT}); the fast simulation falls back to the "
                      "torch formula (same numbers, slower); FIXQ_COMPILE=0 skips the attempt",
                      RuntimeWarning, stacklevel=2)
        return None
