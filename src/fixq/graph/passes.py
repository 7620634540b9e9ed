"""Graph passes after lowering: BatchNorm folding and activation fusion (exact in float64)."""
from __future__ import annotations

import torch

from .ir import Add, Clamp, Conv, Linear, Node

__all__ = ["fold_bn", "fold_affine", "fuse_acts", "users_of"]


def fold_bn(nodes: list[Node], bns, users) -> list[Node]:
    """Fold each BatchNorm into its producer conv/linear, or turn it into a depthwise conv."""
    by_name = {n.name: n for n in nodes}
    out = []
    rename: dict[str, str] = {}
    for n in nodes:
        n.inputs = tuple(rename.get(i, i) for i in n.inputs)
        if n.name not in bns:
            out.append(n)
            continue
        src, bn = bns[n.name]
        src = rename.get(src, src)
        inv = (bn.running_var.double() + bn.eps).rsqrt()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
        scale = gamma * inv
        shift = beta - bn.running_mean.double() * scale
        p = by_name.get(src)
        if isinstance(p, (Conv, Linear)) and p.act is None and len(users[src]) == 1:
            w = p.weight.double() * scale.reshape(-1, *([1] * (p.weight.dim() - 1)))
            b = (p.bias.double() if p.bias is not None else torch.zeros_like(scale)) * scale + shift
            p.weight, p.bias = w.to(p.weight.dtype), b.to(p.weight.dtype)
            rename[n.name] = src
        else:  # standalone BN: a depthwise 1x1 conv is exact and already supported
            C = scale.numel()
            dt = bn.running_var.dtype
            out.append(Conv(n.name, (src,), weight=scale.to(dt).reshape(C, 1, 1, 1), bias=shift.to(dt),
                            groups=C))
    return out, rename


def fold_affine(nodes: list[Node], affine: set[str], users) -> tuple[list[Node], dict[str, str]]:
    """Fold the depthwise 1x1 convs that capture made from ``x * c`` / ``x + c`` (per-channel
    constants, Caffe's Scale layer) into a producing conv/linear without activation and with
    no other user: ``W' = W * s``, ``b' = b * s + t`` in float64 (as BatchNorm folding)."""
    by_name = {n.name: n for n in nodes}
    out, rename = [], {}
    for n in nodes:
        n.inputs = tuple(rename.get(i, i) for i in n.inputs)
        p = by_name.get(n.inputs[0]) if n.inputs else None
        if n.name in affine and isinstance(p, (Conv, Linear)) and p.act is None and len(users[p.name]) == 1:
            s = n.weight.double().reshape(-1)
            t = n.bias.double() if n.bias is not None else torch.zeros_like(s)
            w = p.weight.double() * s.reshape(-1, *([1] * (p.weight.dim() - 1)))
            b = (p.bias.double() if p.bias is not None else torch.zeros_like(s)) * s + t
            p.weight, p.bias = w.to(p.weight.dtype), b.to(p.weight.dtype)
            users[p.name] = users[n.name]
            rename[n.name] = p.name
            continue
        out.append(n)
    return out, rename


def fuse_acts(nodes: list[Node], users) -> tuple[list[Node], dict[str, str]]:
    by_name = {n.name: n for n in nodes}
    out, rename = [], {}
    for n in nodes:
        n.inputs = tuple(rename.get(i, i) for i in n.inputs)
        if isinstance(n, Clamp):
            p = by_name.get(n.inputs[0])
            if isinstance(p, (Conv, Linear, Add)) and p.act is None and len(users[p.name]) == 1:
                p.act = (n.lo, n.hi)
                rename[n.name] = p.name
                continue
        out.append(n)
    return out, rename


def users_of(nodes, output) -> dict[str, list[str]]:
    u: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for i in n.inputs:
            u[i].append(n.name)
    u[output].append("<output>")
    return u
