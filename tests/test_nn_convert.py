"""curvlab.nn: LinearMultiheadAttention / convert compute exactly what nn.MultiheadAttention computes (outputs,
attention weights, gradients w.r.t. inputs and parameters), keep its state dict, and make attention
preconditionable by curvlab.optimizer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.nn import ConversionError, LinearMultiheadAttention, convert
from helpers import assert_close

TOL = {"rtol": 0.0, "atol": 1e-12}
N, L, S, E, H = 3, 5, 6, 8, 2


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (nn.MultiheadAttention initializes its biases to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def _grad_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameter gradients laid out like ``model.state_dict()`` (for converted models: packed by its hook)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert p.grad is not None, f"parameter {name} got no gradient"
            q.copy_(p.grad)
    return twin.state_dict()


def _compare(original: nn.Module, converted: nn.Module, inputs: list[torch.Tensor], call, what: str) -> None:
    """Forward ``call(module, *inputs)`` on both, compare every output, then every gradient (w.r.t. each of
    ``inputs`` and each parameter) after one backward of a random linear function of the outputs."""
    results = []
    for module in (original, converted):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = call(module, *xs)
        out = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in out)
        loss.backward()
        results.append((out, [x.grad for x in xs if x.requires_grad], _grad_state(module)))
    (out_a, gin_a, gp_a), (out_b, gin_b, gp_b) = results
    assert len(out_a) == len(out_b), f"{what}: {len(out_b)} outputs, expected {len(out_a)}"
    for i, (b, a) in enumerate(zip(out_b, out_a)):
        assert_close(b, a, what=f"{what}: output {i}", **TOL)
    for i, (b, a) in enumerate(zip(gin_b, gin_a)):
        assert_close(b, a, what=f"{what}: gradient w.r.t. input {i}", **TOL)
    assert list(gp_b) == list(gp_a)
    for key in gp_a:
        assert_close(gp_b[key], gp_a[key], what=f"{what}: gradient w.r.t. {key}", **TOL)


def _masks(kind: str):
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -2:] = pad[2, -1] = True
    return {"causal_bool": causal, "causal_float": torch.zeros(L, L).masked_fill(causal, float("-inf")),
            "pad_bool": pad, "pad_float": torch.zeros(N, L).masked_fill(pad, float("-inf"))}[kind]


# (constructor options, forward options built lazily: name -> callable returning kwargs)
SELF_CASES = {
    "plain": ({}, lambda: {}),
    "no_weights": ({}, lambda: {"need_weights": False}),
    "per_head_weights": ({}, lambda: {"average_attn_weights": False}),
    "seq_first": ({"batch_first": False}, lambda: {}),
    "seq_first_no_weights": ({"batch_first": False}, lambda: {"need_weights": False}),
    "key_padding_bool": ({}, lambda: {"key_padding_mask": _masks("pad_bool")}),
    "key_padding_float_no_weights": ({}, lambda: {"key_padding_mask": _masks("pad_float"), "need_weights": False}),
    "causal_bool": ({}, lambda: {"attn_mask": _masks("causal_bool")}),
    "causal_float": ({}, lambda: {"attn_mask": _masks("causal_float")}),
    "causal_hint_sdpa": ({}, lambda: {"attn_mask": _masks("causal_bool"), "is_causal": True, "need_weights": False}),
    "causal_hint_weights": ({}, lambda: {"attn_mask": _masks("causal_float"), "is_causal": True}),
    "causal_and_padding": ({}, lambda: {"attn_mask": _masks("causal_bool"), "key_padding_mask": _masks("pad_bool")}),
    "mask_3d": ({}, lambda: {"attn_mask": torch.randn(N * H, L, L)}),
    "no_bias": ({"bias": False}, lambda: {}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True},
                          lambda: {"key_padding_mask": _masks("pad_bool"), "attn_mask": _masks("causal_bool")}),
    "bias_kv_no_weights": ({"add_bias_kv": True}, lambda: {"need_weights": False}),
    "dropout_eval": ({"dropout": 0.3}, lambda: {}),
}


@pytest.mark.parametrize("case", sorted(SELF_CASES))
def test_self_attention_matches(float64, case):
    options, forward_kw = SELF_CASES[case]
    options = {"batch_first": True, **options}
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **options)
    _randomize(mha)
    conv = LinearMultiheadAttention.from_module(mha)
    if options.get("dropout"):
        mha.eval(), conv.eval()
    x = torch.randn(N, L, E) if options["batch_first"] else torch.randn(L, N, E)
    kw = forward_kw()
    _compare(mha, conv, [x], lambda m, x: m(x, x, x, **kw), case)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_with_kdim_vdim_matches(float64, need_weights, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=5, vdim=7, batch_first=batch_first)
    _randomize(mha)
    conv = LinearMultiheadAttention.from_module(mha)
    shape = (lambda n, length, d: (n, length, d)) if batch_first else (lambda n, length, d: (length, n, d))
    q, k, v = torch.randn(shape(N, L, E)), torch.randn(shape(N, S, 5)), torch.randn(shape(N, S, 7))
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[1, :2] = True
    _compare(mha, conv, [q, k, v],
             lambda m, q, k, v: m(q, k, v, key_padding_mask=pad, need_weights=need_weights), "kdim/vdim")


def test_unbatched_and_shared_key_value_match(float64):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    _randomize(mha)
    conv = LinearMultiheadAttention.from_module(mha)
    x = torch.randn(L, E)
    _compare(mha, conv, [x], lambda m, x: m(x, x, x, attn_mask=_masks("causal_bool")), "unbatched")
    q, kv = torch.randn(N, L, E), torch.randn(N, S, E)
    _compare(mha, conv, [q, kv], lambda m, q, kv: m(q, kv, kv), "encoder-decoder attention")


def test_dropout_in_training_uses_the_same_random_weights(float64):
    """Same seed, same draws: dropout on the attention weights matches torch's, in both attention branches."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    _randomize(mha)
    conv = LinearMultiheadAttention.from_module(mha)
    assert conv.training and mha.training
    x = torch.randn(N, L, E)
    for need_weights in (True, False):
        outs = []
        for m in (mha, conv):
            torch.manual_seed(7)
            outs.append(m(x, x, x, need_weights=need_weights))
        assert_close(outs[1][0], outs[0][0], what=f"dropout output (need_weights={need_weights})", **TOL)
        if need_weights:
            assert_close(outs[1][1], outs[0][1], what="dropout attention weights", **TOL)
        torch.manual_seed(8)
        a, b = conv(x, x, x)[0], conv(x, x, x)[0]
        assert not torch.equal(a, b), "dropout had no effect in training mode"


def _encoder(norm_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=not norm_first)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")   # torch's own padded inference path
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_matches(float64, norm_first):
    torch.manual_seed(0)
    enc = _encoder(norm_first)
    _randomize(enc)
    conv = convert(copy.deepcopy(enc))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in conv.modules())
    x = torch.randn(N, L, 16)
    pad, causal = _masks("pad_bool"), nn.Transformer.generate_square_subsequent_mask(L)
    for mode in ("train", "eval"):
        enc.train(mode == "train"), conv.train(mode == "train")
        _compare(enc, conv, [x], lambda m, x: m(x), f"encoder {mode}")
        _compare(enc, conv, [x], lambda m, x: m(x, src_key_padding_mask=pad), f"encoder {mode} padding")
        _compare(enc, conv, [x], lambda m, x: m(x, mask=causal, is_causal=True), f"encoder {mode} causal")
    with torch.no_grad():       # eval without gradients: torch's fused fast path (nested tensors with padding)
        for kw in ({}, {"src_key_padding_mask": pad}, {"mask": causal}):
            assert_close(conv(x, **kw), enc(x, **kw), what=f"encoder no_grad {sorted(kw)}", **TOL)
        conv.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: None)   # hooks: layer declines fast path
        assert_close(conv(x, src_key_padding_mask=pad), enc(x, src_key_padding_mask=pad),
                     what="encoder no_grad padding, hooked", **TOL)


def test_transformer_matches(float64):
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                           batch_first=True)
    _randomize(model)
    conv = convert(copy.deepcopy(model))
    assert sum(isinstance(m, LinearMultiheadAttention) for m in conv.modules()) == 6
    src, tgt = torch.randn(N, S, 16), torch.randn(N, L, 16)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(L)
    src_pad = torch.zeros(N, S, dtype=torch.bool)
    src_pad[0, -2:] = True

    def call(m, src, tgt):
        return m(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, src_key_padding_mask=src_pad,
                 memory_key_padding_mask=src_pad)

    for mode in ("train", "eval"):
        model.train(mode == "train"), conv.train(mode == "train")
        _compare(model, conv, [src, tgt], call, f"transformer {mode}")
    with torch.no_grad():
        assert_close(call(conv, src, tgt), call(model, src, tgt), what="transformer eval no_grad", **TOL)


@pytest.mark.parametrize("options", [{}, {"kdim": 5, "vdim": 7}, {"bias": False}, {"add_bias_kv": True}],
                         ids=["packed", "kdim_vdim", "no_bias", "bias_kv"])
def test_state_dict_round_trips(float64, options):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **options)
    _randomize(mha)
    conv = LinearMultiheadAttention.from_module(mha)
    ref, mine = mha.state_dict(), conv.state_dict()
    assert list(mine) == list(ref)
    assert set(mine._metadata) == set(ref._metadata)
    for key in ref:
        assert_close(mine[key], ref[key], what=f"state_dict[{key!r}]", rtol=0.0, atol=0.0)
    fresh = LinearMultiheadAttention(E, H, **options)
    fresh.load_state_dict(ref)                                   # original checkpoint -> converted
    for key, value in fresh.state_dict().items():
        assert_close(value, ref[key], what=f"loaded {key!r}", rtol=0.0, atol=0.0)
    _randomize(conv, seed=3)
    back = nn.MultiheadAttention(E, H, **options)
    back.load_state_dict(conv.state_dict())                      # converted checkpoint -> original
    for key, value in back.state_dict().items():
        assert_close(value, conv.state_dict()[key], what=f"loaded back {key!r}", rtol=0.0, atol=0.0)
    own = {n: p.detach().clone() for n, p in conv.named_parameters()}
    fresh.load_state_dict(own)                                   # its own parameter names load too
    assert all(torch.equal(p, own[n]) for n, p in fresh.named_parameters())


def test_transformer_state_dicts_interchange(float64):
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    _randomize(model)
    conv = convert(copy.deepcopy(model))
    assert list(conv.state_dict()) == list(model.state_dict())
    twin = copy.deepcopy(model)
    _randomize(twin, seed=5)
    conv.load_state_dict(twin.state_dict())
    model.load_state_dict(conv.state_dict())
    for key, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="size mismatch for encoder.layers.0.self_attn.in_proj_weight"):
        bad = conv.state_dict()
        bad["encoder.layers.0.self_attn.in_proj_weight"] = torch.zeros(4, 16)
        conv.load_state_dict(bad)


def test_convert_in_place_keeps_mode_grad_flags_and_sharing():
    shared = nn.MultiheadAttention(E, H)
    shared.eval()
    shared.in_proj_weight.requires_grad_(False)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Linear(E, E))})
    assert convert(model) is model
    new = model["a"]
    assert isinstance(new, LinearMultiheadAttention) and model["b"][0] is new and not new.training
    assert [p.requires_grad for p in (new.q_proj.weight, new.k_proj.weight, new.q_proj.bias)] == [False, False, True]
    root = convert(nn.MultiheadAttention(E, H))
    assert isinstance(root, LinearMultiheadAttention)
    assert root.in_proj_weight.shape == (3 * E, E) and root.q_proj_weight is None


def test_convert_refuses_with_path_and_remedy():
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.Sequential(nn.Linear(E, E), nn.ModuleList([Custom(E, H)]))
    with pytest.raises(ConversionError, match=r"1\.0: .*Custom is a subclass.*keep it unconverted"):
        convert(model)
    model = nn.TransformerEncoderLayer(E, H, 16)
    model.self_attn.out_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ConversionError, match=r"self_attn: hooks .*out_proj._forward_hooks.*Convert the model first"):
        convert(model)
    with pytest.raises(TypeError, match="LinearMultiheadAttention: attn_mask must be a bool or floating"):
        attn = LinearMultiheadAttention(E, H)
        x = torch.randn(L, N, E)
        attn(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))


class _EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)).mean(dim=1))


def _train(model: nn.Module, steps: int = 5) -> tuple[curvlab.CurvlabOptimizer, list[float]]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.05, damping=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


def test_converted_encoder_is_preconditioned_by_kfac():
    torch.manual_seed(0)
    model = _EncoderClassifier()
    original = copy.deepcopy(model)          # unconverted: in_proj_* fall back to first-order; out_proj is claimed
    probe = curvlab.optimizer(original, "kfac", "natural")
    before = {r["name"]: r for r in probe.coverage()}
    probe.capture.remove()
    assert not before["encoder.layers.0.self_attn.in_proj_weight"]["preconditioned"]
    assert before["encoder.layers.0.self_attn.out_proj"]["preconditioned"]
    with pytest.warns(curvlab.CaptureWarning, match=r"self_attn\.out_proj.*curvlab\.nn\.convert"):
        _train(original)                     # claimed by the Linear adapter but never called by MHA: first order
    converted = convert(model)
    opt, losses = _train(converted)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    rows = {r["name"]: r for r in opt.coverage()}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert rows[f"encoder.layers.{i}.self_attn.{proj}"]["preconditioned"], proj
    total = sum(p.numel() for p in converted.parameters())
    covered = sum(r["numel"] for r in rows.values() if r["preconditioned"])
    assert covered == total, opt.coverage_report()   # LayerNorms too (scale/shift blocks)
    converted.eval()
    with torch.no_grad():                          # evaluation with the optimizer's hooks attached
        pad = torch.zeros(16, 5, dtype=torch.bool)
        pad[:, -1] = True
        assert torch.isfinite(converted.head(converted.encoder(converted.inp(torch.randn(16, 5, 8)),
                                                               src_key_padding_mask=pad))).all()
