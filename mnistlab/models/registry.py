"""Models registered by name, one interface for all (after timm's `register_model`).

Every model: `__init__(in_chans=1, num_classes=10, **options)`, `forward(x) -> logits` with x of
shape (B, in_chans, 28, 28) and logits (B, num_classes) (no softmax inside: the loss applies
log-softmax itself, more stably), and `forward_features(x) -> (B, D)`, the penultimate
representation used by later plots (embeddings, t-SNE).

A model's options are the parameters of its constructor, listed explicitly (no **kwargs), with
type annotations. `create_model` checks names and types against that signature, so a model file
only checks what its annotations cannot say (ranges, divisibility) with `check_arg` and
`check_positive`. Every refused
option is a `ModelArgError` whose message names the model, the option and what it accepts.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from mnistlab.errors import UserError


class ModelArgError(UserError, ValueError):
    """A model option that is unknown, of the wrong type or out of range (the CLI prints it, exit 2)."""


def check_arg(ok: bool, name: str, accepts: str, value: object) -> None:
    """Refuse option `name` unless `ok`: '<name> must be <accepts>, got <value>'."""
    if not ok:
        raise ModelArgError(f"{name} must be {accepts}, got {value!r}")


def check_positive(**values: int) -> None:
    """Refuse any option in `values` (name=value) below 1: sizes, counts, strides."""
    for name, value in values.items():
        check_arg(value >= 1, name, "a positive integer", value)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)  # arguments the entry sets itself (an rnn's cell)
    options: dict[str, Any] = field(default_factory=dict)  # option name -> its type annotation, in order


_REGISTRY: dict[str, ModelEntry] = {}
_ALWAYS = ("in_chans", "num_classes")  # create_model's own arguments, not options


def register_model(
    name: str, description: str, fixed: dict[str, Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model class or factory creatable by `name`; `fixed` arguments are not options."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        params = inspect.signature(factory).parameters
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
            raise TypeError(f"model {name!r}: list the options in the signature, not as *args/**kwargs")
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
        options = {p: hints.get(p, Any) for p in params if p not in _ALWAYS and p not in (fixed or {})}
        _REGISTRY[name] = ModelEntry(name, factory, description, dict(fixed or {}), options)
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
    """The registry entry for `name`; an unknown name is a UserError listing the known ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def _conforms(value: object, hint: Any) -> bool:
    """Whether `value` (as parsed from JSON, or a Python default) fits the annotation `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:  # type too: True == 1, but True is no stride
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Sequence, list, tuple):
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0] if args else Any) for v in value)
    return True  # an annotation this checker does not know: the model checks it


def _describe(hint: Any) -> str:
    """What `hint` accepts, in words: 'an integer', 'a list of integers', "one of 'cls', 'mean'"."""
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    args = typing.get_args(hint)
    if args:
        item = _describe(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {item if item.endswith('s') else item + 's'}"
    return str(hint)


def _refuse_unknown(entry: ModelEntry, kwargs: dict[str, Any]) -> None:
    """Refuse a key that is not one of `entry`'s options, listing the options it has."""
    known = list(entry.options)
    for key in kwargs:
        if key in entry.options:
            continue
        if not known:
            raise ModelArgError(f"{entry.name} takes no options, got {key!r}")
        close = difflib.get_close_matches(key, known, n=1)
        if key in entry.fixed:
            guess = f" (the name {entry.name!r} fixes {key}={entry.fixed[key]!r}; pick another model instead)"
        else:
            guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelArgError(f"{entry.name} has no option {key!r}{guess}; its options: {', '.join(known)}")


def create_model(name: str, in_chans: int = 1, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the model registered as `name`; a bad option is a ModelArgError naming model and option."""
    entry = model_entry(name)
    _refuse_unknown(entry, kwargs)
    try:
        for key, value in (("in_chans", in_chans), ("num_classes", num_classes)):
            check_arg(_conforms(value, int) and value >= 1, key, "a positive integer", value)
        for key, value in kwargs.items():
            check_arg(_conforms(value, entry.options[key]), key, _describe(entry.options[key]), value)
        return entry.factory(in_chans=in_chans, num_classes=num_classes, **entry.fixed, **kwargs)
    except ModelArgError as e:  # from the checks above or the model's own: say which model
        e.args = (f"{name}: {e}",)
        raise
