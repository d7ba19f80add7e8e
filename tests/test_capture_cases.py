"""The situations where capture used to be silently wrong (each failed before the capture contract):
other tools' passes, a layer used twice, frozen parts of a layer, loss checks, hyper-parameters edited later."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import exact
from helpers import assert_close


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_curvlinops_operator_is_not_inflated_by_an_attached_optimizer():
    """curvlinops' K-FAC on a model a curvlab optimizer is attached to equals the one on a clean copy
    (before: 65x too large, curvlab's hidden Fisher passes ran inside curvlinops' autograd.grad)."""
    curvlinops = pytest.importorskip("curvlinops")
    model = mlp()
    clean = copy.deepcopy(model)
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="mc")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    clean.load_state_dict(model.state_dict())

    def dense(m):
        params = [p for p in m.parameters() if p.requires_grad]
        op = curvlinops.KFACLinearOperator(m, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="type-2",
                                           separate_weight_and_bias=False, check_deterministic=False)
        return op @ torch.eye(sum(p.numel() for p in params))

    before = [t.clone() for t in (opt.units[0].curvature.A, opt.units[0].curvature.G)]
    assert_close(dense(model), dense(clean), rtol=1e-6, atol=1e-8, what="curvlinops K-FAC with curvlab attached")
    assert torch.equal(opt.units[0].curvature.A, before[0]) and torch.equal(opt.units[0].curvature.G, before[1])


class TwiceShared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 4)
        self.cell = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.cell(torch.tanh(self.cell(torch.tanh(self.inp(x)))))))


def test_shared_layer_per_example_quantities_are_exact(float64):
    """MBF with one block per layer IS the empirical Fisher block: exact also for a layer applied twice
    (before: relative error 0.69, the uses were pooled as extra examples)."""
    model = TwiceShared()
    x, y = batch(7)
    opt = curvlab.optimizer(model, "miniblock", "natural", miniblock_size="layer", ema_decay=0.0, strict=True)
    F.cross_entropy(model(x), y).backward()
    assert opt.update_curvature()
    blocks = opt.blocks()
    ref = exact.exact_blocks("empirical", model, x, y, modules=list(blocks))
    for name in blocks:
        assert_close(blocks[name], ref[name], rtol=1e-10, atol=1e-13, what=f"empirical Fisher block {name}")


def test_shared_layer_rows_are_positions_of_one_example(float64):
    """Two uses of ``cell``: rows (N, 2, d_in + 1), in call order; K-FAC's factors follow (expand)."""
    model = TwiceShared()
    x, y = batch(6)
    seen = []
    model.cell.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="empirical", ema_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    unit = next(u for u in opt.units if u.name == "cell")
    stats = opt.capture.layer_stats(unit, torch.float64, None)
    rows = stats.input_rows()
    assert rows.shape == (6, 2, 5)
    for use in range(2):
        assert_close(rows[:, use, :4], seen[use], what=f"use {use} inputs")
    a, _ = stats.kron_factors("real")
    flat = rows.reshape(-1, 5)
    assert_close(a, flat.T @ flat / 6, what="A over both uses")


def test_frozen_bias_and_frozen_weight_blocks_are_sub_blocks(float64):
    """K-FAC of a partly frozen layer is the trainable rows/columns of the full layer's K-FAC."""
    x, y = batch()
    full = mlp()
    opt = curvlab.optimizer(full, "kfac", "natural", fisher="type2", ema_decay=0.0)
    F.cross_entropy(full(x), y).backward()
    opt.update_curvature()
    whole = opt.blocks()
    part = mlp()
    part[0].bias.requires_grad_(False)
    part[2].weight.requires_grad_(False)
    opt2 = curvlab.optimizer(part, "kfac", "natural", fisher="type2", ema_decay=0.0)
    F.cross_entropy(part(x), y).backward()
    opt2.update_curvature()
    got = opt2.blocks()
    w0 = part[0].weight.numel()
    assert_close(got["0"], whole["0"][:w0, :w0], what="layer 0 with its bias frozen")
    b2 = slice(part[2].weight.numel(), None)
    assert_close(got["2"], whole["2"][b2, b2], what="layer 2 with its weight frozen")


# -- the loss check -----------------------------------------------------------------------------------------
def step_once(loss_fn, estimator="kfac", model=None, **hyper):
    model = model or mlp()
    opt = curvlab.optimizer(model, estimator, "natural", **hyper)
    x, y = batch()
    loss_fn(model, x, y).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_sum_reduction_is_refused_naming_reduction(fisher):
    with pytest.raises(curvlab.LossMismatch, match=r"8 times .*reduction='sum'"):
        step_once(lambda m, x, y: F.cross_entropy(m(x), y, reduction="sum"), fisher=fisher)
    with pytest.raises(curvlab.LossMismatch, match="reduction"):       # MBF reads real gradients only
        step_once(lambda m, x, y: F.cross_entropy(m(x), y, reduction="sum"), estimator="miniblock")


def test_micro_batch_means_summed_are_refused_and_averaged_accepted():
    def summed(m, x, y):
        return F.cross_entropy(m(x[:4]), y[:4]) + 0 * F.cross_entropy(m(x[4:]), y[4:]).detach()

    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="empirical")
    x, y = batch()
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    F.cross_entropy(model(x[4:]), y[4:]).backward()
    with pytest.raises(curvlab.LossMismatch, match="divide each micro-batch's mean loss by k"):
        opt.step()
    opt.zero_grad()
    (F.cross_entropy(model(x[:4]), y[:4]) / 2).backward()
    (F.cross_entropy(model(x[4:]), y[4:]) / 2).backward()
    opt.step()
    assert opt.step_count == 1


def test_configured_loss_that_is_not_the_trained_one_is_refused():
    with pytest.raises(curvlab.LossMismatch, match="pass loss='cross_entropy'"):
        step_once(lambda m, x, y: F.cross_entropy(m(x), y), loss="mse", fisher="mc")
    with pytest.raises(curvlab.LossMismatch, match="pass loss='mse'"):
        step_once(lambda m, x, y: F.mse_loss(m(x), torch.zeros(len(x), 3)), fisher="mc")


@pytest.mark.parametrize("variant", ["label_smoothing", "nll_on_log_softmax", "soft_targets", "class_weights"])
def test_legitimate_cross_entropy_variants_pass_the_check(variant):
    def loss(m, x, y):
        if variant == "label_smoothing":
            return F.cross_entropy(m(x), y, label_smoothing=0.1)
        if variant == "nll_on_log_softmax":
            return F.nll_loss(m(x), y)
        if variant == "soft_targets":
            return F.cross_entropy(m(x), torch.softmax(torch.randn(len(x), 3), 1))
        return F.cross_entropy(m(x), y, weight=torch.tensor([1.0, 2.0, 0.5]))

    model = nn.Sequential(mlp(), nn.LogSoftmax(dim=1)) if variant == "nll_on_log_softmax" else mlp()
    opt = step_once(loss, model=model, fisher="empirical")
    assert opt.step_count == 1 and not opt.capture.check_loss     # checked once, then off


def test_mse_training_with_mse_configured_is_not_flagged():
    opt = step_once(lambda m, x, y: F.mse_loss(m(x), torch.randn(len(x), 3)), loss="mse", fisher="empirical")
    assert opt.step_count == 1


# -- hyper-parameters wherever they change; steps without gradients -------------------------------------------
def test_negative_damping_set_later_is_refused_with_the_construction_message():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    x, y = batch()
    opt.param_groups[0]["damping"] = -1e-3
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(curvlab.HyperParameterError, match=r"param_groups\[0\]: damping must be >= 0"):
        opt.step()
    opt.param_groups[0]["damping"] = 1e-3
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match=r"param_groups\[0\]: momentum must lie in \[0, 1\)"):
        opt.step()


def test_scheduler_that_drives_lr_negative_is_refused():
    model = mlp()
    opt = curvlab.optimizer(model, "identity", "natural", lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k)       # 1, 0, -1, ...
    x, y = batch()
    with pytest.raises(curvlab.HyperParameterError, match=r"param_groups\[0\]: lr must be >= 0"):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()


@pytest.mark.parametrize("estimator", ["kfac", "shampoo", "identity"])
def test_step_without_gradients_is_not_a_step(estimator):
    model = mlp()
    opt = curvlab.optimizer(model, estimator, "natural")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    model(batch()[0])                                     # a forward, never back-propagated
    opt.step()
    assert opt.step_count == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.step_count == 1


# -- arming: zero_grad, forwards outside the model, backward(inputs=...) ------------------------------------
def test_zero_grad_discards_what_earlier_training_passes_recorded(float64):
    x, y = batch()
    ref = mlp()
    opt_ref = curvlab.optimizer(ref, "kfac", "natural", fisher="empirical", ema_decay=0.0)
    F.cross_entropy(ref(x[4:]), y[4:]).backward()
    opt_ref.step()
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="empirical", ema_decay=0.0)
    F.cross_entropy(model(x[:4]), y[:4]).backward()          # discarded by zero_grad
    out = model(x[4:])                                        # forward before zero_grad, backward after
    opt.zero_grad()
    F.cross_entropy(out, y[4:]).backward()
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.detach(), q.detach(), what="parameters after zero_grad between passes")


def test_layer_called_outside_the_model_forward_is_not_captured():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", strict=True)
    x, y = batch()
    F.cross_entropy(model[2](torch.tanh(model[0](x))), y).backward()     # the layers, not the model
    with pytest.raises(RuntimeError, match="saw no forward"):
        opt.step()


def test_isaac_fused_direction_only_for_training_backwards():
    model = mlp()
    curvlab.optimizer(model, "isaac", "natural", isaac_fused=True)
    x, y = batch()
    loss = F.cross_entropy(model(x), y)
    (gw,) = torch.autograd.grad(loss, [model[0].weight], retain_graph=True)
    plain = copy.deepcopy(model)
    for m in plain:
        vars(m).pop("forward", None)
    (ref,) = torch.autograd.grad(F.cross_entropy(plain(x), y), [plain[0].weight])
    assert_close(gw, ref, rtol=1e-5, atol=1e-7, what="autograd.grad through a fused layer")
    loss.backward()
    assert not torch.allclose(model[0].weight.grad, ref), "the training backward must get the ISAAC direction"
