"""Reading plan.json: validated against the schema (:mod:`fixq.planning.plan_schema`), then
built into a :class:`~fixq.planning.plan.QuantPlan` (writing is ``QuantPlan.save``). A file
that is not a valid plan raises PlanError naming the file and the JSON path.

>>> plan.save("plan.json"); load_plan("plan.json").to_json() == plan.to_json()   # doctest: +SKIP
True
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .plan import AffineFormats, Formats, KMeansPlan, LayerCodes, LayerPlan, PlanError, QuantConfig, QuantPlan
from .plan_schema import validate_plan_json

__all__ = ["load_plan", "plan_from_json"]


def plan_from_json(d: dict, source: str = "plan") -> QuantPlan:
    """Build a plan from parsed JSON, validated first (:func:`validate_plan_json`)."""
    validate_plan_json(d, source)
    layers = {}
    try:
        for k, v in d["layers"].items():
            layers[k] = LayerPlan(v["name"], _fmt_load(v["weight"]), _fmt_load(v["bias"]), v["acc_bits"],
                                  None if v["acc_F"] is None else tuple(v["acc_F"]), v["acc_overflow"],
                                  tuple(v.get("notes", ())),
                                  None if v.get("acc_I") is None else tuple(v["acc_I"]),
                                  _kmeans_load(v.get("kmeans")), _codes_load(v.get("codes")))
        config = QuantConfig.from_json(d["config"])
    except PlanError as e:
        raise PlanError(f"{source}: {e}") from None
    return QuantPlan(d["model"], config, {k: _fmt_load(v) for k, v in d["tensors"].items()}, layers,
                     tuple(d.get("float_ops", ())), tuple(d.get("notes", ())))


def load_plan(path: str | Path) -> QuantPlan:
    """Read and validate a plan.json."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {path} does not exist")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path} is not a fixq plan: not JSON ({e})") from None
    return plan_from_json(d, str(path))


def _fmt_load(d):
    if d is None:
        return None
    d = dict(d)
    kind = d.pop("kind", "pow2")
    cls = AffineFormats if kind == "affine" else Formats
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise PlanError(f"format keys {sorted(unknown)} are not supported by this fixq version")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _codes_load(d):
    if d is None:
        return None
    return LayerCodes(str(d["digest"]), d.get("up"), None if d.get("bias") is None else tuple(int(x) for x in d["bias"]))


def _kmeans_load(d):
    if d is None:
        return None
    return KMeansPlan(int(d["K"]), tuple(d["assign"]), _fmt_load(d["basis"]), tuple(d["basis_codes"]),
                      int(d.get("seed", 0)), _fmt_load(d.get("data")))
