"""Fixed-point formats Q(T, F), rounding and saturation (DESIGN.md §2).

Notation used throughout fixq:

- ``T``  total bits of a signed two's complement word, 2..32
- ``F``  fractional bits, any integer (negative: step > 1; above T-1: range < 1)
- ``I``  integer bits, ``I = T - 1 - F``
- ``q``  integer code in ``[qmin, qmax] = [-2**(T-1), 2**(T-1) - 1]``; value ``q * 2**-F``
- ``U(T, F)`` the unsigned data format (beyond the paper): codes ``[0, 2**T - 1]``, same value
  rule; used for tensors that are non-negative by construction (a graph rule, never data).
  A data word length with its signedness is a :class:`Word` (an ``int`` that knows it)
- rounding ``half_up`` = floor(v + 1/2) (DSP default), ``nearest_even``, ``floor``
- saturation ``saturate`` clamps to ``[qmin, qmax]``; ``wrap`` is two's complement overflow

Everything here is a pure function of tensors (torch, float or integer dtype) or Python
ints. ``F`` may be a tensor broadcastable against the data: one format per partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ROUNDINGS",
    "OVERFLOWS",
    "QFormat",
    "check_bits",
    "check_rounding",
    "round_values",
    "round_shift",
    "round_shift_int",
    "saturate",
    "quantize_codes",
    "fake_quantize",
    "exp2",
    "quantize_scalar",
    "round_div",
    "per_channel",
    "bound_codes",
    "Word",
    "code_limits",
]

ROUNDINGS = ("half_up", "nearest_even", "floor")
OVERFLOWS = ("saturate", "wrap")
MIN_BITS, MAX_BITS = 2, 32


def check_bits(T: int, what: str = "bit width") -> int:
    """Validate a word length; raise ValueError naming ``what`` otherwise."""
    if isinstance(T, bool) or not isinstance(T, int) or not (MIN_BITS <= T <= MAX_BITS):
        raise ValueError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {T!r}")
    return T


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding


@dataclass(frozen=True)
class QFormat:
    """One fixed-point format ``Q(T, F)``.

    >>> q = QFormat(8, 5)
    >>> (q.I, q.qmin, q.qmax, q.step)
    (2, -128, 127, 0.03125)
    """

    T: int
    F: int

    def __post_init__(self) -> None:
        check_bits(self.T, "total bits T")
        if isinstance(self.F, bool) or not isinstance(self.F, int):
            raise ValueError(f"fractional bits F must be an integer, got {self.F!r}")

    @property
    def I(self) -> int:  # noqa: E743 - the paper's name
        return self.T - 1 - self.F

    @property
    def qmin(self) -> int:
        return -(1 << (self.T - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.T - 1)) - 1

    @property
    def step(self) -> float:
        return 2.0 ** -self.F

    @property
    def min_value(self) -> float:
        return self.qmin * self.step

    @property
    def max_value(self) -> float:
        return self.qmax * self.step

    def __str__(self) -> str:
        return f"Q({self.T},{self.F})"


class Word(int):
    """A data word length ``T`` and its signedness: ``Word(8)`` is Q(8, F) (codes -128..127),
    ``Word(8, signed=False)`` is U(8, F) (codes 0..255). It is an ``int`` (the bit count), so
    every bit-width computation keeps working; :func:`saturate` reads the signedness.

    >>> w = Word(8, signed=False)
    >>> (int(w), w.signed, str(w), code_limits(w))
    (8, False, 'U8', (0, 255))
    """

    signed: bool

    def __new__(cls, T: int, signed: bool = True):
        w = super().__new__(cls, int(T))
        w.signed = bool(signed)
        return w

    def __repr__(self) -> str:
        return f"Word({int(self)}, signed={self.signed})"

    def __str__(self) -> str:
        return f"{'' if self.signed else 'U'}{int(self)}"

    def __reduce__(self):
        return (Word, (int(self), self.signed))


def code_limits(T: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of a T-bit word: signed two's complement, or ``[0, 2**T - 1]`` for
    an unsigned :class:`Word`.

    >>> code_limits(8), code_limits(Word(4, signed=False))
    ((-128, 127), (0, 15))
    """
    if not getattr(T, "signed", True):
        return 0, (1 << int(T)) - 1
    hi = (1 << (int(T) - 1)) - 1
    return -hi - 1, hi


def round_values(v: torch.Tensor, rounding: str = "half_up") -> torch.Tensor:
    """Round a float tensor to integers with the given mode (floating result)."""
    if rounding == "half_up":
        return torch.floor(v + 0.5)
    if rounding == "nearest_even":
        return torch.round(v)  # torch.round is round-half-to-even
    if rounding == "floor":
        return torch.floor(v)
    raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def round_shift_int(a: int, s: int, rounding: str = "half_up") -> int:
    """Integer ``a * 2**-s`` rounded (s > 0) or exactly shifted left (s <= 0).

    >>> round_shift_int(5, 1), round_shift_int(-5, 1), round_shift_int(3, -2)
    (3, -2, 12)
    """
    if s <= 0:
        return a << (-s)
    if rounding == "half_up":
        return (a + (1 << (s - 1))) >> s
    if rounding == "floor":
        return a >> s
    if rounding == "nearest_even":
        q = a >> s
        r = a - (q << s)
        half = 1 << (s - 1)
        return q + (1 if (r > half or (r == half and q & 1)) else 0)
    raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def round_shift(a: torch.Tensor, s, rounding: str = "half_up", inplace: bool = False) -> torch.Tensor:
    """Integer tensor ``a * 2**-s``: rounded arithmetic right shift where s > 0, exact left
    shift where s <= 0. ``s`` broadcasts against ``a`` (one shift per partition).
    ``inplace``: ``a`` (int64, not broadcast by ``s``) may be overwritten with the result.

    This is what the integer engine and the C runtime do; the float formula
    ``round_values(a * 2**-s)`` gives the same integers (property-tested).

    >>> round_shift(torch.tensor([5, -5, 6]), 1).tolist(), round_shift(torch.tensor([3]), -2).tolist()
    ([3, -2, 3], [12])
    """
    s = torch.as_tensor(s, dtype=torch.int64, device=a.device)
    inplace = inplace and a.dtype == torch.int64 and torch.broadcast_shapes(a.shape, s.shape) == a.shape
    a = a.to(torch.int64)
    if s.numel() and rounding in ("half_up", "floor"):  # one-sided shift tables (the usual case): fewer passes
        if not bool(s.any()):
            return a if inplace else a.clone()
        if bool((s <= 0).all()):
            return a.__ilshift__(-s) if inplace else a << -s
        if bool((s > 0).all()):  # half_up: floor(a / 2**s + 1/2) = ceil(b / 2) = b - (b >> 1), b = a >> (s - 1)
            if rounding == "floor":
                return a.__irshift__(s) if inplace else a >> s
            b = a.__irshift__(s - 1) if inplace else a >> (s - 1)
            return b.sub_(b >> 1)  # no overflow anywhere in int64
        left, right = torch.clamp(-s, min=0), torch.clamp(s, min=0)  # both signs: one of them is 0 per entry
        if rounding == "floor":
            return (a.__ilshift__(left) if inplace else a << left).__irshift__(right)
        # half_up: b = floor(a * 2**(1 - s)) = (a << (1 - s)) where s <= 0, a >> (s - 1) where s > 0; then ceil(b / 2)
        L = int(left.max()) + 1
        if a.numel() and L < 63:
            mn, mx = torch.aminmax(a)
            if -int(mn) <= 2 ** (62 - L) and int(mx) < 2 ** (62 - L):  # b = a << (1 - s) fits int64
                b = (a.__ilshift__(left + 1) if inplace else a << (left + 1)).__irshift__(right)
                return b.sub_(b >> 1)
    right = torch.clamp(s, min=0)
    left = torch.clamp(-s, min=0)
    shifted_left = a << left
    if rounding == "half_up":  # floor(a / 2**s + 1/2) = (a >> s) + bit s-1 of a: no a + half overflow
        out = (a >> right) + (((a >> torch.clamp(right - 1, min=0)) & 1) & (right > 0).to(torch.int64))
    elif rounding == "floor":
        out = a >> right
    elif rounding == "nearest_even":
        q = a >> right
        r = a - (q << right)
        half = torch.where(right > 0, torch.ones_like(right) << torch.clamp(right - 1, min=0), 0)
        up = (r > half) | ((r == half) & (right > 0) & ((q & 1) == 1))
        out = q + up.to(torch.int64)
    else:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return torch.where(s > 0, out, shifted_left)


def _limits(T, q: torch.Tensor):
    """``(lo, hi)`` of T-bit codes: Python ints for one T, tensors for per-partition T."""
    if isinstance(T, int):
        return code_limits(T)
    T = torch.as_tensor(T, device=q.device, dtype=torch.int64)
    hi = (torch.ones_like(T) << (T - 1)) - 1
    return (-hi - 1).to(q.dtype), hi.to(q.dtype)


def saturate(q: torch.Tensor, T, overflow: str = "saturate") -> tuple[torch.Tensor, torch.Tensor]:
    """Bring integer-valued ``q`` into ``T`` bits. Returns ``(q, events)`` where ``events``
    is a 0-d tensor counting the elements that were out of range.

    Works on float tensors holding integers (simulation) and on int64 tensors (engine).
    ``T`` may be a tensor (one word length per partition).
    """
    lo, hi = _limits(T, q)
    if overflow == "saturate":
        if isinstance(lo, int):
            if q.numel():  # one read-only pass; most tensors need no clamp (returned as they are)
                mn, mx = torch.aminmax(q)
                if bool(mn >= lo) and bool(mx <= hi):  # NaN compares False: clamped below
                    return q, torch.zeros((), dtype=torch.int64, device=q.device)
            out = torch.clamp(q, lo, hi)
        else:
            out = torch.minimum(torch.maximum(q, lo), hi)
        return out, torch.count_nonzero(out != q)
    if overflow == "wrap":
        events = torch.count_nonzero((q > hi) | (q < lo))
        span = hi - lo + 1
        return torch.remainder(q - lo, span) + lo, events
    raise ValueError(f"overflow must be one of {', '.join(OVERFLOWS)}, got {overflow!r}")


def exp2(F, like: torch.Tensor) -> torch.Tensor:
    """``2**F`` (F integer, scalar or per-partition) as a tensor of ``like``'s dtype and
    device; exact in float32/float64 for the exponents fixed point uses."""
    F = torch.as_tensor(F, device=like.device)
    return torch.pow(2.0, F.to(like.dtype))


def quantize_codes(x: torch.Tensor, F, T, rounding: str = "half_up",
                   overflow: str = "saturate") -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``x`` to integer codes ``sat(round(x * 2**F))`` (same dtype as x).

    >>> quantize_codes(torch.tensor([0.3, 5.0, -5.0]), 4, 8)[0]
    tensor([  5.,  80., -80.])
    """
    return saturate(round_values(x * exp2(F, x), rounding), T, overflow)


def fake_quantize(x: torch.Tensor, F, T, rounding: str = "half_up",
                  overflow: str = "saturate", inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(x) = sat(round(x * 2**F)) * 2**-F`` (DESIGN §2); returns values and
    the number of saturation events. ``inplace``: ``x`` is a temporary of the caller's and
    may be overwritten (same values, one tensor of its size fewer).

    >>> fake_quantize(torch.tensor([0.3, 9.0]), 4, 8)[0]
    tensor([0.3125, 7.9375])
    """
    s = exp2(F, x)
    inplace = inplace and not x.requires_grad and torch.broadcast_shapes(x.shape, s.shape) == x.shape
    if rounding == "half_up":  # floor(x*s + 1/2) in one fused pass (written over x when inplace)
        half = torch.full((), 0.5, dtype=x.dtype, device=x.device)
        v = (torch.addcmul(half, x, s, out=x) if inplace else torch.addcmul(half, x, s)).floor_()
    else:
        v = round_values(x.mul_(s) if inplace else x * s, rounding)
    q, events = saturate(v, T, overflow)
    return q.mul_(torch.reciprocal(s)), events  # q is a new tensor (x when inplace); 1/2**F is exact: * is / 2**F


def quantize_scalar(v: float, F: int, rounding: str = "half_up") -> int:
    """Exact integer code of a Python float at F fractional bits (no float rounding).

    >>> quantize_scalar(6.0, -2), quantize_scalar(0.1, 4), quantize_scalar(-0.09375, 4, "nearest_even")
    (2, 2, -2)
    """
    from fractions import Fraction
    fr = Fraction(v) * (Fraction(2) ** F)
    return _round_fraction(fr, rounding)


def _round_fraction(fr, rounding: str) -> int:
    import math
    if rounding == "floor":
        return math.floor(fr)
    if rounding == "half_up":
        return math.floor(fr + fr.__class__(1, 2))
    if rounding == "nearest_even":
        return round(fr)  # Fraction.__round__ rounds half to even
    raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def round_div(n: torch.Tensor, d: torch.Tensor, rounding: str = "half_up") -> torch.Tensor:
    """Integer ``n / d`` (d > 0) rounded with the model's rounding mode, in integers only.

    >>> round_div(torch.tensor([5, -5, 7, 6]), torch.tensor(2))
    tensor([ 3, -2,  4,  3])
    """
    n = n.to(torch.int64)
    d = torch.as_tensor(d, dtype=torch.int64, device=n.device)
    q = torch.div(n, d, rounding_mode="floor")
    r = n - q * d
    if rounding == "floor":
        return q
    if rounding == "half_up":
        return q + (2 * r >= d).to(torch.int64)
    if rounding == "nearest_even":
        return q + ((2 * r > d) | ((2 * r == d) & (q % 2 == 1))).to(torch.int64)
    raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def per_channel(F: torch.Tensor, n: int) -> torch.Tensor:
    """A format vector of length n: a 0-d F (one format) repeated, else F itself."""
    return F.expand(n).clone() if F.dim() == 0 else F.clone()


def bound_codes(act, F: torch.Tensor, n: int, rounding: str = "half_up"):
    """Codes ``(lo, hi)`` (int64 per channel, or None) of clamp bounds ``act = (lo, hi)``
    on the grid F (0-d or per channel), quantized exactly: ReLU6's 6 at F=4 is 96."""
    Fv = per_channel(F, n).tolist()
    lim = 2 ** 62  # every proved int64 value is below this (DESIGN §5a): clipping there changes nothing

    def codes(b):
        at = {f: max(-lim, min(lim, quantize_scalar(b, int(f), rounding))) for f in set(Fv)}  # once per distinct F
        return torch.tensor([at[f] for f in Fv], dtype=torch.int64)
    return tuple(None if b is None else codes(b) for b in act)
