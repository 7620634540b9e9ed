import torch
import pytest

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def set_bn_stats(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Give a randomly initialised model BatchNorm statistics measured on ``x`` (as a
    trained net has), so deep random nets keep O(1) activations."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture
def digits_dir(tmp_path_factory):
    from fixq.digits import export_digits
    return export_digits(tmp_path_factory.mktemp("digits"), "test")
