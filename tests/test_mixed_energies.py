"""Filter energies and the order in which ``fixq mixed`` takes 2D filters low (DESIGN §8):
``E = w^T R w`` and the noise energy ``dW^T R dW`` against brute force, and ``--order noise|energy``
deciding every trial's low filters."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.algorithms.mixed import energies_from_grams, filter_energies, filter_grams
from fixq.planning.plan import QuantConfig

from helpers import make_graph


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(Fn.relu(self.b(Fn.relu(self.a(x)))), 1))


def brute_energy(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Every partial map y_ij = F_ij * x_j materialised, squared and summed."""
    N, Mg = conv.weight.shape[:2]
    E = torch.zeros(N, Mg, dtype=torch.float64)
    ng = N // conv.groups
    for i in range(N):
        for j in range(Mg):
            xj = x[:, (i // ng) * Mg + j:(i // ng) * Mg + j + 1].double()
            y = Fn.conv2d(xj, conv.weight[i:i + 1, j:j + 1].double(), None, conv.stride, conv.padding, conv.dilation)
            E[i, j] = (y * y).sum()
    return E


def test_energies_equal_brute_force():
    torch.manual_seed(0)
    m = Small().eval()
    g = make_graph(m, (4, 8, 8))
    x = torch.randn(5, 4, 8, 8)
    E = filter_energies(g, [x[:3], (x[3:], None)], show_progress=False)
    with torch.no_grad():
        h = Fn.relu(m.a(x))
        flat = torch.flatten(Fn.relu(m.b(h)), 1)
    torch.testing.assert_close(E["a"], brute_energy(m.a, x), rtol=1e-9, atol=0)
    torch.testing.assert_close(E["b"], brute_energy(m.b, h), rtol=1e-6, atol=1e-9)
    want_fc = (m.fc.weight.detach().double() ** 2) * (flat.double() ** 2).sum(dim=0)
    torch.testing.assert_close(E["fc"], want_fc, rtol=1e-6, atol=1e-9)


def test_noise_energy_of_a_coefficient_change_equals_brute_force():
    """``energies_from_grams`` with a weight change dW: the energy of dW's partial maps (the noise a
    filter's low-bit codes add, --order noise); layers without a change keep their own energy."""
    torch.manual_seed(0)
    m = Small().eval()
    g = make_graph(m, (4, 8, 8))
    x = torch.randn(5, 4, 8, 8)
    grams = filter_grams(g, [x], show_progress=False)
    change = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    with torch.no_grad():
        change.weight.copy_(torch.randn_like(m.a.weight) * 1e-2)
    N = energies_from_grams(g, grams, {"a": change.weight.detach()})
    torch.testing.assert_close(N["a"], brute_energy(change, x), rtol=1e-9, atol=0)
    assert torch.equal(N["b"], energies_from_grams(g, grams)["b"])
    assert not torch.allclose(N["a"], energies_from_grams(g, grams)["a"])


@pytest.mark.parametrize("order", ["noise", "energy"])
def test_order_noise_takes_the_filters_that_add_least_noise_first(order, digits_dir, monkeypatch):
    """--order noise (the default): every trial's low filters are chosen on each 2D
    filter's noise energy ``dW^T R dW``, dW the change from the all-base plan's coefficients to the
    all-low plan's (the learned bank's codes included), so the tuned plan's low filters add less
    noise than its base ones. --order energy with the same learned codes: the filters' energies."""
    from fixq.algorithms import mixed_search
    from fixq.algorithms.learned import RoundingOptions
    from fixq.algorithms.pipeline import open_session
    from fixq.planning.coeffs import layer_values
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=48, eval_size=120, batch_size=32,
                     workers=0, show_progress=False)
    keys, orig = [], mixed_search.filter_bits
    monkeypatch.setattr(mixed_search, "filter_bits", lambda E, f, *a: (keys.append(E), orig(E, f, *a))[1])
    opts = mixed_search.MixedOptions(low_bits=2, exclude="none", trials=4, target_drop=5.0, strategies=("global",),
                                     order=order)
    res = mixed_search.search_mixed(s, QuantConfig(), opts, RoundingOptions(iters=30, samples=2048, batch=256))
    assert res.order == order and mixed_search.MixedOptions().order == "noise"
    g, lo, hi = s.graph, res.aggressive.plan, res.conservative.plan
    assert any(lp.codes is not None for lp in lo.layers.values())  # bank codes are part of dW
    cal = s.calib_stream  # the probe: the first calibration images
    grams = filter_grams(g, cal.subset(range(min(opts.probe_size, len(cal))), batch_size=32), show_progress=False)
    dW = {k: layer_values(g.node(k), lo.layers[k], lo.rounding) - layer_values(g.node(k), hi.layers[k], hi.rounding)
          for k in keys[0]}
    N, E = energies_from_grams(g, grams, dW), energies_from_grams(g, grams)
    want = N if res.order == "noise" else E
    assert keys and all(set(k) == set(want) for k in keys)
    for k in want:
        assert all(torch.equal(key[k], keys[0][k]) for key in keys)
        torch.testing.assert_close(keys[0][k], want[k], rtol=1e-9, atol=0)
    assert any(not torch.equal(torch.argsort(N[k].flatten(), stable=True), torch.argsort(E[k].flatten(), stable=True))
               for k in N)  # the two orders differ here
    partly = 0
    for k, lp in res.tuned.plan.layers.items():
        low = lp.weight.bits().reshape(want[k].shape) < 8 if k in want else None
        if low is not None and low.any() and (~low).any():
            assert want[k][low].max() <= want[k][~low].min()
            partly += 1
    assert partly >= 1  # some layer is partly low: the order decided which filters
