"""The one place where a layer's float coefficients and bias become integer codes.

Every backend takes its codes from here: the integer engine and everything built on its
tables (:func:`fixq.backends.lowering.lower_layer`: the C export, QDQ ONNX, the accumulator table),
both simulation precisions (:func:`layer_values`, the codes times ``2**-F``), and K-means
residuals. A plan that stores decided codes (:class:`fixq.planning.plan.LayerCodes`: learned
rounding, bias correction) is therefore consumed identically, bit for bit, everywhere.

Notation (DESIGN.md §2, §5, §9): ``X`` the values rounded (the weight, or a K-means layer's
residual ``R = W - Gq[l]``), ``O`` what is added back (0, or the quantized basis), ``F`` the
partition's fractional bits, ``T`` its bits, codes in ``[lo, hi] = [-2**(T-1), 2**(T-1)-1]``.
Nearest: ``q = sat_T(round(X 2**F))`` with the model's rounding mode. Decided rounding:
``q = sat_T(floor(X 2**F) + up)``, ``up`` in {0, 1} one bit per coefficient (C order of the
weight tensor), stored as base64 of a little-endian bitmask with the digest of the float
weights it was decided for: a plan whose digest does not match the weights is refused.

>>> up = torch.tensor([True, False, True, True, False, False, False, False, True])
>>> pack_bits(up), torch.equal(unpack_bits(pack_bits(up), 9), up)
('DQE=', True)
"""
from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass

import torch

from fixq.numerics.formats import exp2, round_values, saturate
from .plan import KMeansPlan, LayerPlan, PlanError, filter_grid

__all__ = ["CoeffGrid", "coeff_grid", "layer_codes", "layer_values", "bias_codes", "weights_digest",
           "pack_bits", "unpack_bits", "check_codes", "broadcast_F", "basis_values", "kmeans_residual",
           "basis_grid", "assign_bits"]


def pack_bits(up: torch.Tensor) -> str:
    """Base64 of a bool tensor's bits (C order; bit k of byte k // 8 is element k)."""
    b = up.reshape(-1).to(torch.uint8)
    pad = (-b.numel()) % 8
    b = torch.cat([b, b.new_zeros(pad)]).reshape(-1, 8)
    by = (b << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.int64).to(torch.uint8)
    return base64.b64encode(bytes(by.tolist())).decode("ascii")


def unpack_bits(s: str, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` bools; raises ValueError on a malformed string."""
    raw = base64.b64decode(s.encode("ascii"), validate=True)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"{len(raw)} bytes for {n} coefficients (want {(n + 7) // 8})")
    by = torch.tensor(list(raw), dtype=torch.int64)
    bits = (by[:, None] >> torch.arange(8)) & 1
    return bits.reshape(-1)[:n].bool()


def weights_digest(n) -> str:
    """sha256 (first 16 hex digits) of the layer's float weights and bias, as float64 bytes:
    what decided codes are bound to."""
    h = hashlib.sha256()
    for t in (n.weight, n.bias):
        if t is not None:
            v = t.detach().double().cpu().contiguous()
            h.update(str(tuple(v.shape)).encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CoeffGrid:
    """What one layer rounds: ``X`` (float64, weight shape), ``O`` (None or float64), ``F``
    and code limits broadcast over ``X``; ``T`` as the saturation takes it."""

    x: torch.Tensor
    offset: torch.Tensor | None
    F: torch.Tensor
    T: object
    lo: torch.Tensor
    hi: torch.Tensor

    def scaled(self) -> torch.Tensor:
        return self.x * exp2(self.F, self.x)

    def nearest(self, rounding: str) -> torch.Tensor:
        return saturate(round_values(self.scaled(), rounding), self.T)[0].long()

    def decided(self, up: torch.Tensor) -> torch.Tensor:
        """``sat(floor(X 2**F) + up)``: always inside the partition's code range."""
        q = torch.floor(self.scaled()) + up.reshape(self.x.shape).to(self.x.dtype)
        return saturate(q, self.T)[0].long()

    def steps(self, codes: torch.Tensor) -> torch.Tensor:
        """``q 2**-F`` (float64, exact): the rounded part alone (a K-means layer's residual branch)."""
        return codes.double() * exp2(-self.F, self.x)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Real coefficients of codes (float64, exact): ``O + q 2**-F``."""
        v = self.steps(codes)
        return v if self.offset is None else self.offset + v


def broadcast_F(F: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A formats grid ``F`` shaped to broadcast over weights ``w`` (K or N leading)."""
    return F.reshape(F.shape + (1,) * (w.dim() - F.dim())) if F.dim() else F


def coeff_grid(n, lp: LayerPlan) -> CoeffGrid:
    """The grid of layer ``n`` under plan entry ``lp`` (power-of-two coefficients)."""
    w = n.weight.detach().double().cpu()
    wf = lp.weight
    offset = None
    if lp.kmeans is not None:
        offset = basis_values(lp.kmeans, tuple(w.shape[1:]))[lp.kmeans.assign_tensor()]
        x = w - offset  # exact in float64 (DESIGN §9)
    else:
        x = w
    F = broadcast_F(wf.F_tensor(), x)
    if wf.Tp is None:
        T = wf.T
        lo, hi = torch.tensor(-(1 << (T - 1)), dtype=torch.int64), torch.tensor((1 << (T - 1)) - 1, dtype=torch.int64)
    else:
        T = broadcast_F(wf.bits(), x)
        hi = (torch.ones_like(T) << (T - 1)) - 1
        lo = -hi - 1
    return CoeffGrid(x, offset, F, T, lo, hi)


def _where(name: str, key: str) -> str:
    return f"$.layers[{name!r}].codes.{key}"


def check_codes(n, lp: LayerPlan) -> None:
    """Refuse decided codes that do not belong to this layer's weights or formats."""
    c = lp.codes
    if c is None:
        return
    got = weights_digest(n)
    if c.digest != got:
        raise PlanError(f"layer '{n.name}': {_where(n.name, 'digest')} is {c.digest} but the weights give {got}: "
                        "the plan's decided codes (learned rounding / bias correction) were made for other weights; "
                        "use the weights the plan was made with, or re-run with --learned-rounding")
    if c.up is not None:
        if lp.weight is None or not hasattr(lp.weight, "F"):
            raise PlanError(f"layer '{n.name}': {_where(n.name, 'up')} needs power-of-two coefficient formats")
        try:
            unpack_bits(c.up, n.weight.numel())
        except ValueError as e:
            raise PlanError(f"layer '{n.name}': {_where(n.name, 'up')} is not the base64 bitmask of its "
                            f"{n.weight.numel()} coefficients ({e})") from None
    if c.bias is not None:
        if lp.bias is None or n.bias is None or len(c.bias) != n.weight.shape[0]:
            raise PlanError(f"layer '{n.name}': {_where(n.name, 'bias')} needs a bias and one code per output "
                            f"channel ({n.weight.shape[0]})")
        lim = 1 << (lp.bias.T - 1)
        bad = [v for v in c.bias if not -lim <= v < lim]
        if bad:
            raise PlanError(f"layer '{n.name}': {_where(n.name, 'bias')} has {bad[0]}, outside the {lp.bias.T}-bit "
                            f"bias range [{-lim}, {lim - 1}]")


def layer_codes(n, lp: LayerPlan, rounding: str) -> torch.Tensor:
    """int64 coefficient codes of layer ``n`` (weight shape; K-means: the residual codes):
    the plan's decided rounding when it has one, else the model's rounding mode."""
    check_codes(n, lp)
    g = coeff_grid(n, lp)
    if lp.codes is not None and lp.codes.up is not None:
        return g.decided(unpack_bits(lp.codes.up, n.weight.numel()))
    return g.nearest(rounding)


def layer_values(n, lp: LayerPlan, rounding: str) -> torch.Tensor:
    """The coefficients the quantized layer applies (float64, exact): ``O + q 2**-F``."""
    return coeff_grid(n, lp).values(layer_codes(n, lp, rounding))


def bias_codes(n, lp: LayerPlan, rounding: str) -> torch.Tensor | None:
    """int64 bias codes at ``lp.bias`` (corrected codes from the plan when it has them)."""
    if n.bias is None or lp.bias is None:
        return None
    check_codes(n, lp)
    if lp.codes is not None and lp.codes.bias is not None:
        return torch.tensor(lp.codes.bias, dtype=torch.int64)
    b = n.bias.detach().double().cpu()
    return saturate(round_values(b * exp2(lp.bias.F_tensor(), b), rounding), lp.bias.T)[0].long()


def basis_values(km: KMeansPlan, kernel_shape) -> torch.Tensor:
    """``Gq``: the K-means basis kernels' real values (float64, exact; DESIGN §9)."""
    codes = km.basis_tensor(kernel_shape).double()
    return codes * exp2(-broadcast_F(km.basis.F_tensor(), codes), codes)


def kmeans_residual(w: torch.Tensor, km: KMeansPlan) -> torch.Tensor:
    """``R_i = F_i - Gq[l(i)]`` in float64 (exact: both sides have short mantissas)."""
    w = w.detach().double().cpu()
    return w - basis_values(km, tuple(w.shape[1:]))[km.assign_tensor()]


def basis_grid(km: KMeansPlan, Mg: int) -> torch.Tensor:
    """The basis kernels' formats per 2D filter, ``(K, Mg)``."""
    return filter_grid(km.basis.F_tensor(), km.K, Mg)


def assign_bits(K: int) -> int:
    """Bits of one kernel's basis index ``l(i)`` (at least 1)."""
    return max(1, math.ceil(math.log2(K)))
