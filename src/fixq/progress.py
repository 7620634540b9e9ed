"""Progress bars for long loops (tqdm, imported only when shown)."""
from __future__ import annotations

__all__ = ["progress"]


def progress(it, desc: str, enabled: bool = True, total: int | None = None):
    """Wrap ``it`` in a tqdm bar when ``enabled``; otherwise return it unchanged.

    >>> list(progress(range(3), "demo", enabled=False))
    [0, 1, 2]
    """
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
