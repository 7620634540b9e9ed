"""Progress bars for long loops (tqdm, imported only when shown).

Bars carry the label of the configuration they work for (``[3/12] <4b,8b> 2D maxabs``,
set with :func:`progress_label`). When stderr is not a terminal (a log file, CI) there is
no ``\\r`` redrawing: each loop writes one line when it ends (image loops also one line
a minute while they run, with images/s and the time left).
"""
from __future__ import annotations

import contextlib
import sys
import time

__all__ = ["progress", "progress_label", "image_progress", "set_status"]

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


class _ImageLines:
    """Log-friendly image counter: a line a minute and one at the end, with images/s."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.n = desc, total, 0
        self.t0 = self.last = time.time()

    def update(self, n: int) -> None:
        self.n += n
        now = time.time()
        if now - self.last >= 60 and self.n < self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} images, {rate:.1f} img/s, "
                  f"{(self.total - self.n) / max(rate, 1e-9):.0f} s left", file=sys.stderr, flush=True)

    def close(self) -> None:
        dt = time.time() - self.t0
        print(f"{self.desc}: {self.n}/{self.total} images in {dt:.1f} s ({self.n / max(dt, 1e-9):.1f} img/s)",
              file=sys.stderr, flush=True)


class _Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def image_progress(desc: str, total: int, enabled: bool = True):
    """A bar counted in images (``bar.update(batch_size)``): images/s and time left.

    >>> with image_progress("float eval", 64, enabled=False) as bar:
    ...     bar.update(32)
    """
    if not enabled:
        bar = _Silent()
    elif not sys.stderr.isatty():
        bar = _ImageLines(_desc(desc), total)
    else:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=_desc(desc), unit="img", leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
