"""The searches' acceptance rule (``fixq mixed``, ``fixq kmeans``) and what it can resolve.

Acceptance rule (noise of the tuning set). The search selects among plans that differ from
the all-base-bits plan; what it can be fooled by is the noise of each trial's difference to
that base plan on the tuning images. Paired on the same images, with ``b`` images one plan
gets right and the other wrong, ``c`` the reverse, ``n`` images: ``d = (b - c)/n`` and
``sd = sqrt(((b + c)/n - d**2)/n)`` (the mean of per-image differences in {-1, 0, 1}). A trial
meets the target when ``drop_vs_float + z * sd_vs_base <= allowed drop``: by default z = 1,
the one-standard-error rule of model selection (Breiman et al.); ``--margin-z`` changes it
(1.645: one-sided 95%). The base plan itself is accepted when its measured drop is within
the target (no search can do better than it); otherwise the search refuses at once.

Notation: ``n`` tuning images, ``b``/``c`` the discordant images, drops and standard errors in
top-1 points (percent).
"""
from __future__ import annotations

import math

import torch

__all__ = ["Z_MARGIN", "acceptance_rule", "paired_drop", "accepts", "resolution", "resolution_text"]

Z_MARGIN = 1.0  # the one-standard-error rule


def acceptance_rule(z: float = Z_MARGIN) -> str:
    return (f"top-1 drop vs float + {z:g} x the standard error of the trial's paired difference to the all-base "
            "plan, on the tuning images, <= the allowed drop")


def paired_drop(logits: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> dict:
    """Top-1 drop (points) of ``logits`` against ``ref`` on the same images and the standard
    error of that paired difference (points; module docstring).

    >>> y = torch.arange(100) % 2
    >>> good = torch.nn.functional.one_hot(y, 2).float()
    >>> bad = good.clone(); bad[:3] = bad[:3].flip(1)      # 3 images flipped to wrong
    >>> d = paired_drop(bad, good, y)
    >>> (round(d["drop"], 2), round(d["se"], 3), d["discordant"])
    (3.0, 1.706, 3)
    """
    q = logits.argmax(1) == y
    f = ref.argmax(1) == y
    n = int(y.numel())
    b, c = int((f & ~q).sum()), int((~f & q).sum())
    d = (b - c) / n
    var = max(((b + c) / n - d * d) / n, 0.0)
    return {"drop": 100.0 * d, "se": 100.0 * math.sqrt(var), "discordant": b + c, "n": n}


def accepts(logits: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, allowed: float,
            z: float = Z_MARGIN) -> tuple[bool, dict]:
    """The acceptance rule (module docstring): ``(meets, {"drop", "margin", "bound"})`` for a
    trial's ``logits`` given the all-base plan's ``base`` and the float ``ref`` logits.

    >>> y = torch.zeros(400, dtype=torch.long); f = torch.tensor([[1.0, 0.0]]).repeat(400, 1)
    >>> t = f.clone(); t[:8] = t[:8].flip(1)                 # drop 2 points, 8 images changed
    >>> accepts(t, f, f, y, allowed=3.0)[0], accepts(t, f, f, y, allowed=2.5)[0]   # bound 2 + 0.7
    (True, False)
    """
    vs_float, vs_base = paired_drop(logits, ref, y), paired_drop(logits, base, y)
    margin = z * vs_base["se"]
    bound = vs_float["drop"] + margin
    return bound <= allowed + 1e-9, {"drop": vs_float["drop"], "margin": margin, "bound": bound}


def resolution(n: int, base_drop: float, allowed: float, z: float = Z_MARGIN) -> dict:
    """What ``n`` tuning images can resolve under the acceptance rule (:func:`accepts`): one image
    is ``100 / n`` points; a trial with the all-base plan's tuning error (top-1 drop ``base_drop``
    vs float) has as many images right-to-wrong as wrong-to-right against it (``b = c``, an even
    number ``k = b + c`` of discordant images, ``se = 100 sqrt(k) / n``), and is accepted only when
    ``base_drop + z se <= allowed``: ``max_discordant`` is the largest such even ``k`` (at most
    ``n``); -1 when even ``k = 0`` misses (the all-base plan misses the target); ``None`` when
    ``z = 0`` (no margin: any number).

    >>> resolution(436, 200 / 436, 1.0)["max_discordant"]   # EfficientNet-Lite0: 2 images over float
    4
    >>> resolution(5000, 0.2, 1.0)["max_discordant"]
    1600
    """
    left = allowed - base_drop

    def ok(k: int) -> bool:  # accepts()'s inequality for b = c = k / 2
        return base_drop + z * (100.0 * math.sqrt((k / n) / n)) <= allowed + 1e-9

    if not ok(0):
        k = -1
    elif z <= 0:
        k = None
    else:
        k = min(n, math.floor((left * n / (100.0 * z)) ** 2))
        k -= k % 2
        while k + 2 <= n and ok(k + 2):  # float rounding of the closed form: step on accepts()'s own test
            k += 2
        while k > 0 and not ok(k):
            k -= 2
    return {"n": n, "image_points": 100.0 / n, "base_drop": base_drop, "allowed": allowed, "left": left,
            "margin_z": z, "max_discordant": k}


def resolution_text(r: dict, base: str = "the all-base plan") -> str:
    """One sentence for the reports (:func:`resolution`).

    >>> resolution_text(resolution(436, 200 / 436, 1.0), "the all-8-bit plan")[:62]
    'Resolution: one tuning image is 0.23 points; the all-8-bit pla'
    """
    d = r["base_drop"]
    head = (f"Resolution: one tuning image is {r['image_points']:.2f} points; {base} is {abs(d):.2f} points "
            f"{'worse' if d > 0 else 'better'} than float on the tuning images, of the {r['allowed']:.2f} allowed")
    k = r["max_discordant"]
    if k is not None and k < 0:
        return head + ", so no trial with its tuning error meets the target."
    if k is None or k >= r["n"] - 1:
        return head + ", so a trial with the same tuning error is accepted however many images it changes."
    return (head + f", so a trial with the same tuning error is accepted only when at most {k} of the {r['n']} "
            f"images go from right to wrong or back between it and {base} (the margin: {r['margin_z']:g} x the "
            "standard error of that paired difference). More evaluation images resolve finer differences.")
