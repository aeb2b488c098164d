"""The benchmark's FLOP counts (its GFLOP/s and "ratio at peak" columns rest on them)."""
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from jaxconv.bench import forward_macs, torch_lenet5, train_macs


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "resnet18"])
def test_train_step_flops_match_torchs_flop_counter(name):
    # torch counts what its train step runs: the forward, every weight gradient and every
    # input gradient that autograd needs (none for the image's own). (Its counter is no
    # reference for grouped convolutions' gradients: it counts EfficientNet-B0's backward
    # as 14x what the forward's depthwise layers can need.)
    model = torch_lenet5() if name == "lenet5" else getattr(torchvision.models, name)()
    x = torch.zeros((2, 1, 28, 28) if name == "lenet5" else (2, 3, 224, 224))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    flops = 2 * train_macs(*forward_macs(name)) * x.shape[0]
    assert abs(counter.get_total_flops() - flops) / flops < 0.005
