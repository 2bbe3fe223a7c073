"""Models registered by name, one interface for all (after timm's `register_model`).

Every model: `__init__(in_chans=1, num_classes=10, **kwargs)`, `forward(x) -> logits` with x of
shape (B, in_chans, 28, 28) and logits (B, num_classes) (no softmax inside: the loss applies
log-softmax itself, more stably), and `forward_features(x) -> (B, D)`, the penultimate
representation used by later plots (embeddings, t-SNE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from mnistlab.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model class or factory creatable by `name`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, factory, description)
        return factory

    return wrap


def _ensure_loaded() -> None:
    # Importing the family modules runs their @register_model decorators.
    from mnistlab.models import linear, mlp, lenet, cnn, rnn, vit  # noqa: F401, I001  (order = listing order)


def list_models() -> list[str]:
    """Names of all registered models, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def create_model(name: str, in_chans: int = 1, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the model registered as `name`; unknown keyword arguments are a UserError."""
    entry = model_entry(name)
    try:
        return entry.factory(in_chans=in_chans, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:  # an unknown keyword, or a value the model rejects
        raise UserError(f"model {name!r}: {e}") from e
