import pytest
import torch
from hypothesis import given, strategies as st

from fixq.numerics.ranges import (F_from_histogram, F_from_maxabs, F_from_percentile_rows, affine_params, affine_quantize,
                                  ceil_log2, exponent_histogram, parse_method)
from fixq.algorithms.coeff_formats import weight_formats


@given(st.floats(1e-30, 1e30))
def test_ceil_log2_exact(m):
    import math
    e = int(ceil_log2(torch.tensor([m], dtype=torch.float64)))
    assert 2.0 ** (e - 1) < m <= 2.0 ** e
    assert e == math.ceil(math.log2(m)) or abs(math.log2(m) - round(math.log2(m))) < 1e-12


def test_maxabs_paper_rule():
    # I = ceil(log2(max|x|)), F = T-1-I ; zero partition -> F = T-1
    F = F_from_maxabs(torch.tensor([3.0, 1.0, 0.2, 0.0, 100.0]), 8)
    assert F.tolist() == [5, 7, 9, 7, 0]


def test_percentile_ignores_outliers_and_matches_quantile():
    x = torch.cat([torch.linspace(-1, 1, 9999), torch.tensor([50.0])]).double()
    h = exponent_histogram(x, None, 1)
    assert int(F_from_histogram(h, 8, 100.0)) == int(F_from_maxabs(x.abs().max().reshape(1), 8))
    assert int(F_from_histogram(h, 8, 99.9)) == 7  # |x| <= 1 covers 99.99%
    # percentile F equals the maxabs rule applied to the lower p-quantile
    for p in (50.0, 90.0, 99.0):
        q = torch.quantile(x.abs(), p / 100, interpolation="lower")
        assert int(F_from_histogram(h, 8, p)) == int(F_from_maxabs(q.reshape(1), 8))


def test_all_zero_and_constant_tensors():
    z = torch.zeros(4, 3, 3, 3)
    for m in ("maxabs", "percentile:99.9", "mse"):
        f = weight_formats(z, 8, "3D", m)
        assert f.F == (7, 7, 7, 7)
    c = torch.full((2, 3, 3, 3), 0.75)
    for m in ("maxabs", "percentile:99.9", "mse"):
        assert weight_formats(c, 8, "4D", m).F == (7,)
    a = weight_formats(c, 8, "4D", "affine")
    y = affine_quantize(c.double(), torch.tensor(a.mu), torch.tensor(a.sigma), 8)
    assert torch.allclose(y, c.double())


def test_mse_never_worse_than_maxabs():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    w[0, 0, 0, 0] = 12.0  # outlier
    fm, fe = weight_formats(w, 4, "3D", "maxabs"), weight_formats(w, 4, "3D", "mse")
    from fixq.numerics.formats import fake_quantize
    for i in range(8):
        e_m = ((fake_quantize(w[i].double(), fm.F[i], 4)[0] - w[i]) ** 2).sum()
        e_e = ((fake_quantize(w[i].double(), fe.F[i], 4)[0] - w[i]) ** 2).sum()
        assert e_e <= e_m + 1e-12
        assert fm.F[i] <= fe.F[i] <= fm.F[i] + 4


def test_affine_params_paper_eq5():
    mu, sigma = affine_params(torch.tensor([-1.0]), torch.tensor([3.0]), 8)
    assert float(mu) == 1.0 and float(sigma) == pytest.approx(2.0 * 2 ** -7)


def test_parse_method_errors():
    assert str(parse_method("percentile:99.99")) == "percentile:99.99"
    for bad in ("minmax", "percentile:0", "percentile:101", "percentile:x"):
        with pytest.raises(ValueError):
            parse_method(bad)


@pytest.mark.parametrize("n", [1, 2, 9, 25, 129, 130, 300])
@pytest.mark.parametrize("p", [0.0, 10.0, 50.0, 90.0, 99.0, 99.99, 100.0])
def test_percentile_rows_equal_the_histogram_rule(n, p):
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(64, n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 8, (64, 1), generator=g))
    rows[0] = 0.0                                   # all-zero partition
    rows[1, : max(1, n // 2)] = 0.0                 # half zeros: the zero bin can win at low p
    rows[2] = torch.exp2(torch.randint(-3, 3, (n,), generator=g)).double()  # exact powers of two
    rows[3, 0] = 1e30                               # beyond EXP_HI: clamped bin
    groups = torch.arange(64).unsqueeze(1).expand_as(rows)
    want = F_from_histogram(exponent_histogram(rows, groups, 64), 8, p)
    assert torch.equal(F_from_percentile_rows(rows, 8, p), want)
