"""scikit-learn's 8x8 handwritten digits written as an ImageFolder (the bundled demo data).

The 1,797 images are split with a fixed seed: 1,197 for training the bundled LeNet
(``scripts/train_lenet_digits.py``), 600 held out for the demo's calibration and
evaluation. Pixel values 0..16 are stored as 8-bit PNG ``round(v * 255 / 16)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["export_digits", "N_TRAIN"]

N_TRAIN = 1197


def export_digits(root: str | Path, split: str = "test") -> Path:
    """Write the ``train`` or ``test`` split as ``root/<digit>/<index>.png``; idempotent.

    >>> export_digits("/tmp/digits")  # doctest: +SKIP
    PosixPath('/tmp/digits')
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    idx = order[:N_TRAIN] if split == "train" else order[N_TRAIN:]
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{split}:{len(idx)}":
        return root
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in idx:
        px = np.round(d.images[i] * 255.0 / 16.0).astype(np.uint8)
        Image.fromarray(px, mode="L").save(root / str(int(d.target[i])) / f"{int(i):04d}.png")
    done.write_text(f"{split}:{len(idx)}")
    return root
