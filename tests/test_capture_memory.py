"""The capture hooks never keep a step's graph alive (hooks referring back to their tensor form cycles through
autograd that Python's garbage collector cannot break; capture must break them itself)."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab


@pytest.mark.parametrize("fisher", ["mc", "type2", "empirical"])
@pytest.mark.parametrize("backpropagated", [True, False])
def test_model_output_is_freed_after_the_step(fisher, backpropagated):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "kfac", fisher=fisher, lr=0.01)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()                                             # curvature is ready from here on
    out = model(x)                                         # maybe never back-propagated (evaluation with grad on)
    ref = weakref.ref(out)
    loss = F.cross_entropy(out, y)
    if backpropagated:
        loss.backward()
    opt.step() if backpropagated else opt.capture.clear()
    del out, loss
    gc.collect()
    assert ref() is None, f"the model output of a step (fisher={fisher}) is still referenced after the step"


def test_optimizer_and_model_are_freed_when_dropped():
    """A finished run must not keep its model, optimizer and curvature alive (sweeps run many in one process)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "kfac", fisher="mc", lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    refs = [weakref.ref(opt), weakref.ref(model)]
    del opt, model
    gc.collect()
    assert [r() is None for r in refs] == [True, True]
