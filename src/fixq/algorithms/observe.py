"""Calibration statistics: the float model observed on the calibration images (pass 1:
per-channel max|x|, min, max, exponent histograms, accumulator ranges; pass 2 for ``mse``
data: squared error of the five candidate F's), streamed batch by batch.

Notation (DESIGN.md §3): ``T`` bits, ``F`` fractional bits per partition.

Bounded and exact for any number of processes: pass 1 keeps per-channel maxima, minima and
integer histograms (reduced over ranks by max/min/sum, which do not depend on the order);
pass 2 keeps one float64 error per partition and candidate, to which the batches' errors are
added in batch order on every rank (:func:`fixq.data.stream.stream_map`), so the sums are those of
one process with the same batch size. Batches are decoded again for pass 2, never kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fixq.data.stream import as_stream, stream_map
from fixq.errors import FixqError
from fixq.graph.ir import FLOAT_RULES, QUANT_POINTS, Conv, Graph, Input, Linear, apply_act, pre_activation
from fixq.numerics.formats import Word, fake_quantize
from fixq.numerics.ranges import (MSE_CANDIDATES, F_from_histogram, F_from_maxabs, exponent_histogram, mse_candidates,
                                  parse_method)
from fixq.util import distributed as dist

MSE_CHUNK = 1 << 22  # values per float64 temporary of the mse range search (32 MB)

__all__ = ["observe", "Observations", "needs_histograms", "CalibrationError"]


class CalibrationError(FixqError):
    """Empty data, NaN/Inf activations, or a config the model cannot take."""


@dataclass
class _Stats:
    """Per-channel running statistics of one tensor."""
    amax: torch.Tensor | None = None
    vmin: torch.Tensor | None = None
    vmax: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    count: int = 0


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    """(C, elements) view of a batch (channels on dim 1; a 2-D tensor has features)."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def _observe(st: _Stats, x: torch.Tensor, want_hist: bool) -> None:
    # two reductions over the non-channel dims, no copy: max|x| = max(max, -min)
    dims = [d for d in range(x.dim()) if d != 1]
    vmin, vmax = torch.aminmax(x.detach(), dim=dims[0]) if len(dims) == 1 else (
        x.detach().amin(dim=dims), x.detach().amax(dim=dims))
    amax = torch.maximum(vmax, -vmin)
    if st.amax is None:
        st.amax, st.vmin, st.vmax = amax, vmin, vmax
    else:
        st.amax, st.vmin, st.vmax = (torch.maximum(st.amax, amax), torch.minimum(st.vmin, vmin),
                                     torch.maximum(st.vmax, vmax))
    if want_hist:
        c = _per_channel(x)
        groups = torch.arange(c.shape[0], device=c.device).unsqueeze(1).expand_as(c)
        h = exponent_histogram(c, groups, c.shape[0])
        st.hist = h if st.hist is None else st.hist + h
    st.count += x.numel() // x.shape[1]


def _forward_observed(graph: Graph, x: torch.Tensor, on_tensor, on_acc) -> None:
    """Float forward pass calling the observers; tensors are dropped after their last user."""
    env = {graph.input: x}
    left = {k: len(v) for k, v in graph.users().items()}
    on_tensor(graph.input, x)
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        args = [env[i] for i in n.inputs]
        if isinstance(n, (Conv, Linear)):
            pre = pre_activation(n, *args)
            on_acc(n.name, pre)  # observed (not kept) before the clamp overwrites it
            y = apply_act(pre, n.act, inplace=True)
            del pre
        else:
            y = FLOAT_RULES[type(n)](n, *args)
        del args
        env[n.name] = y
        if isinstance(n, QUANT_POINTS):
            on_tensor(n.name, y)
        for i in n.inputs:
            left[i] -= 1
            if left[i] == 0:
                del env[i]


def _merge(parts: list[_Stats]) -> _Stats:
    """One tensor's statistics from every rank's (max, min, integer sums: any order is exact)."""
    out = _Stats()
    for p in parts:
        if p.amax is None:
            continue
        if out.amax is None:
            out = _Stats(p.amax, p.vmin, p.vmax, p.hist, p.count)
        else:
            out = _Stats(torch.maximum(out.amax, p.amax), torch.minimum(out.vmin, p.vmin),
                         torch.maximum(out.vmax, p.vmax), None if p.hist is None else out.hist + p.hist,
                         out.count + p.count)
    return out


def _channel_block(t3: torch.Tensor, j: int, step: int) -> torch.Tensor:
    """Columns ``j .. j + step`` of the (C, N * P) per-channel matrix of ``t3`` (N, C, P) (what
    :func:`_per_channel` would copy whole), as a new float64 (C, columns) tensor: copied image
    by image, so no temporary is larger than the block.

    >>> t = torch.arange(12.).reshape(2, 3, 2)
    >>> torch.equal(_channel_block(t, 1, 2), _per_channel(t)[:, 1:3].double())
    True
    """
    N, C, P = t3.shape
    end = min(j + step, N * P)
    if P == 1:  # (N, C) outputs: the per-channel matrix is a view, its float64 block keeps the
        return t3[:, :, 0].transpose(0, 1)[:, j:end].double()  # column-major order of the sums as before
    out = torch.empty((C, end - j), dtype=torch.float64, device=t3.device)
    m = j
    while m < end:
        n, a = divmod(m, P)
        b = min(P, a + end - m)
        out[:, m - j:m - j + b - a].copy_(t3[n, :, a:b])
        m += b - a
    return out


def _magnitude_T(T: int, signed: bool) -> int:
    """Signed bits with U(T,F)'s magnitude (one more than Q(T,F)): what every F rule takes."""
    return T + (0 if signed else 1)


def _data_F(st: _Stats, T: int, mode: str, method: str) -> torch.Tensor:
    m = parse_method(method)
    amax = st.amax if mode == "3D" else st.amax.max().reshape(1)
    if m.kind == "percentile":
        hist = st.hist if mode == "3D" else st.hist.sum(dim=0, keepdim=True)
        return F_from_histogram(hist, T, m.p)
    return F_from_maxabs(amax, T)


def _nonzero(st: _Stats, mode: str) -> torch.Tensor:
    """Which partitions (channels, or the one tensor) of a data tensor have a nonzero range."""
    nz = st.amax.cpu() > 0
    return nz if mode == "3D" else nz.any().reshape(1)


@dataclass
class Observations:
    """Float statistics of every requantized tensor and every accumulator over the
    calibration batches (pass 1), plus cached mse passes (pass 2). Plans for any number of
    configurations are built from one of these (``plan_from``): a sweep calibrates once."""

    graph: Graph
    batches: object            # the calibration stream (fixq.data.stream), read again by an mse pass
    device: torch.device
    stats: dict
    acc: dict
    histograms: bool
    show_progress: bool = True
    mse_cache: dict = None

    def mse_F(self, requests: list[tuple[str, int, str, bool]], rounding: str) -> dict:
        """Best F per channel (3D) or tensor (4D) among F_maxabs..F_maxabs+4 by squared
        error; one extra pass over the batches for every request ``(name, T, mode, signed)``
        not cached yet. Each batch's errors are added in batch order (module docstring)."""
        self.mse_cache = self.mse_cache or {}
        todo = [r for r in set(requests) if (r, rounding) not in self.mse_cache]
        if todo:
            cands = {r: mse_candidates(_data_F(self.stats[r[0]], _magnitude_T(r[1], r[3]), r[2], "maxabs"))
                     for r in todo}
            err = {r: torch.zeros(c.shape, dtype=torch.float64, device=c.device) for r, c in cands.items()}
            by_name: dict[str, list] = {}
            for r in todo:
                by_name.setdefault(r[0], []).append(r)

            def one_batch(b, x):
                errs: dict = {}

                def on_tensor(name, t):
                    for r in by_name.get(name, ()):
                        t3 = t.detach().reshape(t.shape[0], t.shape[1], -1)  # (N, C, P): a view, no copy
                        C, M = t3.shape[1], t3.shape[0] * t3.shape[2]  # the (C, M) per-channel view's shape
                        word = Word(r[1], r[3])
                        F_all = cands[r].to(t3.device)
                        n_out = C if r[2] == "3D" else 1
                        out = [torch.zeros(n_out, dtype=torch.float64, device=t3.device) for _ in range(MSE_CANDIDATES)]
                        step = max(1, MSE_CHUNK // max(1, C))
                        for j in range(0, M, step):
                            c = _channel_block(t3, j, step)  # float64, at most MSE_CHUNK values (or one column)
                            for k in range(MSE_CANDIDATES):
                                F = F_all[:, k:k + 1]
                                if r[2] == "3D":
                                    d = fake_quantize(c, F, word, rounding)[0]  # a new tensor: squared in place
                                    e = d.sub_(c).mul_(d).sum(dim=1)
                                else:
                                    d = fake_quantize(c, F[0, 0], word, rounding)[0]
                                    e = d.sub_(c).mul_(d).sum().reshape(1)
                                del d
                                out[k] = out[k] + e
                        errs[r] = out
                _forward_observed(self.graph, x.to(device=self.device, dtype=torch.float32), on_tensor,
                                  lambda *a: None)
                return errs

            with torch.no_grad():
                for errs in stream_map(self.batches, one_batch, "calibrate (mse)", self.show_progress):
                    for r, es in errs.items():
                        for k, e in enumerate(es):
                            err[r][:, k] += e.to(err[r].device)
            for r in todo:
                self.mse_cache[(r, rounding)] = cands[r].gather(1, err[r].argmin(dim=1, keepdim=True)).squeeze(1)
        return {r: self.mse_cache[(r, rounding)] for r in requests}


def observe(graph: Graph, loader, device: str | torch.device = "cpu", histograms: bool = False,
            show_progress: bool = True) -> Observations:
    """Pass 1 over the calibration data: per-channel max|x|, min, max (and exponent
    histograms when ``histograms``) at every requantization point and accumulator.
    ``loader``: a stream (:mod:`fixq.data.stream`, read again by an mse pass) or an iterable
    of batches / ``(images, labels)`` (kept in memory as given).

    >>> obs = observe(graph, [(torch.randn(8, 1, 8, 8), None)])   # doctest: +SKIP
    """
    device = torch.device(device)
    stream = as_stream(loader)
    if len(stream) == 0:
        raise CalibrationError("no calibration images: the calibration set is empty")
    qpoints = [n for n in graph.nodes if isinstance(n, QUANT_POINTS)]
    stats = {n.name: _Stats() for n in qpoints}
    acc = {n.name: _Stats() for n in graph.layers()}

    def one_batch(b, x):
        _forward_observed(graph, x.to(device=device, dtype=torch.float32),
                          lambda name, t: _observe(stats[name], t, histograms),
                          lambda name, t: _observe(acc[name], t, False))

    with torch.no_grad():
        for _ in stream_map(stream, one_batch, "calibrate", show_progress):
            pass
    # NaN/Inf propagate through min/max, so the per-channel statistics reveal them (checked
    # on each rank's own statistics, then agreed on: the first bad node in graph order)
    order = [n for n in graph.nodes if n.name in acc or n.name in stats]
    bad = [int(any(st.amax is not None and not bool(torch.isfinite(st.amax).all())
                   for st in (acc.get(n.name), stats.get(n.name)) if st is not None)) for n in order]
    bad = [max(v) for v in zip(*dist.gather(bad))]
    for n, b in zip(order, bad):
        if b:
            if isinstance(n, Input):
                raise CalibrationError("the calibration images contain NaN or Inf after preprocessing")
            raise CalibrationError(f"layer '{n.name}' produced NaN or Inf on the calibration images; "
                                   "check the weights and the preprocessing")
    if dist.world() > 1:
        parts = dist.gather(({k: _to(v, 'cpu') for k, v in stats.items()}, {k: _to(v, 'cpu') for k, v in acc.items()}))
        stats = {k: _to(_merge([p[0][k] for p in parts]), device) for k in stats}
        acc = {k: _to(_merge([p[1][k] for p in parts]), device) for k in acc}
    return Observations(graph, stream, device, stats, acc, histograms, show_progress)


def _to(st: _Stats, device) -> _Stats:
    mv = (lambda t: None if t is None else t.to(device))
    return _Stats(mv(st.amax), mv(st.vmin), mv(st.vmax), mv(st.hist), st.count)


def needs_histograms(graph: Graph, configs) -> bool:
    return any(parse_method(c.for_layer(n.name).effective_data_method).kind == "percentile"
               for c in configs for n in graph.nodes)


