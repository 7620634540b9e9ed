import pytest
import torch

from fixq.data.zoo import set_bn_statistics as set_bn_stats  # re-exported for the tests

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

__all__ = ["set_bn_stats"]


@pytest.fixture
def digits_dir(tmp_path_factory):
    from fixq.data.digits import export_digits
    return export_digits(tmp_path_factory.mktemp("digits"), "test")
