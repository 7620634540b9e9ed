"""The declared JSON schema of ``plan.json`` and ``--config`` files, and the plan's check
against a captured graph.

``plan.json`` is the contract between calibration, the integer engine, the C export and
the ONNX export, so a hand-edited plan is checked in three steps, each error naming the
JSON path and what was expected (:class:`fixq.planning.plan.PlanError`, exit code 2):

1. the version (an unknown one is refused before anything else is read);
2. the schema (:func:`plan_schema`, JSON Schema draft 2020-12, checked with
   ``jsonschema``): types, required keys, bits 2..32, integer ``F``, known enums;
3. :func:`check_plan_graph`: every conv/linear layer and every quantized tensor of the
   graph has an entry, no entry names a node the graph lacks, and each partition grid
   matches the layer's or tensor's shape.

Why jsonschema rather than pydantic: the plan's Python side is already a set of frozen
dataclasses (``Formats``, ``LayerPlan``...); a schema kept as data states the file format
once, language-neutral (it is what a C or FPGA tool reading plan.json would use), is
versioned with the plan, and jsonschema reports each error with its exact JSON path.

The layer-config part is derived from :class:`fixq.planning.plan.LayerConfig`'s fields, so a new
field extends the schema without an edit here.

>>> validate_plan_json({"version": 7}, "p.json")
Traceback (most recent call last):
...
fixq.planning.plan.PlanError: p.json has version 7; this fixq reads plan version 1 (re-create the plan with this fixq, or use the fixq version that wrote it)
"""
from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from pathlib import Path

from fixq.graph.ir import QUANT_POINTS
from fixq.numerics.formats import MAX_BITS, MIN_BITS, OVERFLOWS, ROUNDINGS
from .coeffs import check_codes
from .plan import (COEFF_MODES, DATA_MODES, PLAN_VERSION, AffineFormats, Formats, KMeansPlan, LayerCodes, LayerConfig,
                   LayerPlan, PlanError, QuantConfig, QuantPlan)

__all__ = ["plan_schema", "config_schema", "layer_config_schema", "validate_plan_json", "validate_config_json",
           "check_plan_graph", "json_path", "read_config"]

BITS = {"type": "integer", "minimum": MIN_BITS, "maximum": MAX_BITS,
        "description": f"an integer number of bits, {MIN_BITS}..{MAX_BITS}"}
BITS_OR_FLP = {"anyOf": [BITS, {"type": "null"}, {"enum": ["flp", "float", "none"]}],
               "description": f"bits {MIN_BITS}..{MAX_BITS}, or \"flp\" / null for floating point"}
INTS = {"type": "array", "items": {"type": "integer", "description": "an integer"},
        "description": "a list of integers"}
SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 2,
         "description": "the partition grid: [] (4D), [N] (3D) or [N, M/groups] (2D)"}
GRANULARITY = {"enum": list(COEFF_MODES), "description": "4D, 3D or 2D"}

# known LayerConfig fields; a field added to the dataclass later gets a schema from its type
_CONFIG_FIELDS = {
    "coeff_bits": BITS_OR_FLP, "data_bits": BITS_OR_FLP, "bias_bits": BITS, "acc_bits": BITS,
    "coeff_mode": {"enum": [*COEFF_MODES, *(m.lower() for m in COEFF_MODES)], "description": "4D, 3D or 2D"},
    "data_mode": {"enum": [*DATA_MODES, *(m.lower() for m in DATA_MODES)], "description": "4D or 3D"},
    "acc_overflow": {"enum": list(OVERFLOWS), "description": " or ".join(OVERFLOWS)},
    "method": {"type": "string", "description": "maxabs, percentile:P, mse or affine"},
    "data_method": {"type": ["string", "null"], "description": "maxabs, percentile:P, mse, affine or null"},
    "data_sign": {"enum": ["auto", "signed"], "description": "auto or signed"},
    "fc_mode": {"enum": ["auto", "4D", "4d"], "description": "auto (fully connected layers follow coeff_mode; "
                "2D means 3D) or 4D (the paper's rule)"},
}
_PY_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def _from_annotation(ann) -> dict:
    """A permissive schema for a dataclass field fixq added after this module was written."""
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    parts = [t.strip() for t in text.split("|")]
    if not all(t in _PY_TYPES or t == "None" for t in parts):
        return {}  # a container or a class: accepted as is (the dataclass checks it)
    return {"type": [_PY_TYPES.get(t, "null") for t in parts]}


def _dataclass_object(cls, known: dict, required: tuple[str, ...] = (), extra: dict | None = None) -> dict:
    """Object schema over a dataclass's fields: known fields get their schema, new ones a
    schema from their annotation; keys that are no field are refused (typos)."""
    hints = {f.name: f.type for f in fields(cls)}
    props = {**known, **{k: _from_annotation(t) for k, t in hints.items() if k not in known}}
    props.update(extra or {})
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def layer_config_schema(required: bool = False) -> dict:
    """Schema of one layer's settings (a ``LayerConfig``; all keys optional in overrides)."""
    names = tuple(f.name for f in fields(LayerConfig)) if required else ()
    return _dataclass_object(LayerConfig, _CONFIG_FIELDS, names if required else ())


def _pow2() -> dict:
    return _dataclass_object(Formats, {
        "T": BITS, "granularity": GRANULARITY, "F": INTS, "shape": SHAPE,
        "Tp": {"anyOf": [{"type": "null"}, {"type": "array", "items": BITS}],
               "description": "null or one word length (2..32) per partition"},
        "signed": {"type": "boolean", "description": "true or false"},
    }, ("T", "granularity", "F"), {"kind": {"const": "pow2"}})


def _affine() -> dict:
    nums = {"type": "array", "items": {"type": "number"}, "description": "a list of numbers"}
    return _dataclass_object(AffineFormats, {"T": BITS, "granularity": GRANULARITY, "mu": nums, "sigma": nums,
                                             "shape": SHAPE}, ("kind", "T", "granularity", "mu", "sigma"),
                             {"kind": {"const": "affine"}})


def _formats(nullable: bool = True) -> dict:
    choice = {"if": {"type": "object", "properties": {"kind": {"const": "affine"}}, "required": ["kind"]},
              "then": {"$ref": "#/$defs/affine"}, "else": {"$ref": "#/$defs/pow2"}}
    return {"anyOf": [{"type": "null"}, choice]} if nullable else choice


def plan_schema() -> dict:
    """The JSON schema of plan.json, version ``PLAN_VERSION``."""
    kmeans = _dataclass_object(KMeansPlan, {"K": {"type": "integer", "minimum": 1}, "assign": INTS,
                                            "basis": {"$ref": "#/$defs/pow2"}, "basis_codes": INTS,
                                            "seed": {"type": "integer"},
                                            "data": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pow2"}],
                                                     "description": "null or the residual branch's input "
                                                                    "formats (<4b,4b> residuals)"}},
                               ("K", "assign", "basis", "basis_codes"))
    codes = _dataclass_object(LayerCodes, {
        "digest": {"type": "string", "pattern": "^[0-9a-f]{16}$",
                   "description": "16 hex digits: sha256 of the float weights the codes were decided for"},
        "up": {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$",
               "description": "base64 bitmask of round-up decisions, one bit per coefficient"},
        "bias": INTS}, ("digest",))
    layer = _dataclass_object(LayerPlan, {
        "name": {"type": "string"}, "weight": _formats(), "bias": {"anyOf": [{"type": "null"},
                                                                             {"$ref": "#/$defs/pow2"}]},
        "acc_bits": {"anyOf": [{"type": "null"}, BITS], "description": "null or bits 2..32"},
        "acc_F": {"anyOf": [{"type": "null"}, INTS]}, "acc_I": {"anyOf": [{"type": "null"}, INTS]},
        "acc_overflow": {"enum": list(OVERFLOWS)}, "notes": {"type": "array", "items": {"type": "string"}},
        "kmeans": {"anyOf": [{"type": "null"}, kmeans]},
        "codes": codes,
    }, ("name", "weight", "bias", "acc_bits", "acc_F", "acc_overflow"))
    top = _dataclass_object(QuantPlan, {
        "version": {"const": PLAN_VERSION},
        "model": {"type": "string"},
        "config": config_schema(),
        "tensors": {"type": "object", "additionalProperties": _formats(nullable=False)},
        "layers": {"type": "object", "additionalProperties": layer},
        "float_ops": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
    }, ("version", "model", "config", "tensors", "layers"))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"fixq plan, version {PLAN_VERSION}",
            "$defs": {"pow2": _pow2(), "affine": _affine()}, **top}


def config_schema() -> dict:
    """The ``config`` section of a plan: defaults, rounding, ordered overrides."""
    override = {"type": "array", "prefixItems": [{"type": "string"}, layer_config_schema()],
                "minItems": 2, "maxItems": 2, "description": "[layer glob, {field: value}]"}
    return {"type": "object", "required": ["default", "rounding"], "additionalProperties": False,
            "properties": {"default": layer_config_schema(), "rounding": {"enum": list(ROUNDINGS)},
                           "overrides": {"type": "array", "items": override}}}


def json_path(parts) -> str:
    """``$.layers['layer3.0.conv1'].weight.T`` from a list of keys and indices."""
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.replace("_", "").isalnum() and not p[:1].isdigit():
            out += f".{p}"
        else:
            out += f"[{p!r}]"
    return out


def _raise_first(errors, source: str, what: str) -> None:
    from jsonschema.exceptions import best_match
    errors = sorted(errors, key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not errors:
        return
    e = best_match(errors[:1])  # descends into anyOf/if-then-else to the concrete reason
    desc = e.schema.get("description") if isinstance(e.schema, dict) else None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    raise PlanError(f"{source} is not a valid {what}: {json_path(e.absolute_path)}: {e.message}"
                    + (f"; expected {desc}" if desc else "") + more)


def _validator(schema: dict):
    """Draft 2020-12, with tuples taken as arrays (``QuantPlan.to_json()`` before a JSON round trip)."""
    import jsonschema
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("array", lambda _, v: isinstance(v, (list, tuple)))
    return jsonschema.validators.extend(base, type_checker=checker)(schema)


def validate_plan_json(d, source: str = "plan.json") -> None:
    """Check a parsed plan.json: version first, then the schema, then partition counts.

    >>> validate_plan_json({"version": 1, "model": "m"}, "p.json")
    Traceback (most recent call last):
    ...
    fixq.planning.plan.PlanError: p.json is not a valid fixq plan: $: 'config' is a required property (and 2 more problems)
    """
    if not isinstance(d, dict):
        raise PlanError(f"{source} is not a fixq plan: expected a JSON object, got {type(d).__name__}")
    v = d.get("version")
    if v is None:
        raise PlanError(f"{source} has no \"version\": not a fixq plan (this fixq reads plan version "
                        f"{PLAN_VERSION})")
    if v != PLAN_VERSION or isinstance(v, bool):
        raise PlanError(f"{source} has version {v!r}; this fixq reads plan version {PLAN_VERSION} (re-create the "
                        "plan with this fixq, or use the fixq version that wrote it)")
    _raise_first(_validator(plan_schema()).iter_errors(d), source, "fixq plan")
    for where, f in _formats_in(d):
        _check_partitions(f, where, source)


def validate_config_json(d, source: str) -> None:
    """Check a ``--config`` file: ``{layer-glob: {field: value}}`` (optionally under ``layers``)."""
    schema = {"type": "object", "additionalProperties": {"anyOf": [{"type": "null"}, layer_config_schema()]},
              "description": "a mapping of layer names (globs allowed) to settings"}
    body = d.get("layers", d) if isinstance(d, dict) else d
    _raise_first(_validator(schema).iter_errors(body), source, "fixq config")


def read_config(path, base: QuantConfig) -> QuantConfig:
    """Read a ``--config`` file (YAML or JSON ``{layer-glob: {field: value}}``), check it against
    the schema and each value with ``LayerConfig``; append its overrides to ``base``'s."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except ValueError as e:  # json.JSONDecodeError
        raise PlanError(f"config file {path} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise PlanError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise PlanError(f"config file {path} must map layer names (globs allowed) to settings, "
                        f"e.g. {{\"layer3.*\": {{\"coeff_bits\": 4}}}}")
    validate_config_json(data, str(path))
    data = data.get("layers", data)
    overrides = tuple((str(k), dict(v or {})) for k, v in data.items())
    for k, kv in overrides:
        try:
            replace(base.default, **kv)
        except PlanError as e:
            raise PlanError(f"config file {path}: {json_path([k])}: {e}") from None
    return replace(base, overrides=base.overrides + overrides)


def _formats_in(d: dict):
    for k, f in d["tensors"].items():
        yield ["tensors", k], f
    for k, lp in d["layers"].items():
        for part in ("weight", "bias"):
            if lp.get(part) is not None:
                yield ["layers", k, part], lp[part]
        if lp.get("kmeans") is not None:
            yield ["layers", k, "kmeans", "basis"], lp["kmeans"]["basis"]
            if lp["kmeans"].get("data") is not None:
                yield ["layers", k, "kmeans", "data"], lp["kmeans"]["data"]


def _check_partitions(f: dict, where: list, source: str) -> None:
    shape = f.get("shape", [])
    n = math.prod(shape)
    want = {"4D": 0, "3D": 1, "2D": 2}[f["granularity"]]
    if len(shape) != want:
        raise PlanError(f"{source}: {json_path(where + ['shape'])}: a {f['granularity']} format has a grid of "
                        f"{want} dimension(s), got {shape}")
    for key in ("F", "mu", "sigma", "Tp"):
        if f.get(key) is not None and len(f[key]) != n:
            raise PlanError(f"{source}: {json_path(where + [key])}: {len(f[key])} entries for a grid of {shape} "
                            f"({n} partitions)")
    if f.get("Tp") is not None and max(f["Tp"]) != f["T"]:
        raise PlanError(f"{source}: {json_path(where + ['T'])}: T={f['T']} must be the largest per-partition "
                        f"word length in Tp ({max(f['Tp'])})")


def _grid(granularity: str, dims: tuple[int, ...]) -> tuple[int, ...]:
    return {"4D": (), "3D": dims[:1], "2D": dims[:2]}[granularity]


def check_plan_graph(plan, graph, source: str = "plan.json") -> None:
    """Refuse a plan that does not fit ``graph``: a missing or extra layer or tensor entry,
    or a partition grid that does not match the weight or tensor shape."""
    nodes = {n.name: n for n in graph.nodes}
    layers = [n.name for n in graph.layers()]
    for name in layers:
        if name not in plan.layers:
            raise PlanError(f"{source}: $.layers has no entry for layer '{name}' of {plan.model} (the plan does "
                            "not belong to this model, or the entry was deleted)")
    for name in plan.layers:
        if name not in layers:
            raise PlanError(f"{source}: {json_path(['layers', name])}: the model has no conv/linear layer "
                            f"'{name}'; its layers are: {', '.join(layers)}")
    for n in graph.nodes:
        if isinstance(n, QUANT_POINTS) and plan.config.for_layer(n.name).data_bits is not None \
                and n.name not in plan.tensors:
            raise PlanError(f"{source}: $.tensors has no entry for tensor '{n.name}' (its config says "
                            f"{plan.config.for_layer(n.name).data_bits}-bit data)")
    for name, f in plan.tensors.items():
        if name not in nodes:
            raise PlanError(f"{source}: {json_path(['tensors', name])}: the model has no tensor '{name}'")
        want = _grid(f.granularity, tuple(graph.shapes.get(name, ())))
        if tuple(f.shape) != want:
            raise PlanError(f"{source}: {json_path(['tensors', name, 'shape'])}: {list(f.shape)} does not match "
                            f"the tensor's {f.granularity} grid {list(want)}")
    for name, lp in plan.layers.items():
        w = tuple(nodes[name].weight.shape)
        for part, f, dims in (("weight", lp.weight, w), ("bias", lp.bias, w[:1])):
            if f is None:
                continue
            want = _grid(f.granularity, dims)
            if tuple(f.shape) != want:
                raise PlanError(f"{source}: {json_path(['layers', name, part, 'shape'])}: {list(f.shape)} does "
                                f"not match the {f.granularity} grid {list(want)} of weight shape {list(w)}")
        if lp.acc_F is not None and len(lp.acc_F) != w[0]:
            raise PlanError(f"{source}: {json_path(['layers', name, 'acc_F'])}: {len(lp.acc_F)} entries for "
                            f"{w[0]} output channels")
        if lp.codes is not None:
            try:
                check_codes(nodes[name], lp)
            except PlanError as e:
                raise PlanError(f"{source}: {e}") from None
        if lp.kmeans is not None and len(lp.kmeans.assign) != w[0]:
            raise PlanError(f"{source}: {json_path(['layers', name, 'kmeans', 'assign'])}: "
                            f"{len(lp.kmeans.assign)} entries for {w[0]} kernels")
        if lp.kmeans is not None and lp.kmeans.data is not None:
            f = lp.kmeans.data
            want = _grid(f.granularity, tuple(graph.shapes.get(nodes[name].inputs[0], ())))
            if f.granularity == "2D" or tuple(f.shape) != want:
                raise PlanError(f"{source}: {json_path(['layers', name, 'kmeans', 'data', 'shape'])}: "
                                f"{list(f.shape)} does not match the layer input's {f.granularity} grid {list(want)}")

