"""Transformer workloads: the token data sets (modular, chars), the models (transformer_lm, vit), the
sequence loss of the runner, and tiny `curvlab run`s of the example configs in examples/."""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import curvlab
from curvlab.data import Split
from curvlab.experiments import cli
from curvlab.experiments.config import ConfigError
from curvlab.experiments.runner import _loss, evaluate, run
from curvlab.experiments.sequences import MODULAR_OPS, char_vocabulary, load_chars, load_modular, read_corpus
from curvlab.transformer_models import TransformerLM, VisionTransformer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def rows_of(tmp: Path) -> list[dict]:
    """The metric rows of the only run directory under ``tmp``."""
    (metrics,) = tmp.glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ modular


@pytest.mark.parametrize("op", MODULAR_OPS)
@pytest.mark.parametrize("sequence", ["pair", "equation"])
def test_modular_labels_are_the_operation_for_every_example(op: str, sequence: str) -> None:
    p = 11
    s = load_modular(p=p, op=op, train_fraction=0.3, sequence=sequence)
    x, y = torch.cat([s.x_train, s.x_test]), torch.cat([s.y_train, s.y_test])
    assert x.dtype == y.dtype == torch.int64 and s.tokens
    a, b = x[:, 0], x[:, -1] if sequence == "pair" else x[:, 2]
    if sequence == "equation":
        assert (x[:, 1] == p).all() and (x[:, 3] == p + 1).all() and s.vocab_size == p + 2
    else:
        assert x.shape[1] == 2 and s.vocab_size == p
    if op == "div":  # c * b = a (mod p), found by search
        expected = torch.tensor([next(c for c in range(p) if (c * int(bb)) % p == int(aa)) for aa, bb in zip(a, b)])
    else:
        expected = {"add": (a + b) % p, "sub": (a - b) % p, "mul": (a * b) % p}[op]
    assert torch.equal(y, expected)
    # the whole table, each equation once
    size = p * (p - 1) if op == "div" else p * p
    assert len({(int(u), int(v)) for u, v in zip(a, b)}) == len(x) == size
    assert s.num_train == round(0.3 * size) and s.num_outputs == p and s.example_shape == (x.shape[1],)


def test_modular_split_is_disjoint_and_deterministic() -> None:
    s = load_modular(p=23, train_fraction=0.4, seed=0)
    train = {tuple(r.tolist()) for r in s.x_train}
    test = {tuple(r.tolist()) for r in s.x_test}
    assert not train & test and len(train) + len(test) == 23 * 23
    again = load_modular(p=23, train_fraction=0.4, seed=0)
    assert torch.equal(s.x_train, again.x_train) and torch.equal(s.y_test, again.y_test)
    other = load_modular(p=23, train_fraction=0.4, seed=1)
    assert {tuple(r.tolist()) for r in other.x_train} != train
    # token ids survive the runner's dtype conversion
    moved = s.to(torch.float64)
    assert moved.x_train.dtype == torch.int64 and torch.equal(moved.x_train, s.x_train)


@pytest.mark.parametrize("kwargs, message", [({"p": 1}, "p must be"), ({"op": "pow"}, "op must be"),
                                             ({"op": "div", "p": 12}, "prime"), ({"train_fraction": 1.0}, "(0, 1)"),
                                             ({"sequence": "abc"}, "sequence")])
def test_modular_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_modular(**kwargs)


# -------------------------------------------------------------------------------------------------- chars


def test_chars_targets_are_the_inputs_shifted_by_one_and_decode_to_the_text() -> None:
    text = read_corpus()
    assert len(text.encode()) <= 200_000 and text.isascii()
    s = load_chars(context=16, test_fraction=0.1, max_chars=5000)
    assert s.x_train.shape[1] == s.y_train.shape[1] == 16 and s.x_train.dtype == s.y_train.dtype == torch.int64
    assert torch.equal(s.y_train[:, :-1], s.x_train[:, 1:]) and torch.equal(s.y_test[:, :-1], s.x_test[:, 1:])
    assert torch.equal(s.x_train[1:, 0], s.y_train[:-1, -1])  # stride = context: windows follow each other
    train_text, test_text = text[:4500], text[4500:5000]
    vocab = char_vocabulary(train_text)
    assert s.vocab_size == s.num_classes == len(vocab) + 1 and s.input_shape == (16,)
    decode = lambda ids: "".join(vocab[i] if i < len(vocab) else "\0" for i in ids.tolist())  # noqa: E731
    assert decode(s.x_train[0]) + decode(s.y_train[0][-1:]) == train_text[:17]
    assert decode(s.x_test[0]) == "".join(c if c in vocab else "\0" for c in test_text[:16])
    assert len(s.x_train) == (4500 - 17) // 16 + 1


def test_chars_split_by_position_with_unknown_token(tmp_path: Path) -> None:
    book = tmp_path / "book.txt"
    book.write_text("abcabcabcabcabcabcab" + "xyzxyz", encoding="utf-8")  # the test part has unseen letters
    s = load_chars(context=4, test_fraction=0.25, stride=2, path=str(book))
    assert s.vocab_size == 4  # a, b, c + unknown
    assert (s.x_test == 3).any() and s.x_train.max() < 3
    assert torch.equal(s.x_train[1, :2], s.x_train[0, 2:])  # stride 2: overlapping windows
    with pytest.raises(ValueError, match="no window"):
        load_chars(context=40, path=str(book))


# ------------------------------------------------------------------------------------------------- models


def test_transformer_lm_shapes_and_causality() -> None:
    torch.manual_seed(0)
    lm = curvlab.MODELS.get("transformer_lm")((12,), 30, vocab_size=30)
    tokens = torch.randint(0, 30, (5, 12))
    out = lm(tokens)
    assert out.shape == (5, 12, 30)
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 30
    out2 = lm(changed)
    assert torch.allclose(out[:, :7], out2[:, :7], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(out[:, 7:], out2[:, 7:], atol=1e-4)
    assert lm(tokens[:, :5]).shape == (5, 5, 30)  # shorter sequences work
    for pool in ("last", "mean"):
        m = curvlab.MODELS.get("transformer_lm")((4,), 23, vocab_size=25, pool=pool, norm_first=False, num_layers=1)
        assert m(torch.randint(0, 25, (3, 4))).shape == (3, 23)
    last = TransformerLM(30, 30, 12, pool="last")
    last.load_state_dict(lm.state_dict())
    assert torch.allclose(last(tokens), out[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="token ids"):
        lm(torch.randn(5, 12))
    with pytest.raises(ValueError, match="token data set"):
        curvlab.MODELS.get("transformer_lm")((1, 8, 8), 10)
    with pytest.raises(ValueError, match="divisible"):
        curvlab.MODELS.get("transformer_lm")((4,), 10, vocab_size=10, d_model=10, nhead=4)


def test_vit_shapes_and_linear_patch_embedding_equals_conv() -> None:
    torch.manual_seed(0)
    digits = curvlab.MODELS.get("vit")((1, 8, 8), 10)
    assert digits(torch.randn(6, 64)).shape == (6, 10) and digits.num_patches == 4
    linear = VisionTransformer((1, 28, 28), 10, patch_size=7, pool="mean")
    conv = VisionTransformer((1, 28, 28), 10, patch_size=7, pool="mean", patch_embed="conv")
    state = linear.state_dict()
    state["patch_embed.weight"] = state["patch_embed.weight"].reshape(conv.patch_embed.weight.shape)
    conv.load_state_dict(state)
    x = torch.randn(3, 784)
    assert linear(x).shape == (3, 10) and torch.allclose(linear(x), conv(x), atol=1e-5)
    patch = linear.patches(x.reshape(3, 1, 28, 28))[1, 5]  # grid row 1, column 1 of the second image
    assert torch.equal(patch, x[1].reshape(28, 28)[7:14, 7:14].reshape(-1))
    with pytest.raises(ValueError, match="divide"):
        curvlab.MODELS.get("vit")((1, 8, 8), 10, patch_size=3)
    with pytest.raises(ValueError, match="image inputs"):
        curvlab.MODELS.get("vit")((12,), 10)


# --------------------------------------------------------------------------------------- loss, evaluation


def test_sequence_loss_and_per_token_accuracy() -> None:
    torch.manual_seed(0)
    out, y = torch.randn(4, 6, 9), torch.randint(0, 9, (4, 6))
    mean = _loss("classification", out, y)
    manual = sum(F.cross_entropy(out[n, t:t + 1], y[n, t:t + 1]) for n in range(4) for t in range(6)) / 24
    assert torch.allclose(mean, manual) and torch.allclose(_loss("classification", out, y, "sum"), 24 * manual)
    with pytest.raises(ValueError, match="pool = 'last'"):
        _loss("classification", out, y[:, 0])
    model = torch.nn.Identity()
    loss, acc = evaluate(model, out, y, "classification", batch_size=3)
    assert math.isclose(loss, float(manual), rel_tol=1e-5)
    assert acc == pytest.approx(float((out.argmax(-1) == y).float().mean()))


def test_token_data_with_a_feature_model_is_refused() -> None:
    cfg = {"data": {"name": "modular", "p": 5}, "model": {"name": "mlp"}, "optimizer": {"estimator": "identity"},
           "train": {"epochs": 1, "checkpoint": False}}
    with pytest.raises(ConfigError, match="token ids.*transformer_lm"):
        run(cfg, None, quiet=True)


# ------------------------------------------------------------------------------ training and example configs


def test_modular_example_learns_the_training_set(tmp_path: Path) -> None:
    """60 full-batch steps of the grokking example: memorization starts (train accuracy up, train loss down)."""
    assert cli.run_main([str(EXAMPLES / "modular_grokking.toml"), "--train.epochs", "60", "--quiet",
                         "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path)
    assert [r["steps"] for r in rows] == list(range(61))  # one row per step: accuracy over steps
    first, last = rows[0], rows[-1]
    assert first["train_accuracy"] < 0.15 and last["train_accuracy"] > 0.6
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert {"test_accuracy", "test_loss"} <= set(last)
    assert json.loads(next(tmp_path.glob("*/summary.json")).read_text())["final_train_accuracy"] == \
        last["train_accuracy"]


def test_chars_example_reduces_the_per_character_loss(tmp_path: Path) -> None:
    """3 short epochs (54 steps) on the first 40,000 characters: better than the most frequent character."""
    assert cli.run_main([str(EXAMPLES / "chars_transformer.toml"), "--train.epochs", "3", "--data.max_chars",
                         "40000", "--quiet", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path)
    data = load_chars(max_chars=40000)
    majority = float(torch.bincount(data.y_test.reshape(-1)).max()) / data.y_test.numel()
    assert rows[0]["test_loss"] == pytest.approx(math.log(data.vocab_size), rel=0.1)  # small init: ~uniform
    assert rows[-1]["test_loss"] < 0.7 * rows[0]["test_loss"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_accuracy"] > majority + 0.03 and rows[0]["test_accuracy"] < majority


def test_vit_example_learns_digits(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    assert cli.run_main([str(EXAMPLES / "digits_vit.toml"), "--train.epochs", "2", "--quiet",
                         "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path)
    assert rows[0]["test_accuracy"] < 0.3 and rows[-1]["test_accuracy"] > 0.6


def test_shampoo_trains_the_transformer_lm() -> None:
    cfg = tomllib.loads((EXAMPLES / "modular_grokking.toml").read_text())
    cfg["optimizer"] = {"estimator": "shampoo", "rule": "natural"}
    cfg["train"]["epochs"] = 30
    result = run(cfg, None, quiet=True)
    assert result.summary["skipped_steps"] == 0
    assert result.metrics[-1]["train_loss"] < 0.8 * result.metrics[0]["train_loss"]


def test_example_configs_resolve() -> None:
    from curvlab.experiments.config import load_config, resolve_config

    names = sorted(p.name for p in EXAMPLES.glob("*.toml"))
    assert {"modular_grokking.toml", "chars_transformer.toml", "digits_vit.toml"} <= set(names)
    for name in names:
        resolved = resolve_config(load_config(EXAMPLES / name))
        assert resolved["optimizer"]["estimator"] == "identity"


def test_split_rejects_float_tokens() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="int64 token ids"):
        Split(x, torch.zeros(2, dtype=torch.int64), x, torch.zeros(2, dtype=torch.int64), 3, 2, "bad", vocab_size=4)


def test_modular_analysis_tiny_mode_writes_its_figure_and_numbers(tmp_path):
    """analysis/modular.py (estimators on modular arithmetic): tiny mode runs every method on the same grid
    and records, per run, validation accuracy over steps and the steps to 99%."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analysis" / "modular.py"
    spec = importlib.util.spec_from_file_location("analysis_modular", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--mode", "tiny", "--out", str(tmp_path)])
    for ext in ("png", "pdf"):
        assert (tmp_path / f"modular.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "modular.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["identity", "kfac"] == [r["method"] for r in out["runs"]]
    for r in saved["runs"]:
        assert r["steps"] == [0, 3, 6] and len(r["val_accuracy"]) == 3 and not r["diverged"]
        assert all(0.0 <= a <= 1.0 for a in r["val_accuracy"])
