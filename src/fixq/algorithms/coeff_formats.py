"""Coefficient formats of one layer, chosen from its float weights alone (no images):
the weight and bias side of calibration, shared by :mod:`fixq.algorithms.calibrate` and the
K-means basis/residual formats (:mod:`fixq.algorithms.kmeans`).

Notation (DESIGN.md §3-§5a): ``T`` bits, ``F`` fractional bits per partition (4D: one per
layer, 3D: per output kernel, 2D: per 2D filter), ``mu``/``sigma`` the affine offset/step.
"""
from __future__ import annotations

import torch

from fixq.numerics.formats import fake_quantize
from fixq.numerics.ranges import (MSE_CANDIDATES, F_from_maxabs, F_from_percentile_rows, affine_params, mse_candidates,
                                  parse_method)
from fixq.planning.plan import AffineFormats, Formats, PlanError
from fixq.planning.safety import bound_spread

__all__ = ["weight_formats", "bias_formats"]


def _partitions(w: torch.Tensor, mode: str, groups: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View the weight as (n_partitions, elements) for a granularity; returns grid shape."""
    N = w.shape[0]
    if mode == "4D":
        return w.reshape(1, -1), ()
    if mode == "3D":
        return w.reshape(N, -1), (N,)
    Mg = w.shape[1]
    return w.reshape(N * Mg, -1), (N, Mg)


def _F_for_rows(rows: torch.Tensor, T: int, method: str, rounding: str) -> torch.Tensor:
    """F per row of a (partitions, elements) float tensor."""
    m = parse_method(method)
    amax = rows.abs().amax(dim=1)
    F0 = F_from_maxabs(amax, T)
    if m.kind == "maxabs":
        return F0
    if m.kind == "percentile":
        return F_from_percentile_rows(rows, T, m.p)
    # mse: best of F0 .. F0+4, ties to the smaller F (larger range)
    cands = mse_candidates(F0)
    errs = torch.stack([((fake_quantize(rows, cands[:, k:k + 1], T, rounding)[0] - rows) ** 2).sum(dim=1)
                        for k in range(MSE_CANDIDATES)], dim=1)
    return cands.gather(1, errs.argmin(dim=1, keepdim=True)).squeeze(1)


def weight_formats(w: torch.Tensor, T: int, mode: str, method: str, groups: int = 1,
                   rounding: str = "half_up", bits: torch.Tensor | None = None) -> Formats | AffineFormats:
    """Coefficient formats of one layer. ``bits`` (one word length per partition of
    ``mode``'s grid, e.g. 8 or 4 per 2D filter) makes a mixed-precision layer; ``T`` is
    then ignored.

    >>> f = weight_formats(torch.tensor([[[[0.5, -0.2]]], [[[3.0, 1.0]]]]), 8, "3D", "maxabs")
    >>> f.F, f.shape
    ((8, 5), (2,))
    >>> weight_formats(torch.tensor([[[[0.5, -0.2]]], [[[3.0, 1.0]]]]), 8, "3D", "maxabs",
    ...                bits=torch.tensor([8, 4])).F
    (8, 1)
    """
    rows, shape = _partitions(w.detach().double(), mode, groups)
    if parse_method(method).kind == "affine":
        if bits is not None:
            raise PlanError("mixed precision needs power-of-two formats, not affine")
        mu, sigma = affine_params(rows.amin(dim=1), rows.amax(dim=1), T)
        return AffineFormats(T, mode, tuple(mu.tolist()), tuple(sigma.tolist()), shape)
    nonzero = rows.abs().amax(dim=1) > 0
    if bits is None:
        F = bound_spread(_F_for_rows(rows, T, method, rounding), T, nonzero)  # DESIGN §5a rule 1
        return Formats(T, mode, tuple(F.tolist()), shape)
    bits = torch.as_tensor(bits, dtype=torch.int64).reshape(-1)
    if bits.numel() != rows.shape[0]:
        raise PlanError(f"{bits.numel()} word lengths for {rows.shape[0]} {mode} partitions")
    F = torch.zeros(rows.shape[0], dtype=torch.int64)
    for t in sorted(set(bits.tolist())):
        sel = bits == t
        F[sel] = _F_for_rows(rows[sel], int(t), method, rounding).cpu()
    F = bound_spread(F, bits, nonzero)
    Tp = tuple(int(v) for v in bits.tolist())
    return Formats(max(Tp), mode, tuple(int(v) for v in F.tolist()), shape, Tp=None if len(set(Tp)) == 1 else Tp)


def bias_formats(b: torch.Tensor, T: int) -> Formats:
    """One maxabs format per output channel (paper: biases in their own 8 bits)."""
    F = F_from_maxabs(b.detach().double().abs(), T)
    return Formats(T, "3D", tuple(int(v) for v in F.tolist()), (b.numel(),))
