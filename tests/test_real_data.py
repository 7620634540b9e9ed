"""Accuracy on real data from ../shared/ (skipped when it is absent)."""
import pytest

from fixq.app.common import make_config
from fixq.algorithms.pipeline import open_session, run_config

from shared_data import resnet_weights, shared_path


@pytest.fixture(scope="module")
def resnet20_session():
    data = shared_path("data/cifar10-test")
    return open_session("cifar10-resnet20", str(data), str(data), weights=str(resnet_weights(20)),
                        calib_size=256, eval_size=500, seed=0, show_progress=False)


def test_resnet20_8b8b_3d_within_one_point(resnet20_session):
    s = resnet20_session
    run = run_config(s, make_config(coeff_bits=8, coeff_mode="3D"))
    assert s.images["n_eval"] == 500 and s.float_top1 < 25.0
    assert run.result.top1_error - s.float_top1 <= 1.0, (s.float_top1, run.result.top1_error)


def test_resnet20_4bit_2d_beats_4d(resnet20_session):
    s = resnet20_session
    e4 = run_config(s, make_config(coeff_bits=4, coeff_mode="4D")).result.top1_error
    e2 = run_config(s, make_config(coeff_bits=4, coeff_mode="2D")).result.top1_error
    assert e2 < e4
