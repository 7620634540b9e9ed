"""The integer engine equals the float64 simulation bit for bit (outputs and saturation
events) on every captured model; errors for what it cannot run."""
import itertools

import pytest
import torch

from fixq.backends.engine import Engine, EngineError
from fixq.backends.exact_sums import exact_matmul, pool_out_size
from fixq.backends.simulate import Simulator
from fixq.data.zoo import CifarResNet, LeNet, build_model

from conftest import set_bn_stats
from helpers import DepthwiseNet, make_graph, plan_for
from test_capture import MODELS

FULL = list(itertools.product(["4D", "3D", "2D"], ["4D", "3D"], [8, 4], [32, 24, 16]))
# big models: a covering set in which every value of every factor appears
COVER = [("4D", "4D", 8, 32), ("3D", "3D", 4, 24), ("2D", "4D", 8, 16), ("2D", "3D", 4, 32)]
# the largest nets (100M+ classifier weights, 100+ layers) get one distinct config each to
# keep CI short; the small nets above run the full matrix
HEAVY = {"vgg19": [COVER[0]], "vgg19_bn": [COVER[1]], "alexnet": [COVER[2]], "resnet101": [COVER[3]],
         "resnet152": [("3D", "4D", 8, 24)]}


def _nonzero(sat):
    return {k: {w: c for w, c in v.items() if c} for k, v in sat.items() if any(v.values())}


def assert_parity(g, shape, cm, dm, bits, A, n=4, scale=1.5, rounding="half_up"):
    plan = plan_for(g, shape, n=8, coeff_mode=cm, data_mode=dm, coeff_bits=bits, acc_bits=A, rounding=rounding)
    torch.manual_seed(7)
    x = torch.randn(n, *shape) * scale  # beyond the calibration range: saturations happen
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    ys = sim(x)
    codes = eng.run(eng.quantize_input(x))
    assert torch.equal(eng.dequantize(codes), ys)
    assert _nonzero(sim.saturations()) == _nonzero(eng.saturations())
    return eng


@pytest.mark.parametrize("cm,dm,bits,A", FULL)
@pytest.mark.parametrize("net,shape", [(DepthwiseNet, (3, 16, 16)), (CifarResNet, (3, 32, 32)), (LeNet, (1, 8, 8))])
def test_engine_equals_exact_sim_small_models(net, shape, cm, dm, bits, A):
    assert_parity(make_graph(net() if net is not LeNet else LeNet(8), shape), shape, cm, dm, bits, A)


@pytest.mark.parametrize("rounding", ["nearest_even", "floor"])
def test_engine_parity_other_roundings(rounding):
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    assert_parity(g, (3, 16, 16), "2D", "3D", 8, 16, rounding=rounding)


@pytest.mark.parametrize("name,hw", [m for m in MODELS if not m[0].startswith("cifar10-resnet")
                                      or m[0] == "cifar10-resnet56"])
def test_engine_equals_exact_sim_zoo(name, hw):
    torch.manual_seed(0)
    model, entry = build_model(name)
    c = 1 if entry.preprocess == "digits" else 3
    if name != "lenet-digits":
        set_bn_stats(model, torch.randn(8, c, hw, hw))
    from fixq.graph.capture import capture
    g = capture(model, torch.randn(2, c, hw, hw))
    for cm, dm, bits, A in HEAVY.get(name, COVER):
        assert_parity(g, (c, hw, hw), cm, dm, bits, A, n=2)


def test_engine_parity_efficientnet_lite0_pretrained():
    pytest.importorskip("efficientnet_lite_pytorch")
    from fixq.graph.capture import capture
    model, _ = build_model("efficientnet-lite0")
    g = capture(model, torch.randn(1, 3, 224, 224))
    for cm, dm, bits, A in COVER[:2]:
        assert_parity(g, (3, 224, 224), cm, dm, bits, A, n=1)


def test_accumulator_saturates_in_engine_and_sim_alike():
    g = make_graph(CifarResNet(20), (3, 32, 32))
    eng = assert_parity(g, (3, 32, 32), "2D", "4D", 8, 16, scale=3.0)
    assert sum(v.get("acc", 0) for v in eng.saturations().values()) > 0


def test_trace_gives_every_layer():
    g = make_graph(LeNet(8), (1, 8, 8))
    eng = Engine(g, plan_for(g, (1, 8, 8)))
    env = eng.run(eng.quantize_input(torch.randn(2, 1, 8, 8)), keep=True)
    assert {n.name for n in g.nodes} <= set(env) and all(v.dtype == torch.int64 for v in env.values())


def test_engine_refuses_affine_flp_and_float_ops():
    g = make_graph(LeNet(8), (1, 8, 8))
    with pytest.raises(EngineError, match="affine"):
        Engine(g, plan_for(g, (1, 8, 8), method="affine"))
    with pytest.raises(EngineError, match="floating point"):
        Engine(g, plan_for(g, (1, 8, 8), data_bits=None))

    class Sig(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return torch.softmax(self.c(x), dim=1)
    gs = make_graph(Sig(), (1, 8, 8))
    with pytest.raises(EngineError, match="node 'softmax'.*no integer rule") as e:
        Engine(gs, plan_for(gs, (1, 8, 8)))
    assert "power-of-two" not in str(e.value) and e.value.hint == ""  # the cause is the op, not the formats


def test_exact_matmul_paths_agree():
    torch.manual_seed(0)
    a = torch.randint(-2 ** 20, 2 ** 20, (5, 300))
    b = torch.randint(-2 ** 20, 2 ** 20, (300, 7))  # bound > 2**53: the int64 path
    assert torch.equal(exact_matmul(a, b), a @ b)
    a8, b8 = a % 256 - 128, b % 256 - 128
    assert torch.equal(exact_matmul(a8, b8), a8 @ b8)
    with pytest.raises(EngineError, match="overflows"):
        exact_matmul(torch.full((2, 4), 2 ** 31), torch.full((4, 2), 2 ** 31))


@pytest.mark.parametrize("n,k,s,p,ceil", [(7, 3, 2, 0, True), (8, 3, 2, 1, True), (112, 3, 2, 0, True),
                                         (5, 2, 2, 0, False), (6, 3, 3, 1, True)])
def test_pool_out_size_matches_torch(n, k, s, p, ceil):
    y = torch.nn.functional.max_pool2d(torch.zeros(1, 1, n, n), k, s, p, ceil_mode=ceil)
    assert pool_out_size(n, k, s, p, 1, ceil) == y.shape[-1]
