"""Image folders: the ImageFolder layout (``root/<class>/<image>``) or a flat folder with a
labels file (``--labels``), seeded calibration/evaluation subsets, decoding and
preprocessing, and the mapping of folder classes to model outputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fixq.errors import FixqError
from fixq.util.progress import progress
from .zoo import Preprocess

__all__ = ["DataError", "ImageSet", "load_images", "known_classes", "class_mapping", "CIFAR10_CLASSES",
           "select_subsets", "Split", "IMG_EXT", "worker_error"]


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
            from .labels import scan_labelled
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
        from .labels import check_range
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


