"""8-bit pixels as the C model's pixel helper takes them: fixq's loader up to, not including,
ToTensor/Normalize (decode to RGB, optional grayscale, resize, centre crop), as uint8 NCHW.

>>> px = load_pixels(ImageSet.scan("digits"), range(4), PRESETS["digits"])   # doctest: +SKIP
>>> px.dtype, px.shape                                                       # doctest: +SKIP
(dtype('uint8'), (4, 1, 8, 8))
"""
from __future__ import annotations

import numpy as np

from fixq.data.images import DataError, _transform

__all__ = ["load_pixels"]


def load_pixels(s, idx, pre) -> np.ndarray:
    """(N, C, H, W) uint8 pixels of images ``idx`` of ImageSet ``s`` under Preprocess ``pre``."""
    from PIL import Image
    from torchvision import transforms as T

    geometric = T.Compose(_transform(pre).transforms[:-2])  # everything before ToTensor, Normalize
    out = []
    for i in idx:
        path = s.root / s.files[i]
        try:
            with Image.open(path) as im:
                img = geometric(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        a = np.asarray(img, dtype=np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out)
