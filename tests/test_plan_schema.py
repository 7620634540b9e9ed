"""plan.json and --config files are validated by one declared, versioned schema and checked
against the graph: every corruption is refused with the JSON path and what was expected."""
import copy
import json

import pytest

from fixq.planning.plan_io import load_plan, plan_from_json
from fixq.errors import FixqError
from fixq.planning.plan import PLAN_VERSION, PlanError
from fixq.planning.plan_schema import (check_plan_graph, json_path, plan_schema, validate_config_json,
                                       validate_plan_json)

from helpers import DepthwiseNet, make_graph, plan_for

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def graph_plan():
    g = make_graph(DepthwiseNet(), SHAPE)
    return g, plan_for(g, SHAPE, coeff_mode="2D", data_mode="3D", n=8)


def _load(d, name="plan.json"):
    return plan_from_json(d, name)


def _err(d) -> str:
    with pytest.raises(PlanError) as e:
        _load(d)
    return str(e.value)


def test_saved_plans_validate_and_round_trip(graph_plan, tmp_path):
    g, plan = graph_plan
    plan.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    validate_plan_json(d)
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded == plan
    check_plan_graph(loaded, g)
    assert plan_schema()["properties"]["version"] == {"const": PLAN_VERSION}


@pytest.mark.parametrize("mutate,words", [
    # wrong types
    (lambda d: d["layers"]["stem"]["weight"].__setitem__("T", "8"), ["$.layers.stem.weight.T", "'8'", "integer"]),
    (lambda d: d["layers"]["stem"]["weight"]["F"].__setitem__(0, 1.5), ["$.layers.stem.weight.F[0]", "1.5", "integer"]),
    (lambda d: d["layers"].__setitem__("stem", 3), ["$.layers.stem", "object"]),
    (lambda d: d["tensors"].__setitem__("x", None), ["$.tensors.x", "object"]),
    (lambda d: d["config"]["default"].__setitem__("coeff_bits", "abc"), ["$.config.default.coeff_bits", "flp"]),
    # bits out of range
    (lambda d: d["layers"]["stem"]["weight"].__setitem__("T", 99), ["$.layers.stem.weight.T", "99", "2..32"]),
    (lambda d: d["tensors"]["x"].__setitem__("T", 1), ["$.tensors.x.T", "2..32"]),
    (lambda d: d["layers"]["fc"].__setitem__("acc_bits", 40), ["$.layers.fc.acc_bits", "40"]),
    (lambda d: d["layers"]["stem"]["bias"].__setitem__("T", 33), ["$.layers.stem.bias.T", "33"]),
    # missing / unknown keys, bad enums
    (lambda d: d["layers"]["stem"].pop("acc_F"), ["$.layers.stem", "'acc_F' is a required property"]),
    (lambda d: d.pop("tensors"), ["$", "'tensors' is a required property"]),
    (lambda d: d["layers"]["stem"]["weight"].__setitem__("t", 3), ["$.layers.stem.weight", "'t' was unexpected"]),
    (lambda d: d["layers"]["stem"]["weight"].__setitem__("granularity", "5D"), ["granularity", "4D, 3D or 2D"]),
    (lambda d: d["config"].__setitem__("rounding", "up"), ["$.config.rounding", "'up'"]),
    (lambda d: d["config"]["default"].__setitem__("method", "minmax"), ["plan.json", "unknown range method"]),
    # partition counts that cannot be right whatever the model
    (lambda d: d["layers"]["stem"]["weight"].__setitem__("F", [1, 2, 3]), ["$.layers.stem.weight.F", "3 entries"]),
    (lambda d: d["layers"]["stem"]["weight"].__setitem__("shape", [8]), ["$.layers.stem.weight.shape", "2D"]),
])
def test_corrupt_plan_names_path_and_expectation(graph_plan, mutate, words):
    d = json.loads(json.dumps(graph_plan[1].to_json()))  # as read from plan.json
    mutate(d)
    msg = _err(d)
    assert msg.startswith("plan.json")
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("version,words", [(7, ["has version 7", "reads plan version 1"]),
                                           ("1", ["has version '1'", "reads plan version 1"]),
                                           (None, ["no \"version\"", "not a fixq plan"])])
def test_unknown_version_refused_first(graph_plan, version, words):
    d = copy.deepcopy(graph_plan[1].to_json())
    d["layers"] = "garbage"  # never reached: the version is checked first
    if version is None:
        d.pop("version")
    else:
        d["version"] = version
    msg = _err(d)
    assert all(w in msg for w in words), msg


def test_not_json_and_not_an_object(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not a fixq plan: not JSON"):
        load_plan(p)
    p.write_text("[1, 2]")
    with pytest.raises(PlanError, match="expected a JSON object, got list"):
        load_plan(p)
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nothing.json")


def test_graph_check_missing_extra_and_shape(graph_plan):
    g, plan = graph_plan
    d = plan.to_json()

    def check(mutate):
        dd = copy.deepcopy(d)
        mutate(dd)
        with pytest.raises(PlanError) as e:
            check_plan_graph(_load(dd), g, "p.json")
        return str(e.value)

    assert "no entry for tensor 'dw'" in check(lambda x: x["tensors"].pop("dw"))
    assert "no entry for layer 'pw'" in check(lambda x: x["layers"].pop("pw"))
    assert "no conv/linear layer 'ghost'" in check(lambda x: x["layers"].__setitem__("ghost", x["layers"]["pw"]))
    assert "the model has no tensor 'ghost'" in check(lambda x: x["tensors"].__setitem__("ghost", x["tensors"]["x"]))
    # a 3D data format with one F per channel of a different tensor
    msg = check(lambda x: x["tensors"].__setitem__("fc", x["tensors"]["stem"]))
    assert "$.tensors.fc.shape" in msg and "does not match" in msg
    msg = check(lambda x: x["layers"]["pw"].__setitem__("weight", x["layers"]["stem"]["weight"]))
    assert "$.layers.pw.weight.shape" in msg and "weight shape" in msg


def test_future_fields_in_schema():
    """Fields landing in parallel (unsigned formats, data_sign) are part of the schema."""
    validate_config_json({"conv1": {"data_sign": "signed", "coeff_bits": "flp"}}, "c.yaml")
    with pytest.raises(PlanError, match=r"\$\.conv1\.data_sign"):
        validate_config_json({"conv1": {"data_sign": "unsigned-ish"}}, "c.yaml")
    pow2 = plan_schema()["$defs"]["pow2"]["properties"]
    assert pow2["signed"]["type"] == "boolean"


def test_config_schema_errors():
    with pytest.raises(PlanError, match=r"\$\.conv1\.coeff_bits: 99 is greater"):
        validate_config_json({"conv1": {"coeff_bits": 99}}, "c.yaml")
    with pytest.raises(PlanError, match="'coef_bits' was unexpected"):
        validate_config_json({"conv1": {"coef_bits": 4}}, "c.yaml")
    with pytest.raises(PlanError, match=r"\$\.conv1: 4 is not"):
        validate_config_json({"conv1": 4}, "c.yaml")


def test_errors_share_one_base():
    from fixq.algorithms.calibrate import CalibrationError
    from fixq.app.parser import UsageError
    from fixq.backends.engine import EngineError
    from fixq.analysis.evaluate import DataError
    from fixq.graph.capture import CaptureError, UnsupportedOpError
    from fixq.app.html_report import ReportError
    from fixq.algorithms.kmeans import KMeansError
    from fixq.algorithms.mixed import MixedError
    from fixq.data.onnx_in import OnnxImportError
    from fixq.backends.onnx_out import QDQError
    from fixq.algorithms.search import SearchError
    from fixq.data.zoo import ModelError
    for cls in (PlanError, ModelError, DataError, CaptureError, UnsupportedOpError, CalibrationError, EngineError,
                MixedError, KMeansError, SearchError, OnnxImportError, QDQError, ReportError, UsageError):
        assert issubclass(cls, FixqError) and issubclass(cls, ValueError), cls


def test_json_path_quotes_dotted_names():
    assert json_path(["layers", "layer3.0.conv1", "weight", "F", 2]) == "$.layers['layer3.0.conv1'].weight.F[2]"


def test_kmeans_and_mixed_plans_fit_their_graph(graph_plan, tmp_path):
    import torch
    from fixq.algorithms.calibrate import observe, plan_from
    from fixq.algorithms.kmeans import cluster_kernels
    from fixq.planning.plan import LayerConfig, QuantConfig
    g, _ = graph_plan
    obs = observe(g, [(torch.randn(8, *SHAPE), None)], show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_mode="2D"))
    bits = torch.full(tuple(g.node("stem").weight.shape[:2]), 8)
    bits[0, 0] = 4
    for i, plan in enumerate([plan_from(obs, cfg, "t", kmeans={"pw": cluster_kernels(g.node("pw").weight, 3)}),
                              plan_from(obs, cfg, "t", filter_bits={"stem": bits})]):
        plan.save(tmp_path / f"p{i}.json")
        loaded = load_plan(tmp_path / f"p{i}.json")
        check_plan_graph(loaded, g)
        assert loaded == plan
    d = json.loads((tmp_path / "p0.json").read_text())
    d["layers"]["pw"]["kmeans"]["assign"] = d["layers"]["pw"]["kmeans"]["assign"][:-1]
    with pytest.raises(PlanError, match=r"\$\.layers\.pw\.kmeans\.assign: 7 entries for 8 kernels"):
        check_plan_graph(_load(d), g)


def test_fields_added_to_the_dataclasses_extend_the_schema():
    """A field another change adds to a plan dataclass is accepted without editing the schema."""
    from fixq.planning.plan_schema import _from_annotation
    assert _from_annotation("tuple[int, ...] | None") == {}
    assert _from_annotation("int | None") == {"type": ["integer", "null"]}
    assert _from_annotation("bool") == {"type": ["boolean"]}
