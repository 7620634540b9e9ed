import pytest
import torch
import torch.nn as nn

from fixq.analysis.complexity import analyze, mac_cost
from fixq.graph.capture import capture
from fixq.data.zoo import build_model

from helpers import make_graph, plan_for


def _graph(name, hw=224):
    model, _ = build_model(name)
    return capture(model, torch.zeros(1, 3, hw, hw), check=False)


def test_table1_alexnet_conv2():
    g = _graph("alexnet")
    layer = next(c for c in analyze(g).layers if c.name == "features.3")
    assert (layer.N, layer.M, layer.H, layer.W, layer.P) == (192, 64, 5, 5, 27 * 27)
    assert layer.macs == 223_948_800
    mm = layer.macs / 1e6
    assert round(mm * mac_cost(8, 8)) == 224 and round(mm * mac_cost(4, 8)) == 112
    assert round(mm * mac_cost(4, 4)) == 56 and round(mm * mac_cost(None, None)) == 2016


@pytest.mark.parametrize("name,published_gmacs", [
    ("alexnet", 0.714), ("vgg19", 19.63), ("resnet50", 4.09), ("resnet18", 1.814), ("mobilenet_v2", 0.300),
])
def test_network_macs_match_published(name, published_gmacs):
    total = analyze(_graph(name)).macs / 1e9
    assert abs(total - published_gmacs) / published_gmacs < 0.01


def test_mixed_format_complexity_is_sum_over_filters():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    g = capture(nn.Sequential(conv), torch.zeros(1, 2, 4, 4))
    plan = plan_for(g, (2, 4, 4), n=4)
    bits = torch.tensor([[8, 4], [4, 4], [8, 8]])
    c = analyze(g, plan, coeff_bits={"0": bits}).layers[0]
    # by hand: P*H*W = 16*9 = 144 MACs per 2D filter; <8,8>=1, <4,8>=0.5
    assert c.macs == 144 * 6
    assert c.rel_complexity_mmacs * 1e6 == pytest.approx(144 * (1 + .5 + .5 + .5 + 1 + 1))
    assert c.coeff_storage_bits == 9 * int(bits.sum())


def test_storage_counts_descriptor_overhead():
    g = make_graph(nn.Sequential(nn.Conv2d(4, 6, 3)), (4, 8, 8))
    sizes = {}
    for mode in ("4D", "3D", "2D"):
        c = analyze(g, plan_for(g, (4, 8, 8), coeff_mode=mode)).layers[0]
        assert c.coeff_storage_bits == 6 * 4 * 9 * 8 and c.bias_storage_bits == 6 * 8
        sizes[mode] = c.descriptor_bits
    assert sizes == {"4D": 8 + 6 * 8, "3D": 6 * 8 + 6 * 8, "2D": 24 * 8 + 6 * 8}


def test_float_and_flp_costs():
    g = make_graph(nn.Sequential(nn.Conv2d(4, 6, 3)), (4, 8, 8))
    f = analyze(g).layers[0]
    assert f.rel_complexity_mmacs == pytest.approx(9 * f.macs / 1e6)
    c = analyze(g, plan_for(g, (4, 8, 8), data_bits=None)).layers[0]
    assert c.rel_complexity_mmacs == pytest.approx(3 * c.macs / 1e6)
