"""Layers and models for the scratch engine: Module, Linear, Conv2d, Sequential, MLP, CNN.

Initialisation follows torch's defaults (uniform in +-1/sqrt(fan_in) for weights and biases, which
is what kaiming_uniform_(a=sqrt(5)) works out to), so that both engines start from the same kind
of weights. Parameter names follow torch's (`body.1.weight`), so state dicts line up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mnistlab.scratch import functional as F
from mnistlab.scratch.engine import Tensor, tensor

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator behind initial weights and dropout masks (as torch.manual_seed)."""
    global _rng
    _rng = np.random.default_rng(seed)


def get_rng() -> np.random.Generator:
    return _rng


class Module:
    """Holds parameters (Tensors that require gradients) and sub-modules, found by attribute."""

    training = True

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and value.requires_grad:
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        own = dict(self.named_parameters())
        if set(own) != set(state):
            raise ValueError(f"state dict keys differ: missing {sorted(set(own) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(own))}")
        for name, p in own.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {value.shape} in the state dict, {p.shape} in the model")
            p.data = value.astype(p.dtype).copy()


def _uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
    bound = 1.0 / np.sqrt(fan_in)
    return tensor(_rng.uniform(-bound, bound, shape).astype(np.float32), requires_grad=True)


class Linear(Module):
    """y = x W^T + b: x (N, in) -> (N, out); W (out, in) as torch stores it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.weight = _uniform((out_features, in_features), in_features)
        self.bias = _uniform((out_features,), in_features) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


class Conv2d(Module):
    """Square kernels; x (N, C, H, W) -> (N, out, OH, OW)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int = 1, padding: int = 0):
        fan_in = in_chans * kernel * kernel
        self.weight = _uniform((out_chans, in_chans, kernel, kernel), fan_in)
        self.bias = _uniform((out_chans,), fan_in)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class Activation(Module):
    def __init__(self, name: str):
        if name not in F.ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; choose from {', '.join(F.ACTIVATIONS)}")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return F.ACTIVATIONS[self.name](x)


class MaxPool2d(Module):
    def __init__(self, kernel: int = 2):
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel)


class Flatten(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)  # (N, C, H, W) -> (N, C*H*W)


class Dropout(Module):
    def __init__(self, p: float):
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, _rng)


class Sequential(Module):
    def __init__(self, *layers: Module):
        self.layers = list(layers)
        for i, layer in enumerate(layers):  # named "0", "1", ... as in torch
            setattr(self, str(i), layer)

    def children(self) -> Iterator[tuple[str, Module]]:
        return ((str(i), layer) for i, layer in enumerate(self.layers))

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for name, layer in self.children():
            yield from layer.named_parameters(f"{prefix}{name}.")

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MLP(Module):
    """The torch zoo's `mlp` layer for layer: flatten, (Linear, activation[, dropout]) per hidden size, head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 28,
                 hidden: Sequence[int] = (256, 128), activation: str = "relu", dropout: float = 0.0):
        layers: list[Module] = [Flatten()]
        width = in_chans * img_size * img_size
        for h in hidden:
            layers += [Linear(width, h), Activation(activation)]
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = h
        self.body = Sequential(*layers)
        self.head = Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, hidden[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class CNN(Module):
    """A small CNN without BatchNorm: two conv-ReLU-pool stages (28 -> 14 -> 7) and two linear layers."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 28,
                 widths: Sequence[int] = (16, 32), hidden: int = 128, dropout: float = 0.0):
        if len(widths) != 2:
            raise ValueError("scratch cnn: widths has 2 entries")
        c1, c2 = widths
        self.features = Sequential(
            Conv2d(in_chans, c1, 3, padding=1), Activation("relu"), MaxPool2d(2),  # (N, c1, 14, 14)
            Conv2d(c1, c2, 3, padding=1), Activation("relu"), MaxPool2d(2),  # (N, c2, 7, 7)
            Flatten(),
        )
        side = img_size // 4
        self.fc = Sequential(Linear(c2 * side * side, hidden), Activation("relu"))
        self.dropout = Dropout(dropout)
        self.head = Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))  # (N, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.forward_features(x)))


MODELS: dict[str, type[Module]] = {"mlp": MLP, "cnn": CNN}


def create_model(name: str, **kwargs) -> Module:
    """A scratch model by name (mlp or cnn) with the zoo's interface (in_chans, num_classes)."""
    if name not in MODELS:
        raise ValueError(f"the scratch engine has no model {name!r}; it has {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
