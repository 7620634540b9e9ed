"""Bounded formats and proved int64 headroom (DESIGN.md §5a): the one rule that keeps the
float64 simulation, the integer engine, the generated C and the QDQ export equal.

Notation: ``T`` bits, ``F`` fractional bits, ``I = T - 1 - F`` integer bits of a
partition; ``Fw``/``Fx`` coefficient/input formats; ``S[i] = max_j Fw[i,j] + Fx[j]`` the
exact-sum format; ``wshift = S - Fw - Fx``; ``A``/``Facc`` accumulator;
``acc_shift = S - Facc``; ``out_shift = Facc - Fy``; ``round_shift`` rounds right for
s > 0 (half_up / nearest_even / floor) and shifts left exactly for s <= 0; ``sat`` clamps
(or wraps) to T bits.

The rule, checked once per plan (:func:`bound_spread` at calibration, :func:`prove_layer`
and :func:`prove_op` wherever integer tables are built):

1. *Spread cap.* Within one tensor's partitions (a layer's coefficients, a per-channel
   data tensor) no nonzero partition has ``I`` more than ``SPREAD_BITS`` below the
   largest ``I_ref``: ``F_p <= T_p - 1 - I_ref + SPREAD_BITS`` (its codes get smaller).
   An all-zero partition keeps eq. 6's ``F = T - 1`` unless that is more than
   ``SPREAD_BITS`` away from ``I_ref``; then it takes ``I = I_ref``.
2. *Shifts.* Every shift the integer programs execute is in ``[-MAX_SHIFT, MAX_SHIFT]``
   (right shifts ``>= 0`` where the table is unsigned).
3. *Headroom.* For every input code (``|x| <= max_code(Tx)``: ``2**(Tx-1)``, unsigned ``2**Tx - 1``), every int64 intermediate has
   ``|v| < 2**HEADROOM_BITS``: the wide sum ``Σ_j Σ_hw |w_q| max_code(Tx) << wshift + |b|``,
   every left-shifted accumulator, every aligned add/pool operand. Proved from the plan's
   formats and coefficient codes, never from data; otherwise ``PlanError`` naming the node
   and the fix.
4. *Exact float64.* A layer whose proved bound is ``>= 2**53`` is checked at run time by
   the exact simulation at ``S`` (a trip raises naming the layer).

>>> import torch
>>> bound_spread(torch.tensor([2, 60, 7]), 8, torch.tensor([True, True, False])).tolist()
[2, 26, 7]
"""
from __future__ import annotations

import torch

from fixq.numerics.formats import code_limits
from .plan import PlanError

__all__ = ["SPREAD_BITS", "MAX_SHIFT", "HEADROOM_BITS", "F64_EXACT_BITS", "max_code", "bound_spread",
           "check_shift", "check_headroom", "prove_layer", "prove_op", "C_LIMITS", "check_table", "INT32_BITS", "sum_fits_int32"]

SPREAD_BITS = 24
MAX_SHIFT = 62
HEADROOM_BITS = 62
INT32_BITS = 31  # the generated C sums a layer in int32 when its partial sums stay below 2**31
F64_EXACT_BITS = 53
_MARGIN = 1.0 + 1e-9  # float64 sums of nonnegative terms: far below this relative error


def max_code(T: int) -> int:
    """Largest |code| of a T-bit data word: ``2**(T-1)`` (two's complement ``qmin``), or
    ``2**T - 1`` for an unsigned :class:`fixq.numerics.formats.Word`.

    >>> from fixq.numerics.formats import Word
    >>> max_code(8), max_code(Word(8, signed=False))
    (128, 255)
    """
    lo, hi = code_limits(T)
    return max(-lo, hi)


def bound_spread(F: torch.Tensor, T, nonzero: torch.Tensor, D: int = SPREAD_BITS) -> torch.Tensor:
    """Rule 1 on the F of one tensor's partitions (any shape; ``T`` an int or per partition;
    ``nonzero`` marks partitions with a nonzero range). Returns the capped F (int64)."""
    F = torch.as_tensor(F, dtype=torch.int64).cpu()
    T = torch.as_tensor(T, dtype=torch.int64).cpu().expand(F.shape)
    nz = torch.as_tensor(nonzero, dtype=torch.bool).cpu().expand(F.shape)
    if F.numel() == 0 or not bool(nz.any()):
        return F.clone()
    I = T - 1 - F
    I_ref = int(I[nz].max())
    I_new = torch.where(nz, torch.clamp(I, min=I_ref - D), I)
    if abs(I_ref) > D:  # eq. 6's I = 0 of a dead partition is too far from the layer's range
        I_new = torch.where(nz, I_new, torch.full_like(I, I_ref))
    return T - 1 - I_new


_FAR = ("the formats involved are too far apart to compute exactly in int64 (a dead or extreme-range "
        "partition, tensor or layer output); lower the bits, use coarser partitions (3D/4D), or rescale "
        "the tiny/huge weights or channels")


def check_shift(where: str, what: str, s, lo: int = -MAX_SHIFT, hi: int = MAX_SHIFT, fix: str = _FAR) -> None:
    """Rule 2: every value of shift table ``what`` in ``[lo, hi]``, else PlanError."""
    s = torch.as_tensor(s)
    if s.numel() == 0:
        return
    a, b = int(s.min()), int(s.max())
    if a < lo or b > hi:
        raise PlanError(f"{where}: {what} shifts span [{a}, {b}], outside [{lo}, {hi}]: {fix}")


def check_headroom(where: str, what: str, bound: float, fix: str) -> None:
    """Rule 3: a worst-case magnitude below ``2**HEADROOM_BITS``, else PlanError."""
    if not bound * _MARGIN < 2.0 ** HEADROOM_BITS:
        raise PlanError(f"{where}: worst-case {what} reaches 2^{torch.tensor(float(bound)).log2().item():.1f}, "
                        f"beyond the int64 headroom 2^{HEADROOM_BITS} the integer engine and C need; {fix}")


def _pow2(s: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, s.double())


def prove_layer(name: str, wabs: torch.Tensor, wshift: torch.Tensor, Tx: int, bias: torch.Tensor,
                acc_shift: torch.Tensor, out_shift: torch.Tensor, A: int, bounds=(None, None),
                basis: tuple | None = None) -> float:
    """Rules 2-3 for one conv/linear; returns the proved worst-case ``max_i |sum_i|`` at S.

    ``wabs`` (N, Mg): ``Σ_hw |w_q[i,j]|``; ``wshift`` (N, Mg); ``bias`` (N,) aligned to S;
    ``bounds`` the activation clamp codes at Facc (or None); ``basis`` =
    ``(gabs (K, Mg), gshift (K, Mg), assign (N,), align (N,))`` for a K-means layer."""
    where = f"layer '{name}'"
    check_shift(where, "weight (S - Fw - Fx)", wshift, 0)
    check_shift(where, "accumulator (S - Facc)", acc_shift, 0)
    check_shift(where, "output (Facc - Fy)", out_shift)
    xmax = float(max_code(Tx))
    per_i = (wabs.double() * _pow2(wshift)).sum(dim=1) * xmax
    if basis is not None:
        gabs, gshift, assign, align = basis
        check_shift(where, "K-means basis (Sg - Fg - Fx)", gshift, 0)
        check_shift(where, "K-means basis alignment (S - Sg)", align, 0)
        g = (gabs.double() * _pow2(gshift)).sum(dim=1) * xmax
        per_i = per_i + g[assign] * _pow2(align)
    per_i = per_i + bias.double().abs()
    fix = ("lower the data or coefficient bits, use coarser partitions (3D/4D), or rescale the layer "
           "(a bias far above its weights' range, or formats far apart)")
    total = float(per_i.max()) if per_i.numel() else 0.0
    check_headroom(where, "exact sum at S", total, fix)
    acc = 2.0 ** (A - 1)  # |acc| after sat_A; a clamp raises it only by a positive lo or a negative hi
    for c, sign in zip(bounds, (1, -1)):
        if c is not None and c.numel():
            acc = max(acc, float((sign * c).clamp(min=0).max()))
    left = int(torch.clamp(-out_shift, min=0).max()) if out_shift.numel() else 0
    check_headroom(where, "accumulator shifted left to the output format", acc * 2.0 ** left,
                   "the output format is far finer than the accumulator's; lower A or the data bits")
    return total


def prove_op(name: str, operands, out_shift=None) -> float:
    """Rules 2-3 for an add, concat piece or average pool: ``operands`` is a list of
    ``(max |v|, left shift table)``; the aligned sum of them must fit, and ``out_shift``
    (right > 0, left < 0) must too. Returns the proved bound."""
    where = f"node '{name}'"
    total = 0.0
    for m, sh in operands:
        sh = torch.as_tensor(sh)
        check_shift(where, "alignment", sh, 0)
        total += float(m) * 2.0 ** (int(sh.max()) if sh.numel() else 0)
    check_headroom(where, "aligned operands", total, "its inputs' formats are too far apart; lower the bits "
                   "or rescale the tiny input")
    if out_shift is not None:
        os_ = torch.as_tensor(out_shift)
        check_shift(where, "output", os_)
        left = int(torch.clamp(-os_, min=0).max()) if os_.numel() else 0
        check_headroom(where, "value shifted left to the output format", total * 2.0 ** left,
                       "the output format is far finer than its input's")
    return total


def sum_fits_int32(wabs: torch.Tensor, wshift: torch.Tensor, Tx) -> bool:
    """The C runtime's 32-bit rule for one conv/linear (the bias, K-means basis and the
    rounding stay in int64): with one weight shift per output channel (``wshift`` (N, Mg)
    constant along j) the dot products ``Σ_j Σ_hw w_q x_q`` are summed before the shift, so
    ``max_i Σ_j Σ_hw |w_q| max_code(Tx) < 2**31`` suffices; with per-filter shifts the shifted
    partial sums are summed in int32, so ``max_i Σ_j Σ_hw |w_q| max_code(Tx) 2**wshift < 2**31``
    and every shift <= 30. ``wabs`` (N, Mg) is ``Σ_hw |w_q|``.

    >>> sum_fits_int32(torch.tensor([[127 * 9] * 16]), torch.zeros(1, 16, dtype=torch.long), 8)
    True
    >>> sum_fits_int32(torch.tensor([[32767 * 9] * 16]), torch.zeros(1, 16, dtype=torch.long), 16)
    False
    """
    if wabs.numel() == 0:
        return True
    xmax = float(max_code(Tx))
    if bool((wshift == wshift[:, :1]).all()):
        worst = float(wabs.double().sum(dim=1).max()) * xmax
    else:
        if int(wshift.max()) > INT32_BITS - 1:
            return False
        worst = float((wabs.double() * _pow2(wshift)).sum(dim=1).max()) * xmax
    return worst < 2.0 ** INT32_BITS


C_LIMITS = {"int8_t": (-128, 127), "uint8_t": (0, 255), "int16_t": (-2 ** 15, 2 ** 15 - 1),
            "uint16_t": (0, 2 ** 16 - 1),
            "int32_t": (-2 ** 31, 2 ** 31 - 1), "int64_t": (-2 ** 63, 2 ** 63 - 1)}


def check_table(name: str, ctype: str, values) -> None:
    """The C emitter's check that every value of a table fits its C type (PlanError)."""
    lo, hi = C_LIMITS[ctype]
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise PlanError(f"C table {name}: value {bad[0]} does not fit {ctype} [{lo}, {hi}]")
