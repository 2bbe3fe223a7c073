"""Model options are checked when a model is built: every refusal is one ModelArgError that names the
model, the option and what it accepts. Parametrized over the registry, so a new model is covered."""

from __future__ import annotations

import inspect

import pytest
import torch

from mnistlab.errors import UserError
from mnistlab.models import ModelArgError, create_model, list_models, model_entry

ALL = list_models()


@pytest.mark.parametrize("name", ALL)
def test_defaults_build_and_give_logits(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)


@pytest.mark.parametrize("name", ALL)
def test_defaults_given_explicitly_fit_their_annotations(name):
    entry = model_entry(name)
    params = inspect.signature(entry.factory).parameters
    create_model(name, **{opt: params[opt].default for opt in entry.options})


@pytest.mark.parametrize("name", ALL)
def test_unknown_option_is_refused_with_the_options_listed(name):
    with pytest.raises(ModelArgError) as e:
        create_model(name, foo=1)
    message = str(e.value)
    assert message.startswith(f"{name} ") and "'foo'" in message
    for option in model_entry(name).options:
        assert option in message


def test_a_near_miss_suggests_the_option():
    with pytest.raises(ModelArgError, match="did you mean 'widths'"):
        create_model("cnn", width=[8, 16, 32])


def test_the_cell_is_fixed_by_the_model_name():
    with pytest.raises(ModelArgError, match="rnn has no option 'cell'.*fixes cell='rnn'"):
        create_model("rnn", cell="gru")


BAD = [
    # (model, options, the option the message must name, and a phrase from what it accepts)
    ("linear", dict(img_size=0), "img_size", "positive integer"),
    ("mlp", dict(hidden=-1), "hidden", "list of integers"),
    ("mlp", dict(hidden=[128, 0]), "hidden", "positive integers"),
    ("mlp", dict(hidden=[]), "hidden", "linear model"),
    ("mlp", dict(hidden="abc"), "hidden", "list of integers"),
    ("mlp", dict(activation="nope"), "activation", "relu"),
    ("mlp", dict(activation=1), "activation", "a string"),
    ("mlp", dict(dropout=1.5), "dropout", "[0, 1)"),
    ("mlp", dict(dropout="high"), "dropout", "number"),
    ("cnn", dict(widths="abc"), "widths", "list of integers"),
    ("cnn", dict(widths=[0, 32, 64]), "widths", "3 positive integers"),
    ("cnn", dict(widths=[16, 32]), "widths", "3 positive integers"),
    ("cnn", dict(widths=[16.5, 32, 64]), "widths", "list of integers"),
    ("cnn", dict(hidden=-1), "hidden", "non-negative"),
    ("cnn", dict(hidden="abc"), "hidden", "an integer"),
    ("cnn", dict(hidden=True), "hidden", "an integer"),
    ("cnn", dict(depth=0), "depth", "positive integer"),
    ("cnn", dict(stem_stride=3), "stem_stride", "one of 1, 2"),
    ("cnn", dict(stem_stride=True), "stem_stride", "one of 1, 2"),
    ("cnn", dict(stage1_stride=4), "stage1_stride", "one of 1, 2"),
    ("cnn", dict(pool_first="yes"), "pool_first", "true or false"),
    ("cnn", dict(head="max"), "head", "'flatten', 'avg'"),
    ("cnn", dict(whiten=True), "widths", "first width is even and at most 18 with whiten=true"),
    ("cnn", dict(whiten=True, widths=[15, 32, 64]), "widths", "try --model-arg widths=[16,48,96]"),
    ("cnn", dict(whiten="yes"), "whiten", "true or false"),
    ("cnn", dict(bn_momentum=0.0), "bn_momentum", "(0, 1]"),
    ("cnn", dict(dropout=-0.1), "dropout", "[0, 1)"),
    ("cnn", dict(dropout=float("nan")), "dropout", "finite"),
    ("rnn", dict(seq="diagonal"), "seq", "'rows', 'pixels', 'permuted'"),
    ("rnn", dict(hidden=0), "hidden", "positive integer"),
    ("gru", dict(layers=0), "layers", "positive integer"),
    ("gru", dict(bidirectional="True"), "bidirectional", "true or false"),
    ("lstm", dict(layers=1.5), "layers", "an integer"),
    ("lstm", dict(img_size=-28), "img_size", "positive integer"),
    ("vit", dict(patch=5), "patch", "divisor such as 2, 4, 7, 14"),
    ("vit", dict(patch=0), "patch", "positive integer"),
    ("vit", dict(heads=3), "heads", "divisor such as 2, 4, 8, 16, 32"),
    ("vit", dict(dim=0), "dim", "positive integer"),
    ("vit", dict(depth=0), "depth", "positive integer"),
    ("vit", dict(mlp_ratio=0), "mlp_ratio", "dim * mlp_ratio >= 1"),
    ("vit", dict(mlp_ratio=float("inf")), "mlp_ratio", "finite"),
    ("vit", dict(pool="max"), "pool", "'mean', 'cls'"),
    ("vit", dict(dropout=1.0), "dropout", "[0, 1)"),
]


@pytest.mark.parametrize(
    ("name", "options", "arg", "accepts"),
    BAD,
    ids=[f"{n}-{next(iter(o))}={next(iter(o.values()))!r}" for n, o, _, _ in BAD],
)
def test_bad_value_is_refused_naming_model_and_option(name, options, arg, accepts):
    with pytest.raises(ModelArgError) as e:
        create_model(name, **options)
    message = str(e.value)
    assert message.startswith(f"{name}: ") and not message.startswith(f"{name}: {name}")
    assert arg in message and accepts in message


def test_every_model_has_a_bad_value_case():
    assert {n for n, o, _, _ in BAD} | {n for n in ALL if not model_entry(n).options} == set(ALL)


@pytest.mark.parametrize(("key", "value"), [("in_chans", 0), ("num_classes", 0), ("num_classes", 2.0)])
def test_channels_and_classes_must_be_positive_integers(key, value):
    with pytest.raises(ModelArgError, match=f"cnn: {key} must be a positive integer"):
        create_model("cnn", **{key: value})


def test_values_as_parsed_from_the_command_line_are_accepted():
    # --model-arg values are JSON: lists, not tuples; 0 for a float; true for a bool
    assert create_model("cnn", widths=[8, 16, 32], dropout=0, stem_stride=2, head="avg")(
        torch.randn(2, 1, 28, 28)
    ).shape == (2, 10)
    assert create_model("gru", bidirectional=True, hidden=8, seq="rows").rnn.bidirectional
    assert create_model("vit", patch=4, dim=32, heads=2, depth=1, mlp_ratio=1).pos_embed.shape[1] == 49


def test_model_arg_error_is_a_user_error_and_a_value_error():
    assert issubclass(ModelArgError, UserError) and issubclass(ModelArgError, ValueError)


def test_cli_prints_a_bad_model_arg_as_one_line_with_exit_2(capsys):
    from mnistlab.cli import main

    assert main(["train", "--model", "vit", "--model-arg", "patch=5", "--dataset", "kmnist", "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "mnistlab: error: vit: patch=5 does not divide the image size 28; use a divisor such as 2, 4, 7, 14"
    )
