"""What the trials of a plan search share, kept so that each trial computes only what its
plan changes (issue 16): :class:`fixq.algorithms.search.PlanBench` uses both.

- **Same computation.** Two plans that differ only in their notes (plan-wide or a layer's),
  version or model name compute the same numbers (:func:`first_change` is then the number
  of nodes): a trial whose plan is the all-base plan (``fixq mixed``'s f = 0) reuses the
  base plan's measurement.
- **Unchanged prefix.** Node ``i`` of the graph computes from its inputs, its own plan
  entries (``layers[name]``, ``tensors[name]``) and the plan-wide ``config`` / ``float_ops``;
  so a plan that first differs from the base plan at node ``k`` (:func:`first_change`)
  computes nodes ``0 .. k-1`` exactly as the base plan does. :class:`PrefixCache` keeps,
  for every batch of a part of the evaluation images, the live tensors at the earliest such
  ``k`` seen, and a trial resumes there (``Simulator.run_from``): no image is decoded and no
  prefix layer runs again. Same values as a full run: the kept tensors are fixed-point
  values ``q * 2**-F``, stored as bfloat16 only where that is exact (checked per tensor;
  8-bit codes always are), otherwise as they are.
- **Memory.** The cache is bounded by ``budget_mb`` (``FIXQ_SEARCH_CACHE_MB``, default
  1024); a part whose prefix tensors exceed it is not cached (the trials then stream the
  images as before). Under ``torchrun`` each rank keeps its own batches.

>>> first_change(graph, trial_plan, base_plan)   # doctest: +SKIP
2
"""
from __future__ import annotations

import os
from dataclasses import fields

import torch

from fixq.planning.plan import QuantPlan

__all__ = ["changed_nodes", "first_change", "first_of", "PrefixCache", "default_budget_mb"]


def default_budget_mb() -> float:
    """``FIXQ_SEARCH_CACHE_MB`` (megabytes; 0 turns the prefix cache off), default 1024."""
    v = os.environ.get("FIXQ_SEARCH_CACHE_MB", "1024")
    try:
        mb = float(v)
    except ValueError:
        raise ValueError(f"FIXQ_SEARCH_CACHE_MB must be a number of megabytes, got {v!r}") from None
    if not mb >= 0:
        raise ValueError(f"FIXQ_SEARCH_CACHE_MB must be >= 0, got {v!r}")
    return mb


def _same_layer(x, y) -> bool:
    """LayerPlan equality but for the notes (text only)."""
    if x is None or y is None:
        return x is y
    return all(getattr(x, f.name) == getattr(y, f.name) for f in fields(x) if f.name != "notes")


def changed_nodes(graph, a: QuantPlan, b: QuantPlan) -> list[int] | None:
    """Indices of the nodes of ``graph`` whose own plan entries differ between plans ``a`` and
    ``b`` (notes, version and model name aside); ``None`` when anything plan-wide differs
    (config, float ops, affine formats in one only, an entry for a node the graph does not have).

    >>> changed_nodes(graph, plan, replace(plan, notes=("a note",)))   # doctest: +SKIP
    []
    """
    if a.config != b.config or tuple(a.float_ops) != tuple(b.float_ops) or a.is_affine != b.is_affine:
        return None  # (an affine entry anywhere changes how every node lowers)
    names = {n.name for n in graph.nodes}
    if any(k not in names for k in (set(a.layers) | set(b.layers) | set(a.tensors) | set(b.tensors))):
        return None
    return [i for i, n in enumerate(graph.nodes)
            if not _same_layer(a.layers.get(n.name), b.layers.get(n.name)) or a.tensors.get(n.name) != b.tensors.get(n.name)]


def first_change(graph, a: QuantPlan, b: QuantPlan) -> int:
    """The index of the first node of ``graph`` that plan ``a`` computes differently from plan
    ``b`` (``len(graph.nodes)`` when none does: they compute the same; 0 when anything
    plan-wide differs).

    >>> first_change(graph, plan, replace(plan, notes=("a note",))) == len(graph.nodes)   # doctest: +SKIP
    True
    """
    return first_of(changed_nodes(graph, a, b), len(graph.nodes))


def first_of(changed: list[int] | None, n_nodes: int) -> int:
    """:func:`first_change` from :func:`changed_nodes`' answer (``n_nodes`` when it is empty).

    >>> first_of([3, 7], 10), first_of([], 10), first_of(None, 10)
    (3, 10, 0)
    """
    return 0 if changed is None else (changed[0] if changed else n_nodes)


def _pack(v: torch.Tensor):
    """``v`` on the CPU, as bfloat16 when that holds it exactly (fixed-point values of <= 8
    significant bits), else unchanged; returns ``(stored, dtype to restore)``."""
    c = v.detach().cpu()
    if c.is_floating_point() and c.dtype != torch.bfloat16:
        h = c.to(torch.bfloat16)
        if torch.equal(h.to(c.dtype), c):
            return h, c.dtype
    return c.clone() if c.data_ptr() == v.data_ptr() else c, c.dtype


class PrefixCache:
    """Live tensors at node ``start`` for the batches of one part of the evaluation images.

    A stream (``n_batches``, ``batch_len``, ``local``) whose batches are ``{name: tensor}``
    dicts for ``Simulator.run_from(start, env)``; filled batch by batch by :meth:`keep` while a
    trial runs from the images, usable once every local batch is in (:attr:`complete`).

    >>> c = PrefixCache(2, [4, 3], budget_mb=1)
    >>> c.keep(0, {"a": torch.ones(4, 2)}); c.keep(1, {"a": torch.zeros(3, 2)}); c.complete
    True
    >>> [float(env["a"].sum()) for b, env in c.local()]
    [8.0, 0.0]
    """

    def __init__(self, start: int, batch_lens: list[int], budget_mb: float, local_ids=None):
        self.start, self.lens = start, list(batch_lens)
        self.n_batches = len(self.lens)
        self.local_ids = list(range(self.n_batches)) if local_ids is None else list(local_ids)
        self.budget = budget_mb * 2 ** 20
        self.bytes, self.over = 0, False
        self._env: dict[int, dict] = {}

    def __len__(self) -> int:
        return sum(self.lens)

    def batch_len(self, b: int) -> int:
        return self.lens[b]

    @property
    def complete(self) -> bool:
        return not self.over and all(b in self._env for b in self.local_ids)

    def keep(self, b: int, env: dict) -> None:
        """Store batch ``b``'s live tensors (dropped for good once the budget is passed)."""
        if self.over:
            return
        packed = {k: _pack(v) for k, v in env.items()}
        self.bytes += sum(t.numel() * t.element_size() for t, _ in packed.values())
        if self.bytes > self.budget:
            self.over, self._env, self.bytes = True, {}, 0
            return
        self._env[b] = packed

    def local(self):
        """``(b, env)`` for this rank's batches, in order (tensors restored to their dtype)."""
        for b in self.local_ids:
            yield b, {k: t.to(dtype) for k, (t, dtype) in self._env[b].items()}
