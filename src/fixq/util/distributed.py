"""Data-parallel runs with ``torch.distributed`` (``torchrun --nproc-per-node N -m fixq ...``).

Images are cut into *global batches* of ``--batch-size`` in a fixed order (the order a
single process uses). Rank ``r`` of ``W`` computes batches ``r, r + W, r + 2W, ...``; every
per-batch result a later sum depends on (logits, squared errors of the mse pass, SQNR sums,
filter energies) is gathered round by round and combined on every rank *in batch order*,
with the same float operations as one process. Order-free statistics (max, min, integer
histograms and counts) are reduced once. So the plan and every reported number are
identical to a run in one process with the same batch size, and all ranks take the same
decisions (searches) without talking further; rank 0 writes the outputs.

Backends: ``gloo`` on CPU, ``nccl`` when the device is CUDA (each rank then uses
``cuda:LOCAL_RANK``). Outside torchrun (no ``WORLD_SIZE`` > 1) everything here is a no-op.

>>> world(), rank(), is_main()
(1, 0, True)
"""
from __future__ import annotations

import os

from fixq.errors import FixqError

__all__ = ["init_from_env", "world", "rank", "is_main", "gather", "ordered", "local_device", "shutdown",
           "DistributedError"]

_STATE = {"world": 1, "rank": 0, "init": False}


class DistributedError(FixqError):
    """A torchrun environment fixq cannot use."""


def world() -> int:
    return _STATE["world"]


def rank() -> int:
    return _STATE["rank"]


def is_main() -> bool:
    return _STATE["rank"] == 0


def init_from_env(device: str = "cpu") -> str:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR/PORT``); returns the device this rank uses. Without torchrun
    (``WORLD_SIZE`` unset or 1) returns ``device`` unchanged."""
    n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if n <= 1 or _STATE["init"]:
        return device if not _STATE["init"] or not device.startswith("cuda") else _cuda(device)
    import torch
    import torch.distributed as dist
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise DistributedError("--device cuda asked but no CUDA GPU is visible to PyTorch; use --device cpu (gloo)")
    dev = _cuda(device) if cuda else device
    if cuda:
        torch.cuda.set_device(torch.device(dev))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    _STATE.update(world=dist.get_world_size(), rank=dist.get_rank(), init=True)
    return dev


def _cuda(device: str) -> str:
    if ":" in device:
        raise DistributedError(f"under torchrun give --device cuda, not {device}: each rank takes cuda:LOCAL_RANK")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    return _cuda(device) if _STATE["init"] and device == "cuda" else device


def shutdown() -> None:
    if _STATE["init"]:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
        _STATE.update(world=1, rank=0, init=False)


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process). Tensors travel as CPU copies."""
    if _STATE["world"] == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * _STATE["world"]
    dist.all_gather_object(out, _cpu(obj))
    return out


def _cpu(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _portable(e: BaseException):
    """An exception as (class, args, hint) so another rank can raise the same one."""
    return (type(e), e.args, getattr(e, "hint", None))


def _rebuild(t) -> BaseException:
    cls, args, hint = t
    e = cls.__new__(cls)
    Exception.__init__(e, *args)
    if isinstance(e, FixqError):
        e.hint = hint
    return e


def ordered(local_batches, n_batches: int, fn, on_done=None):
    """Yield ``fn(b, *batch)`` for every global batch ``b = 0 .. n_batches - 1`` in order, on
    every rank. ``local_batches`` yields ``(b, *batch)`` for this rank's batches (``b % W ==
    rank``) in order; each round gathers one result per rank. A :class:`FixqError` on any
    rank is raised on all ranks (the one of the earliest batch, as one process would).
    ``on_done(n)`` is called after each round with the number of batches it finished.

    >>> list(ordered(((b, b * 10) for b in range(3)), 3, lambda b, x: x + 1))
    [1, 11, 21]
    """
    W, r = _STATE["world"], _STATE["rank"]
    it = iter(local_batches)
    for j in range((n_batches + W - 1) // W):
        b = j * W + r
        if W == 1:
            item = next(it)
            yield fn(*item)
            if on_done:
                on_done(1)
            continue
        local = None
        if b < n_batches:
            try:
                item = next(it)
                local = ("ok", _cpu(fn(*item)))
            except FixqError as e:
                local = ("err", _portable(e))
            except Exception as e:  # any other failure: every rank stops with the same message, none waits
                local = ("err", (RuntimeError, (f"rank {r}: {type(e).__name__}: {e}",), None))
        got = gather(local)
        for res in got:
            if res is not None and res[0] == "err":
                raise _rebuild(res[1])
        for res in got:
            if res is not None:
                yield res[1]
        if on_done:
            on_done(sum(res is not None for res in got))
    for _ in it:  # nothing left; lets the loader finish its epoch
        pass
