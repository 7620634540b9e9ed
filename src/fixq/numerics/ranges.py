"""Range methods: choose the fractional bits F of each partition (DESIGN.md §3).

Notation: ``T`` total bits, ``F`` fractional bits, ``I = T - 1 - F`` integer bits.

- ``maxabs``       ``I = ceil(log2(max|x|))`` (paper eq. 6); all-zero partition: ``F = T - 1``
- ``percentile:p`` the same rule on the p-th percentile of |x| (outliers saturate)
- ``mse``          the F in ``F_maxabs .. F_maxabs + 4`` with the least squared error
- ``affine``       ``mu = (max+min)/2``, ``sigma = 2**(1-T) max|x-mu|`` (paper eqs. 4-5);
                   not a power of two, simulation only

``ceil(log2 m)`` is computed exactly from the float's exponent (``frexp``), never with a
float ``log2`` that could round across an integer. The percentile uses a histogram of
those exponents, so the same rule serves weights (exact) and activations (streamed);
short weight partitions take the same bin as an order statistic (``F_from_percentile_rows``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import check_bits, fake_quantize

__all__ = [
    "RangeMethod",
    "parse_method",
    "ceil_log2",
    "EXP_LO",
    "EXP_HI",
    "exponent_histogram",
    "F_from_percentile_rows",
    "F_from_maxabs",
    "F_from_histogram",
    "mse_candidates",
    "affine_params",
    "affine_quantize",
]

# Exponent histogram bins cover ceil(log2|x|) in [EXP_LO, EXP_HI]; zeros get their own bin.
EXP_LO, EXP_HI = -64, 64
N_EXP_BINS = EXP_HI - EXP_LO + 2  # +1 for the zero bin at index 0
MSE_CANDIDATES = 5


@dataclass(frozen=True)
class RangeMethod:
    """A parsed range method: ``kind`` in maxabs/percentile/mse/affine; ``p`` for percentile.

    >>> parse_method("percentile:99.99")
    RangeMethod(kind='percentile', p=99.99)
    """

    kind: str
    p: float | None = None

    def __str__(self) -> str:
        return f"percentile:{self.p:g}" if self.kind == "percentile" else self.kind

    @property
    def power_of_two(self) -> bool:
        return self.kind != "affine"


def parse_method(text: str | RangeMethod) -> RangeMethod:
    if isinstance(text, RangeMethod):
        return text
    t = str(text).strip().lower()
    if t in ("maxabs", "mse", "affine"):
        return RangeMethod(t)
    if t.startswith("percentile"):
        _, _, p = t.partition(":")
        try:
            pv = float(p) if p else 99.99
        except ValueError:
            pv = -1.0
        if not (0.0 < pv <= 100.0):
            raise ValueError(f"percentile must be in (0, 100], e.g. percentile:99.99; got {text!r}")
        return RangeMethod("percentile", pv)
    raise ValueError(f"unknown range method {text!r}; use maxabs, percentile:P, mse or affine")


def ceil_log2(m: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(m))`` for positive m (int64 result; 0 maps to EXP_LO - 1).

    >>> ceil_log2(torch.tensor([1.0, 1.5, 2.0, 0.25, 0.3]))
    tensor([ 0,  1,  1, -2, -1])
    """
    mant, e = torch.frexp(m.to(torch.float64))
    out = e.to(torch.int64) - (mant == 0.5).to(torch.int64)
    return torch.where(m > 0, out, torch.full_like(out, EXP_LO - 1))


def F_from_maxabs(maxabs: torch.Tensor, T: int) -> torch.Tensor:
    """Paper eq. 6, vectorised over partitions; all-zero partitions get ``F = T - 1``."""
    check_bits(T)
    I = ceil_log2(maxabs)
    F = (T - 1) - I
    return torch.where(maxabs > 0, F, torch.full_like(F, T - 1))


def _exponent_bins(a: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each ``|x|``: ``ceil(log2|x|)`` clamped to the range, offset; 0 for zeros."""
    e = ceil_log2(a).clamp(EXP_LO, EXP_HI) - EXP_LO + 1
    return torch.where(a > 0, e, torch.zeros_like(e))


def _F_from_bin(idx: torch.Tensor, nonzero: torch.Tensor, T: int) -> torch.Tensor:
    """F of a partition whose percentile falls in exponent bin ``idx``; ``F = T - 1`` for
    all-zero partitions and for a percentile in the zero bin."""
    F = (T - 1) - (idx.to(torch.int64) + EXP_LO - 1)
    return torch.where(nonzero & (idx != 0), F, torch.full_like(F, T - 1))


def exponent_histogram(x: torch.Tensor, groups: torch.Tensor | None, n_groups: int) -> torch.Tensor:
    """Counts of ``ceil(log2|x|)`` per group: int64 ``(n_groups, N_EXP_BINS)``; bin 0 is zero.

    ``groups`` gives each element's partition index (same shape as x) or None for one group.
    """
    b = _exponent_bins(x.detach().abs().reshape(-1))
    g = torch.zeros_like(b) if groups is None else groups.reshape(-1).to(torch.int64)
    flat = torch.bincount(g * N_EXP_BINS + b, minlength=n_groups * N_EXP_BINS)
    return flat.reshape(n_groups, N_EXP_BINS)


def F_from_histogram(hist: torch.Tensor, T: int, p: float) -> torch.Tensor:
    """F per group from an exponent histogram so that at least p% of |x| lie within
    ``2**I`` (the lower p-quantile's ceil(log2)); all-zero groups get ``F = T - 1``."""
    check_bits(T)
    hist = hist.to(torch.float64)
    total = hist.sum(dim=1, keepdim=True)
    cdf = hist.cumsum(dim=1)
    need = total * (p / 100.0)
    # first bin whose cumulative count reaches p% of the samples
    idx = (cdf < need - 1e-9 * total).sum(dim=1)
    idx = torch.clamp(idx, max=hist.shape[1] - 1)
    return _F_from_bin(idx, hist[:, 1:].sum(dim=1) > 0, T)


def F_from_percentile_rows(rows: torch.Tensor, T: int, p: float) -> torch.Tensor:
    """``F_from_histogram`` of each row's own exponent histogram, without building it when
    rows are short (a 2D filter of a 1x1 conv is one coefficient: a million 130-bin
    histograms would be built for nothing). The first bin whose count reaches
    ``p% * n - 1e-9 n`` is the k-th smallest exponent bin, ``k = ceil(that)``.

    >>> F_from_percentile_rows(torch.tensor([[0.5, -0.2, 3.0]]), 8, 99.99)
    tensor([5])
    """
    check_bits(T)
    n = rows.shape[1]
    if n >= N_EXP_BINS:  # long rows: the histogram is the cheaper form
        groups = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1).expand_as(rows)
        return F_from_histogram(exponent_histogram(rows, groups, rows.shape[0]), T, p)
    a = rows.detach().abs()
    b = _exponent_bins(a).sort(dim=1).values
    thr = float(n) * (p / 100.0) - 1e-9 * float(n)  # the histogram's threshold, same float64 ops
    k = math.ceil(thr)
    if k <= 0:
        idx = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    else:
        idx = b[:, min(k, n) - 1]
    return _F_from_bin(idx, (a > 0).any(dim=1), T)


def mse_candidates(F_maxabs: torch.Tensor) -> torch.Tensor:
    """Candidate F's for the mse method: ``(n_groups, MSE_CANDIDATES)``."""
    return F_maxabs.unsqueeze(-1) + torch.arange(MSE_CANDIDATES, device=F_maxabs.device)


def affine_params(xmin: torch.Tensor, xmax: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper eqs. 4-5: ``mu = (max+min)/2``, ``sigma = 2**(1-T) * max|x - mu|``.

    A constant partition gets ``sigma = 1`` (any sigma represents it exactly)."""
    check_bits(T)
    mu = (xmax.to(torch.float64) + xmin.to(torch.float64)) / 2
    half = (xmax.to(torch.float64) - xmin.to(torch.float64)) / 2
    sigma = half * 2.0 ** (1 - T)
    return mu, torch.where(sigma > 0, sigma, torch.ones_like(sigma))


def affine_quantize(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, T: int,
                    rounding: str = "half_up") -> torch.Tensor:
    """``q = mu + sigma * round((x - mu)/sigma)`` clamped to T-bit codes (eq. 4)."""
    mu = mu.to(x.dtype)
    sigma = sigma.to(x.dtype)
    codes, _ = fake_quantize((x - mu) / sigma, 0, T, rounding)
    return mu + sigma * codes
