"""The ImageNet validation layout: one flat folder of images plus a labels file (``--labels``).

Two forms of the file are read (blank lines and ``#`` comments are skipped):

- ``filename class_index`` per line (e.g. ``ILSVRC2012_val_00000001.JPEG 65``), any order;
- one ``class_index`` per line, for the folder's images in sorted filename order (the
  form of the ILSVRC2012 devkit's ground truth file).

Class indices are the model's output indices, from 0. (The devkit's own file counts from 1
in the devkit's class order, not the sorted-WordNet-id order of torchvision's models: map it
first; README "The ImageNet validation layout".) Every problem is a :class:`DataError`
naming the file and line: a bad line, a listed image missing from the folder, an image of
the folder missing from the file, a label listed twice, a negative label, and (once the
model's output count is known) a label out of range.

>>> parse_lines(["a.jpg 3", "", "b.jpg 0  # comment"], "val.txt")
('names', [(1, 'a.jpg', 3), (3, 'b.jpg', 0)])
"""
from __future__ import annotations

from pathlib import Path

from .images import IMG_EXT, DataError, ImageSet

__all__ = ["scan_labelled", "scan_flat", "parse_lines", "check_range"]

_HINT = "see README 'The ImageNet validation layout'"


def _int(tok: str, path, ln: int, raw: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise DataError(f"labels file {path} line {ln}: {tok!r} is not a class index (line: {raw.strip()!r})",
                        hint=_HINT) from None
    if v < 0:
        raise DataError(f"labels file {path} line {ln}: label {v} is negative (class indices start at 0)", hint=_HINT)
    return v


def parse_lines(lines, path) -> tuple[str, list]:
    """``("names", [(line, filename, label)])`` or ``("indices", [(line, label)])``."""
    form, out = None, []
    for ln, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        this = "indices" if len(parts) == 1 else "names" if len(parts) == 2 else None
        if this is None:
            raise DataError(f"labels file {path} line {ln}: expected 'filename class_index' or 'class_index', "
                            f"got {raw.strip()!r}", hint=_HINT)
        if form is not None and this != form:
            what = "a filename and a label" if this == "names" else "a label alone"
            above = "filename class_index" if form == "names" else "one class_index"
            raise DataError(f"labels file {path} line {ln}: {what}, but the lines above are {above} lines: "
                            "use one form for the whole file", hint=_HINT)
        form = this
        if this == "names":
            out.append((ln, parts[0], _int(parts[1], path, ln, raw)))
        else:
            out.append((ln, _int(parts[0], path, ln, raw)))
    if form is None:
        raise DataError(f"labels file {path} has no labels (empty, or only comments)", hint=_HINT)
    return form, out


def scan_labelled(root, labels) -> ImageSet:
    """The flat folder ``root`` with the labels of the file ``labels``."""
    r, lp = Path(root), Path(labels)
    if not lp.is_file():
        raise DataError(f"labels file {labels} does not exist", hint=_HINT)
    if not r.is_dir():
        raise DataError(f"data folder {root} does not exist (with --labels: one flat folder of images)", hint=_HINT)
    files = sorted(f.name for f in r.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXT)
    if not files:
        raise DataError(f"data folder {root} holds no images directly: with --labels the images sit in one "
                        "flat folder", hint=_HINT)
    try:
        text = lp.read_text().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"labels file {labels} is not a text file", hint=_HINT) from None
    form, rows = parse_lines(text, labels)
    if form == "indices":
        if len(rows) != len(files):
            more = len(rows) > len(files)
            at = rows[len(files)][0] if more else rows[-1][0]
            raise DataError(f"labels file {labels} has {len(rows)} labels for the {len(files)} images of {root} "
                            + (f"(from line {at} on, no image is left)" if more else
                               f"(line {at} is the last; {files[len(rows)]} and {len(files) - len(rows) - 1} more "
                               "images have no label)")
                            + ": one index per line, in sorted filename order", hint=_HINT)
        lab = tuple(v for _, v in rows)
        lines = tuple(ln for ln, _ in rows)
    else:
        have = set(files)
        seen: dict[str, int] = {}
        by: dict[str, tuple[int, int]] = {}
        for ln, name, v in rows:
            if name in seen:
                raise DataError(f"labels file {labels} line {ln}: {name} is listed twice (also line {seen[name]})",
                                hint=_HINT)
            seen[name] = ln
            if name not in have:
                raise DataError(f"labels file {labels} line {ln}: image {name} is not in {root}", hint=_HINT)
            by[name] = (v, ln)
        extra = [f for f in files if f not in by]
        if extra:
            raise DataError(f"{len(extra)} images of {root} have no line in labels file {labels}: {extra[0]}"
                            + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""), hint=_HINT)
        lab = tuple(by[f][0] for f in files)
        lines = tuple(by[f][1] for f in files)
    return ImageSet(r, tuple(files), lab, (), str(labels), lines)


def check_range(s: ImageSet, n_outputs: int) -> None:
    """Every label must be an output of the model (``0 .. n_outputs - 1``); names the first bad line."""
    bad = [(ln, v) for v, ln in zip(s.labels, s.lines) if v >= n_outputs]
    if bad:
        ln, v = min(bad)
        raise DataError(f"labels file {s.labels_file} line {ln}: label {v} is out of range for a model with "
                        f"{n_outputs} outputs (0..{n_outputs - 1})", hint=_HINT)


def scan_flat(root) -> ImageSet:
    """A flat folder's images in sorted order, without labels (outputs only: ``run-c``,
    ``export-onnx`` on the images of a ``--labels`` run); an ImageFolder scans as usual."""
    r = Path(root)
    if r.is_dir() and not any(d.is_dir() for d in r.iterdir()):
        files = sorted(f.name for f in r.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXT)
        if files:
            return ImageSet(r, tuple(files), (0,) * len(files), ())
    return ImageSet.scan(root)
