"""QuantConfig (what the user asks for) and QuantPlan (what calibration decided).

Notation: ``T`` bits, ``F`` fractional bits per partition, ``A`` accumulator bits,
``S[i]`` the exact-sum format of output channel i (``max_j Fw[i,j] + Fx[j]``) and
``Facc[i]`` the accumulator format (DESIGN.md §5). ``None`` bits mean floating point
(``flp``), as in the paper's ``<8b,flp>`` rows.

The plan is the one JSON-serialisable object that flows through fixq: graph + float
weights + plan reproduce the quantized model exactly.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

import torch

from fixq.errors import FixqError
from fixq.numerics.formats import OVERFLOWS, Word, check_bits, check_rounding
from fixq.numerics.ranges import parse_method

__all__ = ["LayerConfig", "QuantConfig", "Formats", "AffineFormats", "LayerPlan", "QuantPlan", "KMeansPlan",
           "LayerCodes",
           "filter_grid",
           "COEFF_MODES", "DATA_MODES", "FC_MODES", "PlanError"]

COEFF_MODES = ("4D", "3D", "2D")
DATA_MODES = ("4D", "3D")
DATA_SIGNS = ("auto", "signed")
FC_MODES = ("auto", "4D")
PLAN_VERSION = 1


class PlanError(FixqError):
    """A config or plan that cannot be used as asked."""


def _bits_or_flp(v, what: str) -> int | None:
    if v is None or (isinstance(v, str) and v.lower() in ("flp", "float", "none")):
        return None
    try:
        return check_bits(int(v), what)
    except (TypeError, ValueError):
        raise PlanError(f"{what} must be 2..32 (an integer) or flp (floating point), got {v!r}") from None


def _bits(v, what: str) -> int:
    try:
        return check_bits(int(v), what)
    except (TypeError, ValueError):
        raise PlanError(f"{what} must be 2..32 (an integer), got {v!r}") from None


@dataclass(frozen=True)
class LayerConfig:
    """Quantization settings of one layer (or the defaults for all).

    Defaults chosen by measurement (benchmarks/RESULTS.md, "Default range rules"): maxabs
    coefficients, mse data ranges, unsigned data where the graph proves x >= 0. The
    paper's choices are ``method="maxabs", data_method=None, data_sign="signed"``.

    >>> c = LayerConfig()
    >>> (c.method, c.effective_data_method, c.data_sign)
    ('maxabs', 'mse', 'auto')
    """

    coeff_bits: int | None = 8
    coeff_mode: str = "3D"
    data_bits: int | None = 8
    data_mode: str = "4D"
    bias_bits: int = 8
    acc_bits: int = 32
    acc_overflow: str = "saturate"
    method: str = "maxabs"          # coefficients' range method (maxabs: paper eq. 6)
    data_method: str | None = "mse"  # data's range method; None: same as ``method`` (fixq 0.1 plans)
    data_sign: str = "auto"  # auto: unsigned U(T,F) where the graph proves x >= 0; signed: the paper
    fc_mode: str = "auto"  # fully connected layers: auto = coeff_mode (2D means 3D); 4D = the paper's §3 rule

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_bits", _bits_or_flp(self.coeff_bits, "coefficient bits"))
        object.__setattr__(self, "data_bits", _bits_or_flp(self.data_bits, "data bits"))
        object.__setattr__(self, "bias_bits", _bits(self.bias_bits, "bias bits"))
        object.__setattr__(self, "acc_bits", _bits(self.acc_bits, "accumulator bits"))
        mode = str(self.coeff_mode).upper()
        if mode not in COEFF_MODES:
            raise PlanError(f"coefficient mode must be one of {', '.join(COEFF_MODES)}, got {self.coeff_mode!r}")
        object.__setattr__(self, "coeff_mode", mode)
        dmode = str(self.data_mode).upper()
        if dmode not in DATA_MODES:
            raise PlanError(f"data mode must be one of {', '.join(DATA_MODES)}, got {self.data_mode!r}")
        object.__setattr__(self, "data_mode", dmode)
        if self.data_sign not in DATA_SIGNS:
            raise PlanError(f"data sign must be one of {', '.join(DATA_SIGNS)}, got {self.data_sign!r}")
        fc = str(self.fc_mode).upper() if str(self.fc_mode).lower() != "auto" else "auto"
        if fc not in FC_MODES:
            raise PlanError(f"fully connected mode must be one of {', '.join(FC_MODES)}, got {self.fc_mode!r}")
        object.__setattr__(self, "fc_mode", fc)
        if self.acc_overflow not in OVERFLOWS:
            raise PlanError(f"accumulator overflow must be one of {', '.join(OVERFLOWS)}")
        try:
            object.__setattr__(self, "method", str(parse_method(self.method)))
            if self.data_method is not None:
                object.__setattr__(self, "data_method", str(parse_method(self.data_method)))
        except ValueError as e:
            raise PlanError(str(e)) from None

    @property
    def effective_data_method(self) -> str:
        return self.data_method or self.method


_LAYER_KEYS = {f.name for f in fields(LayerConfig)}


@dataclass(frozen=True)
class QuantConfig:
    """Defaults plus ordered per-layer overrides ``(glob pattern, {field: value})``.

    >>> cfg = QuantConfig(LayerConfig(coeff_bits=8), overrides=(("layer3.*", {"coeff_bits": 4}),))
    >>> cfg.for_layer("layer3.0.conv1").coeff_bits, cfg.for_layer("conv1").coeff_bits
    (4, 8)
    """

    default: LayerConfig = field(default_factory=LayerConfig)
    rounding: str = "half_up"
    overrides: tuple[tuple[str, dict], ...] = ()

    def __post_init__(self) -> None:
        try:
            check_rounding(self.rounding)
        except ValueError as e:
            raise PlanError(str(e)) from None
        for pattern, kv in self.overrides:
            bad = set(kv) - _LAYER_KEYS
            if bad:
                raise PlanError(f"override for {pattern!r} has unknown keys {sorted(bad)}; "
                                f"allowed: {sorted(_LAYER_KEYS)}")
            replace(self.default, **kv)  # validates values early

    def for_layer(self, name: str) -> LayerConfig:
        cfg = self.default
        for pattern, kv in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                cfg = replace(cfg, **kv)
        return cfg

    def unmatched_patterns(self, names) -> list[str]:
        return [p for p, _ in self.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def to_json(self) -> dict:
        return {"default": _config_json(self.default), "rounding": self.rounding,
                "overrides": [[p, kv] for p, kv in self.overrides]}

    @staticmethod
    def from_json(d: dict) -> "QuantConfig":
        bad = set(d["default"]) - _LAYER_KEYS
        if bad:
            raise PlanError(f"config keys {sorted(bad)} are not supported by this fixq version")
        # plans written before unsigned data (no data_sign key) used signed data everywhere
        return QuantConfig(LayerConfig(**{"data_sign": "signed", **d["default"]}), d["rounding"],
                           tuple((p, dict(kv)) for p, kv in d.get("overrides", [])))


# fields added after plan version 1 was frozen: left out of the JSON at their default, so
# plans that do not use them keep their bytes (and older fixq versions can read them)
_OMIT_AT_DEFAULT = {"fc_mode": "auto"}


def _config_json(c: LayerConfig) -> dict:
    return {k: v for k, v in asdict(c).items() if _OMIT_AT_DEFAULT.get(k, object()) != v}


@dataclass(frozen=True)
class Formats:
    """Power-of-two formats of one tensor: bits ``T``, granularity, one ``F`` per partition.

    ``shape`` is the partition grid: ``()`` for 4D, ``(N,)`` for 3D (or per data
    channel), ``(N, M/groups)`` for 2D. ``Tp`` gives one word length per partition when
    they differ (mixed 8/4-bit coefficients per 2D filter); ``T`` is then the largest,
    the storage word. ``signed=False`` makes data formats unsigned, ``U(T, F)``: codes
    ``0 .. 2**T - 1`` (tensors non-negative by construction; coefficients are always signed).

    >>> Formats(8, "2D", (7, 4), (1, 2), Tp=(8, 4)).bits().tolist()
    [[8, 4]]
    >>> str(Formats(8, "4D", (5,), signed=False).word)
    'U8'
    """

    T: int
    granularity: str
    F: tuple[int, ...]
    shape: tuple[int, ...] = ()
    Tp: tuple[int, ...] | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if self.Tp is not None:
            if len(self.Tp) != len(self.F):
                raise PlanError(f"{len(self.Tp)} word lengths for {len(self.F)} partitions")
            for t in dict.fromkeys(self.Tp):  # each distinct word length once, in order
                check_bits(int(t), "coefficient bits")
            if max(self.Tp) != self.T:
                raise PlanError(f"T={self.T} must be the largest per-partition word length {max(self.Tp)}")

    @property
    def word(self) -> Word:
        """``T`` with its signedness (what data saturation takes)."""
        return Word(self.T, self.signed)

    @cached_property
    def _F(self) -> torch.Tensor:  # built once per (frozen) object: a 2D layer has one F per filter
        return torch.tensor(self.F, dtype=torch.int64).reshape(self.shape)

    @cached_property
    def _Tp(self) -> torch.Tensor:
        return torch.tensor(self.Tp, dtype=torch.int64).reshape(self.shape)

    def F_tensor(self, device=None) -> torch.Tensor:
        """``F`` per partition, int64, shaped ``shape`` (a new tensor: callers may change it)."""
        return self._F.clone() if device is None else self._F.to(device, copy=True)

    def bits(self, device=None) -> torch.Tensor:
        """Word length per partition, shaped like ``F_tensor()``."""
        if self.Tp is None:
            return torch.full(self.shape, self.T, dtype=torch.int64, device=device)
        return self._Tp.clone() if device is None else self._Tp.to(device, copy=True)

    def T_arg(self):
        """``T`` as the quantizers take it: an int, or a per-partition tensor when mixed."""
        return self.T if self.Tp is None else self.bits()


@dataclass(frozen=True)
class AffineFormats:
    """Paper eqs. 4-5 (TensorFlow-style) per partition: not a power of two."""

    T: int
    granularity: str
    mu: tuple[float, ...]
    sigma: tuple[float, ...]
    shape: tuple[int, ...] = ()


def _fmt_json(f):
    if f is None:
        return None
    d = asdict(f)
    d["kind"] = "affine" if isinstance(f, AffineFormats) else "pow2"
    if d.get("signed", False):  # signed is the default: plans without unsigned data keep their JSON
        del d["signed"]
    return d


@dataclass(frozen=True)
class KMeansPlan:
    """K-means clustered kernels of one layer (DESIGN §9): kernel i = basis ``G[l(i)]`` +
    residual ``R_i``. The basis codes live in the plan (the float centres depend on the
    clustering library); ``LayerPlan.weight`` holds the residuals' formats.

    ``basis_codes`` are the K x (M/groups) x kh x kw basis coefficients as integer codes
    at ``basis`` (formats per basis kernel, 3D, or per basis 2D filter, 2D). ``data``
    (``<4b,4b>`` residuals): the residual kernels read the layer input requantized to
    these formats, ``xr = sat(round_shift(x, Fx - Fxr))``, the basis kernels read ``x``."""

    K: int
    assign: tuple[int, ...]
    basis: Formats
    basis_codes: tuple[int, ...]
    seed: int = 0
    data: Formats | None = None  # residual branch's input format (<4b,4b>, paper eq. 9); None: it reads x

    def residual_F(self, Fx: torch.Tensor) -> torch.Tensor:
        """The input format the residual kernels read: ``data``'s, else the layer's ``Fx``."""
        return Fx if self.data is None else self.data.F_tensor()

    def assign_tensor(self) -> torch.Tensor:
        return torch.tensor(self.assign, dtype=torch.int64)

    def basis_tensor(self, kernel_shape) -> torch.Tensor:
        """int64 codes ``(K, M/groups, kh, kw)``."""
        return torch.tensor(self.basis_codes, dtype=torch.int64).reshape(self.K, *kernel_shape)


@dataclass(frozen=True)
class LayerCodes:
    """Decided codes of one layer (fixq.planning.coeffs, fixq.algorithms.learned): ``up`` is the base64 bitmask
    of round-up decisions (one bit per coefficient, C order; code = sat(floor(x 2**F) + up)),
    ``bias`` the corrected bias codes at the layer's bias formats, ``digest`` the
    :func:`fixq.planning.coeffs.weights_digest` of the float weights they were decided for (a
    mismatch is refused). ``None`` keeps the model's rounding for that part."""

    digest: str
    up: str | None = None
    bias: tuple[int, ...] | None = None


def filter_grid(F: torch.Tensor, N: int, Mg: int) -> torch.Tensor:
    """A partition grid (``()``, ``(N,)`` or ``(N, Mg)``) expanded to one entry per 2D filter."""
    return (F.reshape(-1, 1) if F.dim() == 1 else F).expand(N, Mg)


@dataclass(frozen=True)
class LayerPlan:
    """Conv/linear decisions: coefficient, bias and accumulator formats (None = flp)."""

    name: str
    weight: Formats | AffineFormats | None
    bias: Formats | None
    acc_bits: int | None = None
    acc_F: tuple[int, ...] | None = None
    acc_overflow: str = "saturate"
    notes: tuple[str, ...] = ()
    acc_I: tuple[int, ...] | None = None  # calibrated ceil(log2 max|acc_i|) per output channel
    kmeans: KMeansPlan | None = None
    codes: LayerCodes | None = None  # learned rounding / bias correction (omitted from JSON when None)

    def coeff_F(self, N: int, Mg: int) -> torch.Tensor:
        """``Fw[i, j]``: the format each 2D filter's coefficients are exact at; for K-means
        layers ``max(F_residual[i, j], F_basis[l(i), j])`` (basis + residual is exact there)."""
        Fr = filter_grid(self.weight.F_tensor(), N, Mg)
        if self.kmeans is None:
            return Fr
        Fg = filter_grid(self.kmeans.basis.F_tensor(), self.kmeans.K, Mg)[self.kmeans.assign_tensor()]
        return torch.maximum(Fr, Fg)


@dataclass(frozen=True)
class QuantPlan:
    """Everything needed, with the float weights, to reproduce the quantized model."""

    model: str
    config: QuantConfig
    tensors: dict[str, Formats | AffineFormats]
    layers: dict[str, LayerPlan]
    float_ops: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    version: int = PLAN_VERSION

    @property
    def rounding(self) -> str:
        return self.config.rounding

    @property
    def is_affine(self) -> bool:
        return any(isinstance(f, AffineFormats) for f in self.tensors.values()) or any(
            isinstance(lp.weight, AffineFormats) for lp in self.layers.values())

    def to_json(self) -> dict:
        return {
            "version": self.version, "model": self.model, "config": self.config.to_json(),
            "tensors": {k: _fmt_json(v) for k, v in self.tensors.items()},
            "layers": {k: _layer_json(v) for k, v in self.layers.items()},
            "float_ops": list(self.float_ops), "notes": list(self.notes),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


def _layer_json(v: LayerPlan) -> dict:
    d = {**asdict(v), "weight": _fmt_json(v.weight), "bias": _fmt_json(v.bias),
         "kmeans": _kmeans_json(v.kmeans)}
    if v.codes is None:  # plans without decided codes keep their JSON byte for byte
        del d["codes"]
    else:
        d["codes"] = {k: x for k, x in asdict(v.codes).items() if x is not None}
    return d


def _kmeans_json(km):
    if km is None:
        return None
    d = {**asdict(km), "basis": _fmt_json(km.basis), "data": _fmt_json(km.data)}
    if km.data is None:  # <4b,8b> plans keep their bytes
        del d["data"]
    return d


