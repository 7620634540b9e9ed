"""The one place tests reach ../shared/ (read-only); tests skip with a reason without it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("FIXQ_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(rel: str) -> Path:
    """Path under ../shared/, or skip the test naming what is missing."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs ../shared/{rel} (not present at {p}); set FIXQ_SHARED to its folder")
    return p


def resnet_weights(depth: int) -> Path:
    d = shared_path("models/cifar10-resnet")
    found = sorted(d.glob(f"resnet{depth}-*.th"))
    if not found:
        pytest.skip(f"no resnet{depth}-*.th in {d}")
    return found[0]
