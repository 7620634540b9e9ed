"""K-means clustered kernels: basis kernels at the base precision plus low-precision
residuals (paper §6, eq. 9; DESIGN §9).

Notation: N output kernels ``F_i`` of one layer, K basis kernels ``G_k``, assignment
``l(i)``; ``Gq`` the basis quantized to ``Q(Tb, Fg)`` (per basis kernel, 3D, or per basis
2D filter, 2D); residual ``R_i = F_i - Gq[l(i)]`` quantized to ``Q(Tr, Fr)``. The layer
computes ``y_i = b_i + Gq[l(i)] * x + Rq_i * x``: K basis maps shared by all kernels, one
residual conv per kernel, both summed exactly into one accumulator (DESIGN §5). The
residual is taken against the *quantized* basis, so it also absorbs the basis's rounding
error, and ``Gq[l(i)] + R_i == F_i`` holds exactly in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fixq.numerics.formats import quantize_codes
from fixq.numerics.ranges import parse_method
from fixq.planning.coeffs import broadcast_F, kmeans_residual
from fixq.planning.partitions import input_point, propagate_formats
from fixq.planning.plan import Formats, KMeansPlan, PlanError
from fixq.planning.safety import bound_spread
from .coeff_formats import weight_formats
from .observe import _data_F, _magnitude_T, _nonzero

__all__ = ["KMeansError", "Clustering", "check_K", "cluster_kernels", "kmeans_layer", "layer_savings",
           "residual_data_formats"]


class KMeansError(PlanError):
    """A K-means request a layer cannot take (K out of range, grouped conv)."""


@dataclass(frozen=True)
class Clustering:
    centers: torch.Tensor   # float64 (K, M/groups, kh, kw) (or (K, M) for a linear layer)
    assign: torch.Tensor    # int64 (N,)
    inertia: float
    seed: int


def check_K(K: int, N: int, layer: str = "layer") -> int:
    """K must be a whole number with 1 <= K < N (K >= N clusters nothing)."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise KMeansError(f"{layer}: K must be at least 1 basis kernel, got {K!r}")
    if K >= N:
        raise KMeansError(f"{layer}: K={K} basis kernels for {N} kernels clusters nothing (K must be below N; "
                          f"K < N/2 saves complexity with 4-bit residuals)")
    return K


def cluster_kernels(w: torch.Tensor, K: int, seed: int = 0, restarts: int = 4, layer: str = "layer") -> Clustering:
    """k-means++ (scikit-learn, ``restarts`` initialisations, fixed ``seed``) over the N
    flattened kernels of ``w``.

    >>> c = cluster_kernels(torch.tensor([[0.0, 1.0], [0.1, 1.0], [5.0, 5.0]]), 2)
    >>> sorted(c.assign.tolist())
    [0, 0, 1]
    """
    from sklearn.cluster import KMeans
    N = w.shape[0]
    check_K(K, N, layer)
    X = w.detach().double().reshape(N, -1).cpu().numpy()
    if not torch.isfinite(torch.from_numpy(X)).all():
        raise KMeansError(f"{layer}: weights contain NaN or Inf")
    km = KMeans(n_clusters=K, init="k-means++", n_init=restarts, random_state=seed).fit(X)
    centers = torch.from_numpy(km.cluster_centers_.copy()).double().reshape(K, *w.shape[1:])
    return Clustering(centers, torch.from_numpy(km.labels_.copy()).long(), float(km.inertia_), seed)


def kmeans_layer(w: torch.Tensor, c: Clustering, base_bits: int, residual_bits: int, mode: str, method: str,
                 rounding: str = "half_up") -> tuple[KMeansPlan, Formats]:
    """Basis formats and codes, then residual formats, for one layer of groups=1."""
    K = c.centers.shape[0]
    bf = weight_formats(c.centers, base_bits, mode, method, 1, rounding)
    if not isinstance(bf, Formats):
        raise KMeansError("K-means needs power-of-two formats (maxabs, percentile or mse), not affine")
    codes = quantize_codes(c.centers, broadcast_F(bf.F_tensor(), c.centers), base_bits, rounding)[0].long()
    km = KMeansPlan(K, tuple(int(v) for v in c.assign.tolist()), bf, tuple(int(v) for v in codes.reshape(-1).tolist()),
                    c.seed)
    rf = weight_formats(kmeans_residual(w, km), residual_bits, mode, method, 1, rounding)
    return km, rf


def residual_data_formats(obs, layer: str, T: int, cfg, rounding: str, tensors: dict) -> Formats:
    """``<4b,4b>`` residuals (paper eq. 9): the format the residual kernels of ``layer``
    read, ``T`` bits calibrated like any data format (the input's quantization point's
    statistics, range method, 4D/3D mode and sign; ``cfg`` is that point's LayerConfig),
    then carried to the layer input as its 8-bit format is (pads, pools, flatten).

    >>> residual_data_formats(obs, "layer2.0.conv1", 4, cfg, "half_up", plan.tensors).T   # doctest: +SKIP
    4
    """
    graph = obs.graph
    q = input_point(graph, layer)
    base = tensors.get(q)
    if not isinstance(base, Formats):
        raise KMeansError(f"layer '{layer}': residual data bits need a fixed-point input (its input '{q}' is "
                          "floating point or affine)")
    method = parse_method(cfg.effective_data_method)
    st, mode, signed = obs.stats[q], base.granularity, base.signed
    Tm = _magnitude_T(T, signed)
    if method.kind == "mse":
        F = obs.mse_F([(q, T, mode, signed)], rounding)[(q, T, mode, signed)]
    else:
        F = _data_F(st, Tm, mode, str(method))
    F = bound_spread(F, Tm, _nonzero(st, mode))
    own = Formats(T, mode, tuple(int(v) for v in F.tolist()), (F.numel(),) if mode == "3D" else (), signed=signed)
    word, Fin = propagate_formats(graph, {**tensors, q: own})[graph.node(layer).inputs[0]]
    return Formats(T, "4D" if Fin.dim() == 0 else "3D", tuple(int(v) for v in Fin.reshape(-1).tolist()),
                   () if Fin.dim() == 0 else (Fin.numel(),), signed=word.signed)


def layer_savings(N: int, K: int, base_bits: int = 8, residual_bits: int = 4, data_bits: int = 8,
                  residual_data_bits: int | None = None) -> float:
    """Complexity savings of a K-means layer vs all kernels at ``<base_bits, data_bits>``
    (DESIGN §7): K basis kernels at full cost plus N residual kernels at
    ``<residual_bits, residual_data_bits>`` (default: the layer's data bits).

    >>> layer_savings(64, 6)   # (0.5 N - K) / N
    0.40625
    >>> layer_savings(64, 6, residual_data_bits=4)   # <4b,4b> residuals: (0.75 N - K) / N
    0.65625
    """
    rdb = data_bits if residual_data_bits is None else residual_data_bits
    return (N - K - N * (residual_bits * rdb) / (base_bits * data_bits)) / N
