"""Capture equivalence: the captured graph's float output equals the model's."""
import pytest
import torch
import torch.nn as nn

from fixq.graph.capture import CaptureError, UnsupportedOpError, capture
from fixq.graph.ir import Add, Clamp, Conv, FloatOp, Pad, Slice, run_float
from fixq.data.zoo import CifarResNet, LeNet, build_model, load_weights

from conftest import set_bn_stats
from shared_data import resnet_weights

MODELS = [  # (zoo name, input H=W); small inputs keep CI fast
    ("alexnet", 64), ("vgg19", 32), ("vgg19_bn", 32), ("googlenet", 64), ("resnet18", 64),
    ("resnet50", 64), ("resnet101", 64), ("resnet152", 64), ("mobilenet_v2", 64),
    ("cifar10-resnet20", 32), ("cifar10-resnet32", 32), ("cifar10-resnet44", 32),
    ("cifar10-resnet56", 32), ("cifar10-resnet110", 32), ("lenet-digits", 8),
]


def _check(model, x):
    """float32: captured == model within 1e-4 max abs, or within 4x the model's own float32
    error vs float64 where that is larger (deep random-weight nets); float64: < 1e-9."""
    g = capture(model, x)
    with torch.no_grad():
        ref32 = model(x)
        diff32 = (run_float(g, x) - ref32).abs().max().item()
        m64 = model.double()
        ref64 = m64(x.double())
        own = (ref32.double() - ref64).abs().max().item()
        diff64 = (run_float(capture(m64, x.double(), check=False), x.double()) - ref64).abs().max().item()
        model.float()
    assert diff64 < 1e-9, diff64
    assert diff32 < max(1e-4, 4 * own), (diff32, own)
    return g


@pytest.mark.parametrize("name,hw", MODELS)
def test_capture_equivalence_zoo(name, hw):
    torch.manual_seed(0)
    model, entry = build_model(name)
    c = 1 if entry.preprocess == "digits" else 3
    x = torch.randn(2, c, hw, hw)
    if name != "lenet-digits":
        set_bn_stats(model, torch.randn(8, c, hw, hw))
    g = _check(model, x)
    assert not any(isinstance(n, FloatOp) for n in g.nodes)
    assert g.layers(), "no conv/linear layer captured"


def test_capture_efficientnet_lite0_pretrained():
    pytest.importorskip("efficientnet_lite_pytorch")
    model, _ = build_model("efficientnet-lite0")
    g = _check(model, torch.randn(1, 3, 224, 224))
    kinds = {type(n) for n in g.nodes}
    assert Pad in kinds and Add in kinds
    dw = [n for n in g.layers() if isinstance(n, Conv) and n.groups > 1]
    assert dw and all(n.weight.shape[1] == 1 for n in dw)
    assert all(n.act in (None, (0.0, 6.0)) for n in g.layers())


def test_cifar_resnet_shared_weights_option_a():
    model = load_weights(CifarResNet(20), str(resnet_weights(20)))
    g = _check(model, torch.randn(2, 3, 32, 32))
    assert sum(isinstance(n, Slice) for n in g.nodes) == 2 and sum(isinstance(n, Pad) for n in g.nodes) == 2
    # BN folded, ReLU fused: every conv carries its activation or feeds an add
    assert all(n.bias is not None for n in g.layers())


def test_bn_folded_and_relu_fused():
    torch.manual_seed(0)
    m = set_bn_stats(LeNet(8), torch.randn(16, 1, 8, 8))
    g = _check(m, torch.randn(4, 1, 8, 8))
    assert not any(isinstance(n, Clamp) for n in g.nodes)
    assert [n.act for n in g.layers()] == [(0.0, None), (0.0, None), (0.0, None), None]


def test_standalone_bn_becomes_depthwise_conv():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    set_bn_stats(m, torch.randn(8, 3, 8, 8))
    g = _check(m, torch.randn(2, 3, 8, 8))
    assert isinstance(g.nodes[-1], Conv) and g.nodes[-1].groups == 4


class _Matmul(nn.Module):
    def forward(self, x):
        return torch.matmul(x, x.transpose(2, 3))


def test_unsupported_op_names_node_and_op():
    with pytest.raises(UnsupportedOpError, match=r"node 'transpose'.*transpose.*Replace it"):
        capture(_Matmul(), torch.randn(1, 2, 4, 4))


class _Sig(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return torch.softmax(self.c(x), dim=1)


def test_float_only_op_is_marked():
    g = capture(_Sig(), torch.randn(1, 2, 4, 4))
    assert isinstance(g.nodes[-1], FloatOp) and g.nodes[-1].op == "softmax"


def test_nan_weights_name_the_layer():
    m = LeNet(8)
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CaptureError, match="conv2"):
        capture(m, torch.randn(1, 1, 8, 8))
