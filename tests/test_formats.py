import math

import pytest
import torch
from hypothesis import given, strategies as st

from fixq.numerics.formats import (QFormat, fake_quantize, quantize_codes, quantize_scalar, round_div, round_shift,
                                   round_shift_int, round_values, saturate)

ROUND = st.sampled_from(["half_up", "nearest_even", "floor"])
T_ = st.integers(2, 32)
F_ = st.integers(-8, 40)
floats = st.floats(-1e6, 1e6, allow_nan=False, width=64)


def test_qformat_derived():
    q = QFormat(8, 5)
    assert (q.I, q.qmin, q.qmax, q.step) == (2, -128, 127, 2 ** -5)
    assert QFormat(4, -2).step == 4.0 and QFormat(8, 10).I == -3
    for bad in (1, 33, 8.0, True):
        with pytest.raises(ValueError):
            QFormat(bad, 0)


@given(floats, T_, F_, ROUND)
def test_quantize_idempotent(x, T, F, r):
    once, _ = fake_quantize(torch.tensor([x], dtype=torch.float64), F, T, r)
    twice, ev = fake_quantize(once, F, T, r)
    assert torch.equal(once, twice) and int(ev) == 0


@given(floats, T_, F_, ROUND)
def test_error_at_most_half_step_inside_range(x, T, F, r):
    q = QFormat(T, F)
    xt = torch.tensor([x], dtype=torch.float64)
    y, ev = fake_quantize(xt, F, T, r)
    if q.min_value <= x <= q.max_value:
        bound = q.step if r == "floor" else q.step / 2
        assert abs(float(y) - x) <= bound
        assert int(ev) == 0
    assert q.min_value <= float(y) <= q.max_value


@given(T_, F_, st.floats(1.0, 1e6), ROUND)
def test_beyond_range_saturates_exactly(T, F, k, r):
    q = QFormat(T, F)
    big = torch.tensor([q.max_value + k * q.step + q.step, q.min_value - k * q.step - q.step], dtype=torch.float64)
    codes, ev = quantize_codes(big, F, T, r)
    assert codes.tolist() == [q.qmax, q.qmin] and int(ev) == 2


@given(st.integers(-2 ** 40, 2 ** 40), st.integers(-10, 30), ROUND)
def test_integer_shift_equals_float_formula(a, s, r):
    want = round_values(torch.tensor([a * 2.0 ** -s], dtype=torch.float64), r)
    got = round_shift(torch.tensor([a]), s, r)
    assert int(got) == int(want) == round_shift_int(a, s, r)


def test_round_shift_per_partition_and_modes():
    a = torch.tensor([5, -5, 6, -6, 7])
    assert round_shift(a, 1, "half_up").tolist() == [3, -2, 3, -3, 4]
    assert round_shift(a, 1, "nearest_even").tolist() == [2, -2, 3, -3, 4]
    assert round_shift(a, 1, "floor").tolist() == [2, -3, 3, -3, 3]
    assert round_shift(a, torch.tensor([1, 0, -1, 2, 1]), "half_up").tolist() == [3, -5, 12, -1, 4]


@given(st.integers(-2 ** 40, 2 ** 40), st.integers(1, 10_000), ROUND)
def test_round_div_matches_exact_rounding(n, d, r):
    from fractions import Fraction
    fr = Fraction(n, d)
    want = {"floor": math.floor(fr), "half_up": math.floor(fr + Fraction(1, 2)), "nearest_even": round(fr)}[r]
    assert int(round_div(torch.tensor([n]), torch.tensor(d), r)) == want


def test_saturate_and_wrap_count_events():
    q = torch.tensor([-200, -128, 0, 127, 300])
    s, ev = saturate(q, 8)
    assert s.tolist() == [-128, -128, 0, 127, 127] and int(ev) == 2
    w, ev = saturate(q, 8, "wrap")
    assert w.tolist() == [56, -128, 0, 127, 44] and int(ev) == 2
    with pytest.raises(ValueError):
        saturate(q, 8, "bogus")


def test_quantize_scalar_exact():
    assert quantize_scalar(6.0, 4) == 96 and quantize_scalar(6.0, -3) == 1
    assert quantize_scalar(0.5, 0, "nearest_even") == 0 and quantize_scalar(0.5, 0, "half_up") == 1
    assert quantize_scalar(-0.5, 0, "floor") == -1
