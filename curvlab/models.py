"""Reference models built from plain ``torch.nn`` layers, each registered by name (``curvlab.MODELS``).

The models are ``nn.Sequential`` stacks of ``Linear``/``Conv2d`` layers and non-inplace activations,
i.e. exactly the layer types curvature estimators such as K-FAC know how to handle (the ResNet adds
BatchNorm, which gets curvlab's first-order fallback). Every one has a ``width`` argument, so width
studies work:

=============== ===================================================================================
``mlp``         :func:`mlp`, ``width`` hidden units per layer, ``depth`` hidden layers, activation
``cnn``         :func:`small_cnn`, two 3x3 convolutions of ``width`` channels
``autoencoder`` :func:`autoencoder`, 784-1000-500-250-30 and back; ``width`` = first hidden size
``resnet``      :func:`resnet`, BasicBlocks, ``width`` channels in the first stage
=============== ===================================================================================

Transformers (:mod:`curvlab.transformer_models`, width ``d_model``): ``transformer_lm`` (a causal
``nn.TransformerEncoder`` over token ids, for the ``modular`` and ``chars`` data sets) and ``vit`` (a small
Vision Transformer on image data sets).

Registered builders take ``(input_shape, num_outputs, **options)`` and accept FLAT inputs (they unflatten
images themselves); register your own with ``@curvlab.register_model("name")``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .registry import register_model

__all__ = ["ACTIVATIONS", "activation_layer", "mlp", "small_cnn", "autoencoder", "resnet", "BasicBlock",
           "build_mlp", "build_cnn", "build_autoencoder", "build_resnet"]

#: Activation names accepted by :func:`mlp`, mapped to module constructors.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,  # inplace=False by default
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation_layer(activation: str) -> nn.Module:
    """A fresh (non-inplace) activation module for a name in :data:`ACTIVATIONS`.

    Raises:
        ValueError: naming ``activation`` and the accepted values if unknown.
    """
    try:
        return ACTIVATIONS[activation]()
    except (KeyError, TypeError):
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        ) from None


def _check_positive(**kwargs: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    activation: str = "tanh",
    bias: bool = True,
) -> nn.Sequential:
    """A multi-layer perceptron ``Linear -> act -> ... -> Linear``.

    Args:
        in_features: size of each input vector.
        width: units per hidden layer.
        depth: number of hidden layers (``0`` gives a single linear layer).
        out_features: size of the output (e.g. number of classes).
        activation: one of ``"tanh"``, ``"relu"``, ``"gelu"``, ``"sigmoid"``,
            ``"identity"``.
        bias: whether the linear layers have biases.

    Raises:
        ValueError: naming the offending argument if a size is invalid or the
            activation is unknown.
    """
    _check_positive(in_features=in_features, out_features=out_features)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    if depth > 0:
        _check_positive(width=width)
    activation_layer(activation)  # validate before building anything

    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width, bias=bias))
        layers.append(activation_layer(activation))
        fan_in = width
    layers.append(nn.Linear(fan_in, out_features, bias=bias))
    return nn.Sequential(*layers)


def _grid(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` from an int side or a pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def small_cnn(
    in_channels: int = 1, width: int = 16, num_classes: int = 10, image_size: int | tuple[int, int] = 8
) -> nn.Sequential:
    """A two-convolution network for small images, e.g. digits as ``(N, 1, 8, 8)``.

    ``Conv2d(3x3, pad 1) -> ReLU -> Conv2d(3x3, pad 1) -> ReLU -> AdaptiveAvgPool2d -> flatten -> Linear``.
    Pooling to a grid of half the image side (capped at 7: 4x4 for digits, 7x7 for MNIST, 1x7 for a
    1x40 MNIST-1D signal) keeps coarse spatial layout, which a 2-layer network on 8x8 images needs
    (width 8, 3 epochs on digits: ~15-25% test accuracy with global average pooling, ~90-96% with the 4x4
    grid). Inputs of another size still work (the pooling is adaptive).

    Args:
        in_channels: channels of the input images.
        width: channels of both convolutions.
        num_classes: outputs of the final linear layer.
        image_size: side length of the (square) input images the model is meant for, or ``(H, W)``.

    Raises:
        ValueError: naming the offending argument if a size is not positive.
    """
    h, w = _grid(image_size)
    _check_positive(in_channels=in_channels, width=width, num_classes=num_classes, image_height=h, image_width=w)
    pooled = (max(1, min(h // 2, 7)), max(1, min(w // 2, 7)))
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(width * pooled[0] * pooled[1], num_classes),
    )


def autoencoder(in_features: int = 784, width: int = 1000, code: int = 30, activation: str = "sigmoid",
                output: str = "sigmoid") -> nn.Sequential:
    """The deep autoencoder 784-1000-500-250-30-250-500-1000-784 (Hinton & Salakhutdinov, Science 2006),
    the curvature benchmark of Martens (2010), K-FAC (Martens & Grosse 2015), MBF and ISAAC.

    Hidden sizes are ``width, width/2, width/4`` (1000, 500, 250 by default) around a LINEAR ``code``
    layer; ``activation`` (default ``"sigmoid"``, the logistic units of the original papers) follows every
    other hidden layer. ``output="sigmoid"`` (default) ends with ``nn.Sigmoid`` so the MODEL OUTPUT is the
    reconstruction in (0, 1) and is the input of ``torch.nn.MSELoss`` against pixels in [0, 1]: curvlab's
    ``loss="mse"`` Fisher / GGN then treat the sigmoid as part of the network, which is exact for that
    loss. Martens' setup (binary cross-entropy on the logits) is not one of curvlab's losses
    (``cross_entropy`` | ``mse``). ``output="linear"`` returns the raw last layer (MSE on it).
    """
    _check_positive(in_features=in_features, width=width, code=code)
    if output not in ("sigmoid", "linear"):
        raise ValueError(f"output must be 'sigmoid' or 'linear', got {output!r}")
    activation_layer(activation)
    hidden = [max(1, round(width * f)) for f in (1.0, 0.5, 0.25)]
    sizes = [in_features, *hidden, code, *reversed(hidden), in_features]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        last, is_code = i == len(sizes) - 2, fan_out == code and i == len(hidden)
        if not last and not is_code:
            layers.append(activation_layer(activation))
    if output == "sigmoid":
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BatchNorm, identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks: int = 1,
           stages: int = 3) -> nn.Sequential:
    """A small CIFAR-style ResNet (He et al. 2016, sec. 4.2): a 3x3 stem, ``stages`` stages of ``blocks``
    :class:`BasicBlock` each with ``width * 2**s`` channels (stride 2 from the second stage on), global
    average pooling and a linear classifier (``blocks=3`` is ResNet-20).

    curvlab preconditions the convolutions and the classifier; BatchNorm's scale and shift have no layer
    adapter and get the optimizer's documented first-order fallback (see ``opt.coverage_report()``).
    """
    _check_positive(in_channels=in_channels, num_classes=num_classes, width=width, blocks=blocks, stages=stages)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for s in range(stages):
        out = width * 2 ** s
        for b in range(blocks):
            layers.append(BasicBlock(channels, out, stride=2 if (s > 0 and b == 0) else 1))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- registered builders
# A builder takes the data's ``input_shape`` (one example, unflattened) and ``num_outputs`` plus its own
# options, and returns a model that maps FLAT inputs ``(N, prod(input_shape))`` to ``(N, num_outputs)``.


def _image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` for image models; 1-D signals ``(C, L)`` become ``(C, 1, L)``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    raise ValueError(f"model {model!r} needs image inputs (C, H, W) or signals (C, L), but the data set gives "
                     f"flat vectors of shape {shape}; use model 'mlp' or a data set with an input_shape")


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


@register_model("mlp")
def build_mlp(input_shape: tuple[int, ...], num_outputs: int, width: int = 64, depth: int = 2,
              activation: str = "tanh", bias: bool = True) -> nn.Module:
    """MLP: ``depth`` hidden layers of ``width`` units (:func:`mlp`)."""
    return mlp(_prod(input_shape), width, depth, num_outputs, activation=activation, bias=bias)


@register_model("cnn")
def build_cnn(input_shape: tuple[int, ...], num_outputs: int, width: int = 16) -> nn.Module:
    """Small CNN: two 3x3 convolutions of ``width`` channels (:func:`small_cnn`)."""
    c, h, w = _image_shape("cnn", input_shape)
    return nn.Sequential(nn.Unflatten(1, (c, h, w)), *small_cnn(c, width, num_outputs, (h, w)))


@register_model("autoencoder")
def build_autoencoder(input_shape: tuple[int, ...], num_outputs: int, width: int = 1000, code: int = 30,
                      activation: str = "sigmoid", output: str = "sigmoid") -> nn.Module:
    """Deep autoencoder 784-1000-500-250-30 and back (:func:`autoencoder`); ``width`` = first hidden size."""
    n = _prod(input_shape)
    if num_outputs != n:
        raise ValueError(f"model 'autoencoder' reconstructs its input: it needs num_outputs == {n} input "
                         f"features, got {num_outputs}; train it with train.task='autoencoder'")
    return autoencoder(n, width, code, activation, output)


@register_model("resnet")
def build_resnet(input_shape: tuple[int, ...], num_outputs: int, width: int = 16, blocks: int = 1,
                 stages: int = 3) -> nn.Module:
    """Small ResNet of BasicBlocks (:func:`resnet`); ``width`` = channels of the first stage."""
    c, h, w = _image_shape("resnet", input_shape)
    return nn.Sequential(nn.Unflatten(1, (c, h, w)), *resnet(c, num_outputs, width, blocks, stages))


from . import transformer_models as _transformer_models  # noqa: E402,F401  (registers transformer_lm, vit)
