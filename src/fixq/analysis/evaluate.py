"""Evaluation: top-1/top-5 error float vs fixed point, top-1 agreement, per-layer SQNR and
saturation counts, over images streamed batch by batch (:mod:`fixq.data.stream`). The image
folders themselves are :mod:`fixq.data.images` (re-exported here)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fixq.backends.simulate import SIM_RULES
from fixq.data.images import (CIFAR10_CLASSES, DataError, ImageSet, Split, class_mapping, known_classes, load_images,
                              select_subsets)
from fixq.data.stream import TensorStream, stream_map
from fixq.graph.ir import FLOAT_RULES, QUANT_POINTS, Graph, Input, run_float
from fixq.util import distributed as dist

__all__ = ["DataError", "ImageSet", "load_images", "known_classes", "class_mapping", "CIFAR10_CLASSES",
           "select_subsets", "Split", "topk_errors", "float_logits", "EvalResult", "evaluate_quant", "batches", "to_stream"]

def batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size], None if y is None else y[i:i + batch_size]


def topk_errors(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 error in percent. Tied logits rank by class index (the first maximal
    class is the top-1 class, as ``argmax`` and the searches' acceptance rule count it;
    ``topk`` leaves the order of ties unspecified).

    >>> topk_errors(torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), torch.tensor([1, 2]))
    (50.0, 0.0)
    """
    k = min(5, logits.shape[1])
    top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    hit1 = (top[:, 0] == labels).float().mean().item()
    hit5 = (top == labels[:, None]).any(dim=1).float().mean().item()
    return 100.0 * (1 - hit1), 100.0 * (1 - hit5)


def to_stream(data, batch_size: int):
    """A stream from a stream or an in-memory (N, C, H, W) tensor (Python API)."""
    if isinstance(data, torch.Tensor):
        return TensorStream([xb for xb, _ in batches(data, None, batch_size)])
    return data


@torch.no_grad()
def float_logits(graph: Graph, data, batch_size: int = 128, device="cpu",
                 show_progress: bool = True) -> torch.Tensor:
    """Float outputs (N, classes) of a stream (or tensor) of images, batch by batch."""
    return torch.cat(list(stream_map(to_stream(data, batch_size),
                                     lambda b, xb: run_float(graph, xb.to(device)).float().cpu(),
                                     "float eval", show_progress)))


@dataclass
class EvalResult:
    top1_error: float
    top5_error: float
    agreement_top1: float
    logits: torch.Tensor
    sqnr_db: dict[str, float] = field(default_factory=dict)
    saturations: dict[str, dict[str, int]] = field(default_factory=dict)
    sqnr_images: int = 0


CHUNK = 1 << 22  # values per float64 temporary of the SQNR sums (32 MB)


def _lockstep(sim, xb: torch.Tensor, points: list[str]):
    """Quantized and float forward passes side by side, node by node: each quantization
    point's signal and noise energy (float64 sums over the batch) is taken as soon as it
    exists, and a tensor is dropped once its last user has run, so memory holds the live
    tensors of two passes, not every layer's output. Returns ``(output, {p: (sig, noise)})``."""
    g = sim.graph
    want = set(points)
    users = g.users()
    left = {k: len(v) for k, v in users.items()}
    q_env = {g.input: sim.requant(g.input, sim._t(xb))}
    f_env = {g.input: xb.float()}
    sums = {}

    def take(name):
        if name in want:  # float64 sums, a few images at a time: temporaries bounded by CHUNK values
            f_all, q_all = f_env[name], q_env[name]
            step = max(1, CHUNK // max(1, f_all[0].numel()))
            s_ = n_ = 0.0
            for i in range(0, f_all.shape[0], step):
                f = f_all[i:i + step].to(torch.float64, copy=True)  # copies (never the env's tensors):
                d = q_all[i:i + step].to(torch.float64, copy=True).sub_(f)  # q - f, both squared in place
                s_ += float(f.mul_(f).sum())
                n_ += float(d.mul_(d).sum())
                del f, d
            sums[name] = (s_, n_)

    def last_use(n):  # the inputs whose last user is n (each once, however often n names it)
        dead = []
        for i in n.inputs:
            left[i] -= 1
            if left[i] == 0 and i != g.output:
                dead.append(i)
        return dead

    take(g.input)
    for n in g.nodes:
        if isinstance(n, Input):
            continue
        dead = last_use(n)
        q_env[n.name] = SIM_RULES[type(n)](sim, n, *(q_env[i] for i in n.inputs))
        for i in dead:  # the fixed-point inputs go before the float node runs: the two passes
            del q_env[i]  # never hold both sides' inputs and outputs of a node at once
        f_env[n.name] = FLOAT_RULES[type(n)](n, *(f_env[i] for i in n.inputs))
        for i in dead:
            del f_env[i]
        take(n.name)
    return q_env[g.output], sums


@torch.no_grad()
def evaluate_quant(sim, data, y: torch.Tensor, ref_logits: torch.Tensor,
                   batch_size: int = 128, sqnr_images: int = 256, show_progress: bool = True) -> EvalResult:
    """Run the simulator over a stream (or tensor) of evaluation images; SQNR of every
    requantized tensor vs float is measured on the batches that start within the first
    ``sqnr_images`` images (float intermediates recomputed there, layer by layer)."""
    graph = sim.graph
    stream = to_stream(data, batch_size)
    sim.reset_counts()
    points = [n.name for n in graph.nodes if isinstance(n, QUANT_POINTS)]
    sig = {p: 0.0 for p in points}
    noise = {p: 0.0 for p in points}
    starts = [0]
    for b in range(stream.n_batches):
        starts.append(starts[-1] + stream.batch_len(b))

    def one(b, xb):
        xb = xb.to(sim.device)
        if starts[b] < sqnr_images:
            out, sums = _lockstep(sim, xb, points)
            return out.float().cpu(), sums
        return sim.run(xb).float().cpu(), None

    out, seen = [], 0
    for b, (logits_b, sums) in enumerate(stream_map(stream, one, "fixed-point eval", show_progress)):
        out.append(logits_b)
        if sums is not None:
            for p in points:
                s_, n_ = sums[p]
                sig[p] += s_
                noise[p] += n_
            seen += logits_b.shape[0]
    logits = torch.cat(out)
    t1, t5 = topk_errors(logits, y)
    agree = 100.0 * (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item()
    sqnr = {p: (float("inf") if noise[p] == 0 else 10.0 * torch.log10(torch.tensor(sig[p] / noise[p])).item())
            for p in points if sig[p] > 0}
    return EvalResult(t1, t5, agree, logits, sqnr, _saturations(sim), min(seen, len(stream)))


def _saturations(sim) -> dict[str, dict[str, int]]:
    """The simulator's saturation counts summed over the ranks (exact integers)."""
    out: dict[str, dict[str, int]] = {}
    for part in dist.gather(sim.saturations()):
        for k, d in part.items():
            o = out.setdefault(k, {})
            for w, c in d.items():
                o[w] = o.get(w, 0) + c
    return out
