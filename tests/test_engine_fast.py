"""The engine's fast exact sums (issue 17): float32/float64 products only under a bound that
makes every partial sum an exact integer, int64 otherwise; all three paths agree bit for bit."""
import pytest
import torch
import torch.nn.functional as Fn

from fixq.backends.exact_sums import EXACT, EXACT32, product_sum, sum_dtype, sums_of_products
from fixq.numerics.formats import round_shift, round_shift_int
from fixq.graph.ir import Conv, Linear

F32, F64 = (torch.float32,), (torch.float64,)


def _conv(groups=1, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
    return Conv("c", ("x",), stride=stride, padding=padding, dilation=dilation, groups=groups)


CASES = [(_conv(), 8, 8), (_conv(stride=(2, 2)), 8, 8), (_conv(dilation=(2, 2), padding=(2, 2)), 8, 8),
         (_conv(groups=2), 8, 8), (_conv(groups=8), 8, 8), (_conv(padding=(0, 1)), 8, 8)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_float_paths_equal_int64(case):
    n, C, N = CASES[case]
    g = torch.Generator().manual_seed(case)
    x = torch.randint(-128, 128, (3, C, 9, 7), generator=g)
    w = torch.randint(-128, 128, (N, C // n.groups, 3, 3), generator=g)
    wshift = torch.randint(0, 4, (N, C // n.groups), generator=g)
    ref = product_sum(w, wshift, n, x, allowed=())  # int64 windows + int64 matmul (the definition)
    for allowed in (F64, F32):
        # the bound decides: float32 only below 2**24 (here it is, at 8-bit codes and shifts < 4)
        assert torch.equal(product_sum(w, wshift, n, x, allowed=allowed), ref), allowed


def test_linear_paths_equal_int64():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (5, 40), generator=g)
    w = torch.randint(-128, 128, (6, 40, 1, 1), generator=g)
    wshift = torch.randint(0, 3, (6, 40), generator=g)
    n = Linear("l", ("x",))
    ref = product_sum(w, wshift, n, x, allowed=())
    assert torch.equal(product_sum(w, wshift, n, x, allowed=F32), ref)
    assert torch.equal(product_sum(w, wshift, n, x, allowed=F64), ref)


def test_wide_sums_leave_float32():
    """Above 2**24 float32 would round: the bound must send the sum to float64 or int64."""
    n = _conv(padding=(0, 0))
    x = torch.full((1, 4, 3, 3), 2 ** 15 - 1)
    w = torch.full((1, 4, 3, 3), 2 ** 15 - 1)
    w[0, 0, 0, 0] = 2 ** 15 - 2
    wshift = torch.zeros(1, 4, dtype=torch.int64)
    exact = int((x[0] * w[0]).sum())
    assert exact >= EXACT32
    rounded = Fn.conv2d(x.float(), w.float()).long()  # what float32 would give: wrong in the last bits
    assert int(rounded) != exact
    assert int(product_sum(w, wshift, n, x)) == exact                         # default: float64 chosen
    assert int(product_sum(w, wshift, n, x, allowed=F32)) == exact            # float32 refused: int64
    x1, w1 = torch.ones(1, 1, 1, 3, dtype=torch.int64), torch.tensor([[[[2 ** 24 - 1, 1, 1]]]])
    n1 = _conv(padding=(0, 0))
    assert Fn.conv2d(x1.float(), w1.float()).long().item() != 2 ** 24 + 1  # float32 cannot hold it
    assert int(product_sum(w1, torch.zeros(1, 1, dtype=torch.int64), n1, x1)) == 2 ** 24 + 1  # just above: float64
    big = torch.full((1, 1, 1, 1), 2 ** 40)
    assert int(product_sum(big, torch.zeros(1, 1, dtype=torch.int64), _conv(padding=(0, 0)),
                    torch.full((1, 1, 1, 1), 2 ** 14 + 1))) == 2 ** 40 * (2 ** 14 + 1)  # >= 2**53: int64


def test_sum_dtype_limits():
    assert sum_dtype(EXACT32 - 1) == torch.float32
    assert sum_dtype(EXACT32) == torch.float64
    assert sum_dtype(EXACT - 1) == torch.float64
    assert sum_dtype(EXACT) is None
    assert sum_dtype(10, allowed=F64) == torch.float64


def test_common_shift_taken_out_exactly():
    """``m = min_j wshift`` is applied after the sum: large uniform shifts keep float32."""
    n = _conv()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, 4, 5, 5), generator=g)
    w = torch.randint(-128, 128, (3, 4, 3, 3), generator=g)
    wshift = torch.full((3, 4), 40, dtype=torch.int64)
    wshift[1, 2] = 41
    ref = product_sum(w, wshift, n, x, allowed=())
    assert torch.equal(product_sum(w, wshift, n, x, allowed=F32), ref)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_nnpack_and_reduced_precision_are_refused():
    """Backends that do not compute plain sums of products (Winograd/FFT in NNPACK, TF32/BF16
    oneDNN) are never used for the exact sums."""
    n = _conv()
    x, w = torch.zeros(16, 8, 8, 8), torch.zeros(8, 8, 3, 3)
    with torch.backends.nnpack.flags(enabled=True):
        b = torch._C._select_conv_backend(x, w, None, n.stride, n.padding, n.dilation, False, (0, 0), 1, None)
        if b == torch._C._ConvBackend.NnpackSpatial:
            assert not sums_of_products(x, w, n)
    with torch.backends.mkldnn.flags(enabled=True), torch.backends.nnpack.flags(enabled=False):
        b = torch._C._select_conv_backend(x, w, None, n.stride, n.padding, n.dilation, False, (0, 0), 1, None)
        if b != torch._C._ConvBackend.Mkldnn:
            pytest.skip(f"oneDNN not selected here ({b})")
        assert sums_of_products(x, w, n)
        old = torch.backends.mkldnn.conv.fp32_precision
        try:
            torch.backends.mkldnn.conv.fp32_precision = "tf32"
            assert not sums_of_products(x, w, n)
        finally:
            torch.backends.mkldnn.conv.fp32_precision = old


@pytest.mark.parametrize("rounding", ["half_up", "floor", "nearest_even"])
def test_round_shift_fast_paths_match_python_integers(rounding):
    """One-sided shift tables take the fast path (in place or not); mixed ones the general one."""
    g = torch.Generator().manual_seed(5)
    a = torch.cat([torch.randint(-2 ** 40, 2 ** 40, (4, 50), generator=g),
                   torch.tensor([[2 ** 63 - 1, -2 ** 63] * 25] * 4)], dim=1)
    for s in (torch.tensor([1, 2, 7, 62]), torch.tensor([0, -1, -2, 0]), torch.zeros(4, dtype=torch.int64),
              torch.tensor([3, 0, -1, 5])):
        s2 = s[:, None]
        small = a.clone() if bool((s > 0).all()) else (a >> 20)  # left shifts: stay in range
        want = [[round_shift_int(int(v), int(k), rounding) for v in row] for row, k in zip(small.tolist(), s.tolist())]
        assert round_shift(small, s2, rounding).tolist() == want, (rounding, s)
        inp = small.clone()
        assert round_shift(inp, s2, rounding, inplace=True).tolist() == want, (rounding, s)
    big = torch.tensor([[2 ** 61, -2 ** 61 + 3], [2 ** 62 - 1, -2 ** 62]])  # mixed signs near the int64 edge
    s2 = torch.tensor([[-1], [3]])
    want = [[round_shift_int(int(v), int(k), rounding) for v in row] for row, k in zip(big.tolist(), [-1, 3])]
    assert round_shift(big, s2, rounding).tolist() == want
