"""Tests for curvlab.data (digits split, minibatching) and curvlab.models."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("sklearn")

from curvlab.data import Split, batches, load_digits  # noqa: E402
from curvlab.models import mlp, small_cnn  # noqa: E402


@pytest.fixture(scope="module")
def split() -> Split:
    return load_digits(seed=0)


# ----------------------------------------------------------------------------- data


def test_split_shapes_and_types(split: Split) -> None:
    assert split.name == "digits"
    assert split.num_features == 64 and split.num_classes == 10
    n_train, n_test = split.x_train.shape[0], split.x_test.shape[0]
    assert n_train + n_test == 1797
    assert n_test == pytest.approx(0.25 * 1797, abs=1)
    assert split.x_train.shape == (n_train, 64) and split.x_test.shape == (n_test, 64)
    assert split.y_train.shape == (n_train,) and split.y_test.shape == (n_test,)
    assert split.x_train.dtype == torch.float32
    assert split.y_train.dtype == torch.int64 and split.y_test.dtype == torch.int64
    assert split.num_train == n_train and split.num_test == n_test
    assert torch.isfinite(split.x_train).all() and torch.isfinite(split.x_test).all()


def test_split_is_frozen(split: Split) -> None:
    with pytest.raises(AttributeError):
        split.name = "other"  # type: ignore[misc]


def test_split_deterministic_by_seed() -> None:
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_standardized_with_train_statistics(split: Split) -> None:
    mean = split.x_train.mean(dim=0)
    std = split.x_train.std(dim=0)
    assert mean.abs().max() < 1e-5
    # non-constant features have unit std; constant ones (std guarded) stay at 0
    assert torch.allclose(std[std > 0.5], torch.ones_like(std[std > 0.5]), atol=1e-4)
    assert (std < 1e-6).sum() >= 1  # the digits set has all-zero pixels (guarded std)
    # the test part is not re-standardized with its own statistics
    assert split.x_test.mean(dim=0).abs().max() > 1e-3


def test_split_stratified(split: Split) -> None:
    test_counts = torch.bincount(split.y_test, minlength=10)
    train_counts = torch.bincount(split.y_train, minlength=10)
    assert (test_counts > 0).all() and (train_counts > 0).all()
    ratio = test_counts.double() / (test_counts + train_counts).double()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.25), atol=0.02)


def test_load_digits_dtype_and_bad_fraction() -> None:
    assert load_digits(dtype=torch.float64).x_train.dtype == torch.float64
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_missing_sklearn_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` fail
    with pytest.raises(ImportError, match="scikit-learn"):
        load_digits()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch_size", [1, 7, 32, 100])
def test_batches_cover_each_example_once(shuffle: bool, batch_size: int) -> None:
    n = 100
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    y = torch.arange(n)
    seen = []
    sizes = []
    for xb, yb in batches(x, y, batch_size, shuffle=shuffle):
        assert torch.equal(xb[:, 0].long(), yb)  # rows stay paired with labels
        seen.append(yb)
        sizes.append(len(yb))
    assert torch.equal(torch.cat(seen).sort().values, y)
    assert sizes[:-1] == [batch_size] * (len(sizes) - 1)
    assert len(sizes) == -(-n // batch_size)  # last partial batch kept
    if not shuffle:
        assert torch.equal(torch.cat(seen), y)


def test_batches_fresh_permutation_and_generator() -> None:
    x, y = torch.randn(50, 2), torch.arange(50)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([yb for _, yb in batches(x, y, 10, generator=g)])
    second = torch.cat([yb for _, yb in batches(x, y, 10, generator=g)])
    assert not torch.equal(first, second)
    again = torch.cat(
        [yb for _, yb in batches(x, y, 10, generator=torch.Generator().manual_seed(0))]
    )
    assert torch.equal(first, again)


def test_batch_size_larger_than_data_gives_one_batch() -> None:
    x, y = torch.randn(5, 2), torch.arange(5)
    out = list(batches(x, y, 64))
    assert len(out) == 1 and out[0][0].shape == (5, 2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_batches_bad_batch_size(bad) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        batches(torch.zeros(4, 2), torch.zeros(4), bad)  # raises eagerly


def test_batches_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        batches(torch.zeros(4, 2), torch.zeros(3), 2)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "sigmoid", "identity"])
def test_mlp_output_shape(activation: str) -> None:
    model = mlp(64, 32, 2, 10, activation=activation)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 10)]
    assert all(not getattr(m, "inplace", False) for m in model)


def test_mlp_depth_zero_and_no_bias() -> None:
    model = mlp(4, 8, 0, 3, bias=False)
    assert len(model) == 1 and model[0].bias is None
    assert model(torch.randn(2, 4)).shape == (2, 3)


def test_mlp_same_init_by_seed() -> None:
    torch.manual_seed(1)
    a = mlp(64, 64, 2, 10)
    torch.manual_seed(1)
    b = mlp(64, 64, 2, 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"activation": "swish"}, "activation"),
        ({"activation": None}, "activation"),
        ({"depth": -1}, "depth"),
        ({"width": 0}, "width"),
        ({"in_features": 0}, "in_features"),
    ],
)
def test_mlp_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"in_features": 64, "width": 8, "depth": 1, "out_features": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        mlp(**args)


def test_small_cnn_output_shape(split: Split) -> None:
    model = small_cnn()
    images = split.x_train[:6].reshape(-1, 1, 8, 8)
    assert model(images).shape == (6, 10)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and all(c.kernel_size == (3, 3) for c in convs)
    assert model[-1].in_features == 16 * 4 * 4  # pooled to a 4x4 grid for 8x8 images
    assert small_cnn(image_size=1)(torch.randn(2, 1, 1, 1)).shape == (2, 10)
    assert small_cnn(in_channels=3, width=4, num_classes=5)(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_small_cnn_bad_arguments() -> None:
    with pytest.raises(ValueError, match="width"):
        small_cnn(width=0)


def test_small_cnn_non_square_inputs() -> None:
    model = small_cnn(1, 4, 10, image_size=(1, 40))  # an MNIST-1D signal as a 1 x 40 image
    assert model(torch.randn(3, 1, 1, 40)).shape == (3, 10)
    assert model[-1].in_features == 4 * 1 * 7
    assert small_cnn(1, 4, 10, image_size=28)[-1].in_features == 4 * 7 * 7


def test_autoencoder_architecture() -> None:
    from curvlab.models import autoencoder

    model = autoencoder()
    sizes = [(m.in_features, m.out_features) for m in model if isinstance(m, torch.nn.Linear)]
    assert sizes == [(784, 1000), (1000, 500), (500, 250), (250, 30), (30, 250), (250, 500), (500, 1000),
                     (1000, 784)]
    kinds = [type(m).__name__ for m in model]
    assert kinds[7] == "Linear" and kinds[6] == "Linear"  # linear code layer: no activation after 250 -> 30
    assert kinds[-1] == "Sigmoid" and kinds.count("Sigmoid") == 7
    out = model(torch.randn(2, 784))
    assert out.shape == (2, 784) and bool(((out > 0) & (out < 1)).all())
    small = autoencoder(64, width=16, code=4, activation="relu", output="linear")
    assert [m.out_features for m in small if isinstance(m, torch.nn.Linear)] == [16, 8, 4, 4, 4, 8, 16, 64]
    assert type(small[-1]).__name__ == "Linear"
    with pytest.raises(ValueError, match="output"):
        autoencoder(output="bce")


def test_resnet_blocks_width_and_coverage() -> None:
    import curvlab
    from curvlab.models import BasicBlock, resnet

    model = resnet(1, 10, width=4, blocks=2, stages=3)
    blocks = [m for m in model if isinstance(m, BasicBlock)]
    assert len(blocks) == 6 and [b.conv2.out_channels for b in blocks] == [4, 4, 8, 8, 16, 16]
    assert [len(b.shortcut) for b in blocks] == [0, 0, 2, 0, 2, 0]  # 1x1 projection where the shape changes
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    opt = curvlab.optimizer(model, "kfac", "natural")
    fallback = [u["name"] for u in opt.coverage() if not u["preconditioned"]]
    assert fallback and all("bn" in n or "shortcut.1" in n or n.startswith("1.") for n in fallback)


@pytest.mark.parametrize("name, shape", [("mlp", (64,)), ("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("cnn", (1, 40)),
                                         ("resnet", (1, 8, 8)), ("autoencoder", (1, 8, 8))])
def test_registered_builders_take_flat_inputs(name: str, shape: tuple[int, ...]) -> None:
    import curvlab

    flat = 1
    for s in shape:
        flat *= s
    outputs = flat if name == "autoencoder" else 10
    kwargs = {"width": 8, "code": 2} if name == "autoencoder" else {"width": 8}
    model = curvlab.MODELS.get(name)(shape, outputs, **kwargs)
    assert model(torch.randn(3, flat)).shape == (3, outputs)


def test_builders_reject_bad_inputs() -> None:
    import curvlab

    with pytest.raises(ValueError, match="needs image inputs"):
        curvlab.MODELS.get("cnn")((20,), 10)
    with pytest.raises(ValueError, match="num_outputs == 64"):
        curvlab.MODELS.get("autoencoder")((64,), 10)
    assert {"mlp", "cnn", "autoencoder", "resnet"} <= set(curvlab.MODELS.names())


# ----------------------------------------------------------------------------- demo


def test_demo_main_smoke(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from curvlab.demo import main

    results = main(["--epochs", "1", "--quiet", "--out", str(tmp_path), "--estimators", "kfac", "--workers", "1",
                    "--tune-trials", "2", "--tune-seeds", "1"])
    assert list(results["methods"]) == ["sgd", "kfac", "sngm", "fop"] and not results["failed"]
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report" / "curves.png").is_file()
    assert (tmp_path / "report" / "best_variant.png").is_file()
    out = capsys.readouterr().out
    for text in ("sgd", "kfac", "sngm", "fop", "final acc", "ep->target", "x sgd", "2 trials per method"):
        assert text in out
    tuned = {r["method"]: r for r in results["tuned"]["rows"]}  # the equal-budget comparison of the same methods
    assert list(tuned) == ["sgd", "kfac", "sngm", "fop"] and tuned["kfac"]["space"] == ["optimizer.damping",
                                                                                          "optimizer.lr"]
    assert tuned["sgd"]["space"] == ["optimizer.lr"] and (tmp_path / "tuned" / "kfac" / "best.json").is_file()
    again = main(["--epochs", "1", "--quiet", "--out", str(tmp_path), "--estimators", "kfac", "--workers", "1",
                  "--resume", "--tune-trials", "0"])
    assert again["ran"] == 0  # finished runs are reused
    for name, method in results["methods"].items():
        assert again["methods"][name]["summary"] == method["summary"]


def test_ablation_covers_every_registered_estimator() -> None:
    import curvlab
    from curvlab.experiments.ablation import ablation_config

    cfg = ablation_config()
    names = [v["name"] for v in cfg["sweep"]["variants"]]
    natural = [n for n in curvlab.ESTIMATORS.names() if n != "identity"]
    assert names == ["sgd", *natural, "sngm", "fop"]
    assert ablation_config(data_dir="/x")["data"] == {"name": "mnist", "dir": "/x"}
