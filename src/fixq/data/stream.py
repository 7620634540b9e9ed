"""Images streamed batch by batch: what calibration, the float reference and every evaluated
configuration iterate, so memory holds one batch of images (per decoding worker), never a
whole set.

A stream is a fixed sequence of images cut into *global batches* of ``batch_size``; batch
``b`` holds images ``b * batch_size ...``. Under ``torchrun`` rank ``r`` decodes only the
batches ``b % W == r`` (:mod:`fixq.util.distributed`); :func:`stream_map` hands every rank the
per-batch results of all batches in order. Decoding runs in ``workers`` DataLoader
processes (started per pass, gone when it ends), with pinned memory when the model is on CUDA.

>>> s = TensorStream([torch.zeros(2, 1, 4, 4), torch.ones(1, 1, 4, 4)])
>>> len(s), s.n_batches, [float(x.sum()) for x in stream_map(s, lambda b, x: x, "demo", False)]
(3, 2, [0.0, 16.0])
"""
from __future__ import annotations

import os

import torch

from fixq.util import distributed as dist
from fixq.util.progress import image_progress
from .images import _Files, DataError, ImageSet, _collate, worker_error
from .zoo import Preprocess

__all__ = ["ImageStream", "TensorStream", "as_stream", "stream_map", "default_workers", "find_bad_images"]


def default_workers() -> int:
    """Decoding processes per rank: the CPUs this process may use, shared by the local ranks (at most 8)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, n // max(local, 1)))


class ImageStream:
    """Images ``idx`` of the folder ``s`` (in that order), decoded and preprocessed per batch.

    >>> st = ImageStream(ImageSet.scan("digits"), range(100), PRESETS["digits"], 32)   # doctest: +SKIP
    >>> st.n_batches, st.batch_len(3)                                                   # doctest: +SKIP
    (4, 4)
    """

    def __init__(self, s: ImageSet, idx, pre: Preprocess, batch_size: int, workers: int = 0,
                 pin_memory: bool = False):
        self.s, self.idx, self.pre = s, tuple(idx), pre
        self.batch_size, self.workers, self.pin_memory = batch_size, workers, pin_memory
        self.n_batches = (len(self.idx) + batch_size - 1) // batch_size

    def __len__(self) -> int:
        return len(self.idx)

    def batch_len(self, b: int) -> int:
        return min(self.batch_size, len(self.idx) - b * self.batch_size)

    def subset(self, positions, batch_size: int | None = None) -> "ImageStream":
        """The images at ``positions`` of this stream (in that order), batched afresh."""
        return ImageStream(self.s, [self.idx[int(p)] for p in positions], self.pre, batch_size or self.batch_size,
                           self.workers, self.pin_memory)

    def files(self) -> list[str]:
        return [self.s.files[i] for i in self.idx]

    def labels(self) -> torch.Tensor:
        return torch.tensor([self.s.labels[i] for i in self.idx], dtype=torch.int64)

    def _batch_ids(self) -> list[int]:
        return list(range(dist.rank(), self.n_batches, dist.world()))

    def local(self):
        """``(b, images)`` for this rank's batches, in order."""
        ids = self._batch_ids()
        if not ids:
            return
        bs = self.batch_size
        sampler = [list(range(b * bs, min((b + 1) * bs, len(self.idx)))) for b in ids]
        workers = self.workers if len(ids) > 1 else 0  # one batch: nothing to overlap
        # a loader per pass, read to the end: its workers exit with the pass (none linger)
        loader = torch.utils.data.DataLoader(_Files(self.s, self.idx, self.pre), batch_sampler=sampler,
                                             num_workers=workers, collate_fn=_collate, pin_memory=self.pin_memory)
        try:
            for j, (x, _, _) in enumerate(loader):
                yield ids[j], x
        except DataError as e:
            raise worker_error(e, workers) from None

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images decoded in this process (graph capture, shape checks)."""
        ds = _Files(self.s, self.idx[:n], self.pre)
        return torch.stack([ds[k][0] for k in range(min(n, len(self.idx)))])

    def tensor(self) -> torch.Tensor:
        """All images as one tensor: only for small sets (benchmarks, tests); the pipeline streams."""
        return torch.cat(list(stream_map(self, lambda b, x: x, "load images", False)))


class TensorStream:
    """Batches already in memory (the Python API's ``[(x, y), ...]`` loaders), sharded like images."""

    def __init__(self, batches: list):
        self.batches = [x for x in batches if x.numel()]
        self.n_batches = len(self.batches)
        self._len = sum(x.shape[0] for x in self.batches)

    def __len__(self) -> int:
        return self._len

    def batch_len(self, b: int) -> int:
        return self.batches[b].shape[0]

    def local(self):
        for b in range(dist.rank(), self.n_batches, dist.world()):
            yield b, self.batches[b]


def as_stream(loader):
    """A stream from a stream, or from an iterable of image batches / ``(images, labels)``
    tuples (kept in memory: a one-shot generator cannot be read twice)."""
    if hasattr(loader, "local") and hasattr(loader, "n_batches"):
        return loader
    return TensorStream([b[0] if isinstance(b, (tuple, list)) else b for b in loader])


def stream_map(stream, fn, desc: str, show_progress: bool = True):
    """``fn(b, images)`` for every batch of ``stream`` in batch order, on every rank (each rank
    computes its own batches; :func:`fixq.util.distributed.ordered`), with a bar in images/s."""
    done = [0]
    with image_progress(desc, len(stream), show_progress and dist.is_main()) as bar:
        def on_done(k: int) -> None:
            bar.update(sum(stream.batch_len(b) for b in range(done[0], done[0] + k)))
            done[0] += k
        yield from dist.ordered(stream.local(), stream.n_batches, fn, on_done)


def find_bad_images(s: ImageSet, idx, pre: Preprocess, batch_size: int, workers: int,
                    show_progress: bool = True) -> list[int]:
    """Positions in ``idx`` of unreadable images (``--skip-bad-images``): one decoding pass,
    shared between ranks, before any batch is formed, so batches are those of the good images."""
    idx = list(idx)
    n = (len(idx) + batch_size - 1) // batch_size
    ids = list(range(dist.rank(), n, dist.world()))
    sampler = [list(range(b * batch_size, min((b + 1) * batch_size, len(idx)))) for b in ids]
    bad: list[int] = []
    if sampler:
        loader = torch.utils.data.DataLoader(_Files(s, idx, pre, skip_bad=True), batch_sampler=sampler,
                                             num_workers=workers, collate_fn=_collate)
        with image_progress("check images", len(idx) // max(dist.world(), 1), show_progress and dist.is_main()) as bar:
            for b, (x, _, k) in zip(ids, loader):
                bad.extend(k)  # positions in idx
                bar.update(len(sampler[ids.index(b)]))
    return sorted(p for part in dist.gather(bad) for p in part)
