"""Image folders: the ImageFolder layout (``root/<class>/<image>``) or a flat folder with a
labels file (``--labels``), seeded calibration/evaluation subsets, decoding and
preprocessing, and the mapping of folder classes to model outputs.

The ImageNet validation layout: one flat folder of images plus a labels file (``--labels``).

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

from dataclasses import dataclass
from pathlib import Path

import torch

from fixq.errors import FixqError
from fixq.util.progress import progress
from .zoo import Preprocess

__all__ = ["DataError", "ImageSet", "load_images", "known_classes", "class_mapping", "CIFAR10_CLASSES",
           "select_subsets", "Split", "IMG_EXT", "worker_error", "scan_labelled", "scan_flat", "parse_lines",
           "check_range"]


class DataError(FixqError):
    """Missing or empty data folders, unreadable images, bad labels files."""


IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageSet:
    """An ImageFolder-layout folder: ``root/<class>/<image>``; classes in sorted order. With
    a labels file (``scan(root, labels)``), a flat folder of images whose class indices (the
    model's outputs) are read from the file, ``lines`` giving each image's line there."""

    root: Path
    files: tuple[str, ...]       # relative paths, sorted by class then name
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    labels_file: str | None = None
    lines: tuple[int, ...] | None = None

    @staticmethod
    def scan(root: str | Path, labels: str | Path | None = None) -> "ImageSet":
        if labels is not None:
            return scan_labelled(root, labels)
        r = Path(root)
        if not r.is_dir():
            raise DataError(f"data folder {root} does not exist (expected root/<class>/<image> files)")
        classes = sorted(d.name for d in r.iterdir() if d.is_dir())
        if not classes:
            flat = [f for f in r.iterdir() if f.suffix.lower() in IMG_EXT]
            what = f"it holds {len(flat)} images directly" if flat else "it is empty"
            raise DataError(f"data folder {root} has no class subfolders ({what}): fixq expects "
                            f"{root}/<class>/<image>, one folder per class, sorted names = class indices",
                            hint="move the images into one folder per class")
        files, labels = [], []
        for i, c in enumerate(classes):
            for f in sorted((r / c).iterdir()):
                if f.suffix.lower() in IMG_EXT:
                    files.append(f"{c}/{f.name}")
                    labels.append(i)
        if not files:
            raise DataError(f"data folder {root} holds no images: expected ImageFolder layout "
                            "root/<class>/<image>.jpg (class folders in sorted order = class index)")
        return ImageSet(r, tuple(files), tuple(labels), tuple(classes))

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Split:
    calib: tuple[int, ...]
    eval: tuple[int, ...]
    seed: int
    same_folder: bool


def select_subsets(calib: ImageSet, evalset: ImageSet, calib_size: int | None,
                   eval_size: int | None, seed: int = 0) -> Split:
    """Seeded subsets; when both name the same folder they are disjoint.

    Evaluation indices are returned sorted, so outputs come in folder order."""
    same = calib.root.resolve() == evalset.root.resolve()
    g = torch.Generator().manual_seed(seed)
    pc = torch.randperm(len(calib), generator=g).tolist()
    nc = len(calib) if calib_size is None else min(calib_size, len(calib))
    if nc <= 0:
        raise DataError("calibration size must be at least 1")
    c = pc[:nc]
    if same:
        rest = pc[nc:]
        if not rest:
            raise DataError(f"--calib and --eval name the same folder and calibration takes all "
                            f"{len(calib)} images: lower --calib-size so some are left to evaluate")
        e = rest if eval_size is None else rest[:eval_size]
    else:
        pe = torch.randperm(len(evalset), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        e = pe if eval_size is None else pe[:eval_size]
    if not e:
        raise DataError("evaluation size must be at least 1")
    return Split(tuple(sorted(c)), tuple(sorted(e)), seed, same)


def _transform(pre: Preprocess):
    from torchvision import transforms as T
    steps = []
    if pre.grayscale:
        steps.append(T.Grayscale(1))
    if pre.resize:
        steps.append(T.Resize(pre.resize, interpolation=T.InterpolationMode.BICUBIC
                              if getattr(pre, "interpolation", "bilinear") == "bicubic" else T.InterpolationMode.BILINEAR))
    if pre.crop:
        steps.append(T.CenterCrop(pre.crop))
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


class _Files(torch.utils.data.Dataset):
    def __init__(self, s: ImageSet, idx, pre: Preprocess, skip_bad: bool = False):
        self.s, self.idx, self.tf, self.skip_bad = s, list(idx), _transform(pre), skip_bad

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, k):
        from PIL import Image
        i = self.idx[k]
        path = self.s.root / self.s.files[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on broken files
            if self.skip_bad:
                return None, None, k
            raise DataError(f"cannot read image {path}: {e}",
                            hint="--skip-bad-images skips unreadable images and counts them") from None
        return self.tf(img), self.s.labels[i], k


def _collate(items):
    good = [(x, y) for x, y, _ in items if x is not None]
    bad = [k for x, _, k in items if x is None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


def load_images(s: ImageSet, idx, pre: Preprocess, workers: int = 0, batch_size: int = 64,
                show_progress: bool = True, desc: str = "load images",
                skipped: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess the chosen images into one in-memory tensor (N, C, H, W).

    An unreadable image stops with a :class:`DataError` naming it, unless ``skipped`` is
    a list: then it is left out and its relative path appended there.

    >>> x, y = load_images(ImageSet.scan("digits"), range(8), PRESETS["digits"])  # doctest: +SKIP
    """
    idx = list(idx)
    loader = torch.utils.data.DataLoader(_Files(s, idx, pre, skipped is not None), batch_size=batch_size,
                                         num_workers=workers, shuffle=False, collate_fn=_collate)
    xs, ys = [], []
    try:
        for x, y, bad in progress(loader, desc, show_progress):
            if skipped is not None:
                skipped.extend(s.files[idx[k]] for k in bad)
            if x is not None:
                xs.append(x)
                ys.append(y)
    except DataError as e:
        raise worker_error(e, workers) from None
    if not xs:
        raise DataError(f"no readable images selected from {s.root}")
    return torch.cat(xs), torch.cat(ys)


def worker_error(e: DataError, workers: int) -> DataError:
    """A DataError raised in a DataLoader worker (torch re-raises it with the worker's
    traceback as the message) as the one-line error the main process would have raised."""
    if not workers:
        return e
    last = str(e).strip().splitlines()[-1]
    return DataError(last.split("DataError: ", 1)[-1],
                     hint="--skip-bad-images skips unreadable images and counts them")


def known_classes(kind: str | None) -> tuple[str, ...] | None:
    """Class names (in index order) of a zoo label set: ``cifar10``, ``imagenet`` (WordNet ids), ``digits``."""
    if kind == "cifar10":
        return CIFAR10_CLASSES
    if kind == "digits":
        return tuple(str(i) for i in range(10))
    if kind == "imagenet":
        return tuple((Path(__file__).parent / "imagenet_wnids.txt").read_text().split())
    return None


def class_mapping(s: ImageSet, n_outputs: int, kind: str | None = None) -> torch.Tensor | None:
    """Map the folder's class indices (sorted folder names) to the model's output indices.

    Where the zoo knows the class names (``kind``), folder names must be among them and each
    folder gets its name's index (a subset of the classes is fine); otherwise the folder must
    have exactly one class folder per output. Returns ``None`` when the indices already agree.

    >>> class_mapping(ImageSet(Path("."), (), (), ("cat", "dog")), 10, "cifar10").tolist()
    [3, 5]
    """
    if s.labels_file is not None:  # indices straight from the labels file
        check_range(s, n_outputs)
        return None
    names = known_classes(kind)
    if names is not None and len(names) == n_outputs:
        pos = {c: i for i, c in enumerate(names)}
        unknown = [c for c in s.classes if c not in pos]
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise DataError(f"data folder {s.root} has class folders that are not {kind} classes: {shown} "
                            f"(expected names like {', '.join(names[:3])}...)",
                            hint=f"name each class folder after its {kind} class")
        idx = [pos[c] for c in s.classes]
        return None if idx == list(range(len(idx))) else torch.tensor(idx)
    if len(s.classes) != n_outputs:
        raise DataError(f"data folder {s.root} has {len(s.classes)} class folders but the model has {n_outputs} "
                        "outputs: class folders sorted by name give the class index, so they must be one per "
                        "output", hint="keep one folder per class, even empty ones")
    return None


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
