"""Small building blocks shared by the model families."""

from __future__ import annotations

import torch.nn as nn

from mnistlab.models.registry import ModelArgError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name; an unknown name is a ModelArgError listing ACTIVATIONS."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ModelArgError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}") from None
