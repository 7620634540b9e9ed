"""Progress bars for long loops (tqdm, imported only when shown).

Bars carry the label of the configuration they work for (``[3/12] <4b,8b> 2D maxabs``,
set with :func:`progress_label`). When stderr is not a terminal (a log file, CI) there is
no ``\\r`` redrawing: each loop writes one line when it ends.
"""
from __future__ import annotations

import contextlib
import sys
import time

__all__ = ["progress", "progress_label", "set_status"]

_LABEL: list[str] = []


@contextlib.contextmanager
def progress_label(text: str):
    """Prefix every bar opened inside the block with ``text``.

    >>> with progress_label("[1/2] <8b,8b> 3D maxabs"):
    ...     list(progress(range(2), "eval", enabled=False))
    [0, 1]
    """
    _LABEL.append(text)
    try:
        yield
    finally:
        _LABEL.pop()


def _desc(desc: str) -> str:
    return f"{_LABEL[-1]} {desc}" if _LABEL else desc


class _Lines:
    """A log-friendly stand-in for a bar: one line when the loop is done (with the last
    status set by :func:`set_status`, e.g. a loss)."""

    def __init__(self, it, desc: str, total: int | None):
        self.it, self.desc, self.total, self.status = it, desc, total, ""

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.status = s

    def __iter__(self):
        t0, n = time.time(), 0
        for n, x in enumerate(self.it, 1):
            yield x
        print(f"{self.desc}: {n}{'/' + str(self.total) if self.total else ''} done in {time.time() - t0:.1f} s"
              + (f" ({self.status})" if self.status else ""), file=sys.stderr, flush=True)


def set_status(bar, text: str) -> None:
    """Show ``text`` (e.g. ``loss 0.0123``) beside a bar from :func:`progress`; a no-op when
    the bar is disabled.

    >>> set_status(range(3), "loss 1.0")   # disabled bar: nothing happens
    """
    f = getattr(bar, "set_postfix_str", None)
    if f is not None:
        f(text, refresh=False)


def progress(it, desc: str, enabled: bool = True, total: int | None = None):
    """Wrap ``it`` in a tqdm bar when ``enabled``; otherwise return it unchanged.

    >>> list(progress(range(3), "demo", enabled=False))
    [0, 1, 2]
    """
    if not enabled:
        return it
    desc = _desc(desc)
    if not sys.stderr.isatty():
        return _Lines(it, desc, total if total is not None else (len(it) if hasattr(it, "__len__") else None))
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
