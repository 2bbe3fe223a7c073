"""The 'what the layers do' figures: each appears exactly for the models it fits, leaves the model as found,
and the numbers under them (attention rollout, penultimate features, PCA, t-SNE, class-mean cosines) are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import quick_few
from matplotlib.figure import Figure

from mnistlab.data.batches import to_input
from mnistlab.inspect.attention import (
    attention_heads_figure,
    attention_rollout,
    attention_rollout_figure,
    read_out,
    rollout_maps,
)
from mnistlab.inspect.features import (
    class_cosine_figure,
    class_mean_cosine,
    feature_map_figure,
    features_and_logits,
    one_per_class,
    pca,
    penultimate_features,
    tsne,
)
from mnistlab.inspect.filters import conv_stages, feature_maps_figure, filters_figure, stage_maps
from mnistlab.inspect.hidden import hidden_states, hidden_states_figure
from mnistlab.models import create_model, list_models
from mnistlab.plots import figure_png, pyplot

ALL = list_models()
CONV, ATTENTION, RECURRENT = {"lenet5", "cnn"}, {"vit"}, {"rnn", "gru", "lstm"}
MEAN, STD = 0.13, 0.31
CLASSES = [f"class {c}" for c in range(10)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """20 random uint8 images (20, 28, 28) and labels 0..9 twice."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (20, 28, 28), generator=g, dtype=torch.uint8), torch.arange(20) % 10


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name).eval()


def _no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", quick_few(ALL, {"linear", "rnn"}))  # conv and ViT figures: seconds each
def test_each_figure_appears_exactly_for_the_models_it_fits_and_leaves_the_model_as_found(name, images):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = images
    kw = dict(labels=y, classes=CLASSES)
    figs = {
        "filters": filters_figure(model),
        "feature_maps": feature_maps_figure(model, x, MEAN, STD, index=3, **kw),
        "attention_heads": attention_heads_figure(model, x, MEAN, STD, n_images=2, **kw),
        "attention_rollout": attention_rollout_figure(model, x, MEAN, STD, n_images=3, **kw),
        "hidden_states": hidden_states_figure(model, x, MEAN, STD, n_images=2, **kw),
    }
    expected = ({"filters", "feature_maps"} if name in CONV else set()) | (
        {"attention_heads", "attention_rollout"} if name in ATTENTION else set()) | (
        {"hidden_states"} if name in RECURRENT else set())
    assert {k for k, f in figs.items() if f is not None} == expected
    for f in figs.values():
        if f is not None:
            assert isinstance(f, Figure)
            assert figure_png(f, dpi=20).startswith(b"\x89PNG")  # lays out and renders
    assert not model.training and _no_hooks_left(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(getattr(m, "keep_weights", False) for m in model.modules())


@pytest.mark.parametrize("name", ALL)
def test_penultimate_features_are_forward_features_in_any_batch_size_with_or_without_logits(name, images):
    model = _model(name)
    x, y = images
    feats = penultimate_features(model, x, MEAN, STD, batch=7)  # batches of 7, 7 and 6
    with torch.no_grad():
        direct = model.forward_features(to_input(x, MEAN, STD))
    assert isinstance(feats, np.ndarray) and feats.shape == (len(x), direct.shape[1])
    np.testing.assert_allclose(feats, direct.numpy(), rtol=1e-4, atol=1e-5)
    both, logits = features_and_logits(model, x, MEAN, STD, batch=7)  # the final linear layer's input and output
    np.testing.assert_allclose(both, feats, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(to_input(x, MEAN, STD)), rtol=1e-4, atol=1e-5)
    fig, cos = class_cosine_figure(feats, y, CLASSES)
    assert isinstance(fig, Figure) and cos.shape == (10, 10)
    pyplot().close("all")


def _softmax_maps(layers: int, b: int = 2, heads: int = 3, t: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(b, heads, t, t, generator=g) * 2, -1) for _ in range(layers)]


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(6).expand(2, 4, 6, 6)
    torch.testing.assert_close(attention_rollout([eye] * 3), torch.eye(6).expand(2, 6, 6))


def test_rollout_rows_sum_to_one():
    r = attention_rollout(_softmax_maps(4))
    assert r.shape == (2, 5, 5) and (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))


def test_rollout_of_two_layers_matches_the_hand_computation():
    # layer 1: two heads, [[1,0],[0,1]] and [[0,1],[0,1]], average [[.5,.5],[0,1]];
    # + I and rows renormalised: [[.75,.25],[0,1]]
    a1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]  # (1, 2, 2, 2)
    # layer 2: one head, the swap [[0,1],[1,0]]; + I and renormalised: [[.5,.5],[.5,.5]]
    a2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, None]
    # R = A2 A1 = [[.5*.75 + .5*0, .5*.25 + .5*1], ...] = [[.375, .625], [.375, .625]]; A1 A2 would give all .5
    torch.testing.assert_close(attention_rollout([a1, a2]), torch.tensor([[[0.375, 0.625], [0.375, 0.625]]]))
    # without the residual's identity: the plain product of the head averages, [[0,1],[1,0]] [[.5,.5],[0,1]]
    torch.testing.assert_close(attention_rollout([a1, a2], add_identity=False),
                               torch.tensor([[[0.0, 1.0], [0.5, 0.5]]]))


def test_rollout_matches_a_reference_loop():
    maps = _softmax_maps(3, b=2, heads=4, t=4, seed=1)
    b, heads, t = 2, 4, 4
    expected = torch.zeros(b, t, t)
    for n in range(b):
        rollout = [[float(i == j) for j in range(t)] for i in range(t)]  # identity: no layer yet
        for a in maps:
            layer = [[sum(float(a[n, h, i, j]) for h in range(heads)) / heads + (i == j) for j in range(t)]
                     for i in range(t)]
            layer = [[v / sum(row) for v in row] for row in layer]
            rollout = [[sum(layer[i][k] * rollout[k][j] for k in range(t)) for j in range(t)] for i in range(t)]
        expected[n] = torch.tensor(rollout)
    torch.testing.assert_close(attention_rollout(maps), expected)


def test_rollout_is_read_from_the_class_token_row_or_the_mean_of_rows_by_pooling():
    mean_vit, cls_vit = create_model("vit", pool="mean"), create_model("vit", pool="cls")
    r = torch.softmax(torch.randn(1, 17, 17), -1)  # 1 class token + 16 patches
    cls_row = r[0, 0, 1:] / r[0, 0, 1:].sum()
    torch.testing.assert_close(read_out(cls_vit, r), cls_row.reshape(1, 4, 4))
    r = torch.softmax(torch.randn(1, 16, 16), -1)  # 16 patches
    torch.testing.assert_close(read_out(mean_vit, r), r[0].mean(0).reshape(1, 4, 4))
    x = to_input(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), MEAN, STD)
    for vit in (mean_vit.eval(), cls_vit.eval()):
        logits, roll = rollout_maps(vit, x)
        assert logits.shape == (2, 10) and roll.shape == (2, 4, 4)
        torch.testing.assert_close(roll.sum((1, 2)), torch.ones(2))


def test_conv_stages_are_each_conv_with_its_activation_and_their_maps_shrink():
    cnn, lenet = _model("cnn"), _model("lenet5")
    assert [type(out).__name__ for _, _, out in conv_stages(cnn)] == ["ReLU"] * 3
    assert [type(out).__name__ for _, _, out in conv_stages(lenet)] == ["Tanh"] * 3
    assert conv_stages(_model("vit")) == []  # the patch embedding is no conv layer
    x = to_input(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), MEAN, STD)
    logits, maps = stage_maps(cnn, x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 28, 28), (2, 64, 14, 14), (2, 128, 7, 7)]
    assert (maps[0] >= 0).all()  # after the ReLU, not the conv's raw output
    torch.testing.assert_close(logits, cnn(x))


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_hidden_states_are_the_unrolled_h_t_and_the_head_on_the_last_gives_the_logits(name):
    model = _model(name)
    x = to_input(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), MEAN, STD)
    logits, h = hidden_states(model, x)
    assert h.shape == (2, 28, 128)
    _, steps = model.unrolled(x)  # the cell equations written out, one step at a time
    torch.testing.assert_close(h, torch.stack(steps, 1).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.head(h[:, -1]), logits)


def test_class_mean_cosine_is_symmetric_with_a_unit_diagonal():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(300, 16)) + 0.5, np.arange(300) % 7
    for center in (True, False):
        cos = class_mean_cosine(feats, labels, 7, center)
        np.testing.assert_array_equal(cos, cos.T)
        np.testing.assert_array_equal(np.diag(cos), np.ones(7))
        assert (cos >= -1 - 1e-9).all() and (cos <= 1 + 1e-9).all()


def test_class_mean_cosine_by_hand_and_a_missing_class_is_nan():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # class means (2, 0) and (0, 2)
    labels = np.array([0, 0, 1])
    np.testing.assert_allclose(class_mean_cosine(feats, labels, 2, center=False), [[1, 0], [0, 1]])
    # minus their mean (1, 1): (1, -1) and (-1, 1), opposite
    np.testing.assert_allclose(class_mean_cosine(feats, labels, 2, center=True), [[1, -1], [-1, 1]])
    cos = class_mean_cosine(feats, labels, 3, center=False)
    assert np.isnan(cos[2]).all() and np.isnan(cos[:, 2]).all() and cos[0, 1] == 0


def test_pca_matches_an_svd_up_to_sign_and_reports_the_variance_fraction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    coords, explained = pca(x, 2)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(xc @ vt[:2].T), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(explained, (s[:2] ** 2) / (s**2).sum(), rtol=1e-5)


def test_feature_map_figure_draws_pca_and_tsne_with_a_legend_of_class_names():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(40, 8)).astype(np.float32), np.arange(40) % 10
    fig = feature_map_figure(feats, labels, CLASSES, tsne_points=30)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == CLASSES
    assert "30" in fig.axes[1].get_title()  # the subsample's size is said
    pyplot().close(fig)


def test_tsne_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(120, 60)) + np.repeat(np.eye(60)[:3] * 6, 40, axis=0)).astype(np.float32)
    idx_a, a = tsne(feats, n_points=90, seed=3)
    idx_b, b = tsne(feats, n_points=90, seed=3)
    idx_c, c = tsne(feats, n_points=90, seed=4)
    assert a.shape == (90, 2) and len(set(idx_a.tolist())) == 90
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(idx_a, idx_c) and not np.allclose(a, c)


def test_one_per_class_takes_each_class_in_turn():
    labels = np.array([3, 1, 1, 0, 3, 0, 2])
    assert one_per_class(labels, 4) == [3, 1, 6, 0]  # the first 0, 1, 2 and 3
    assert one_per_class(labels, 6) == [3, 1, 6, 0, 5, 2]
    assert one_per_class(labels, 50) == [3, 1, 6, 0, 5, 2, 4]  # every image once, no more


def test_per_class_chart_titled_worst_first_puts_the_worst_class_on_top():
    from mnistlab.inspect.predictions import draw_per_class_accuracy

    accuracy = torch.tensor([0.9, 0.2, 0.99, 0.5], dtype=torch.float64)
    classes = ["ok", "worst", "best", "middle"]
    fig, ax = pyplot().subplots()
    draw_per_class_accuracy(ax, accuracy, classes)
    fig.canvas.draw()
    # tick labels from the top of the figure down (display y grows upwards)
    labels = sorted(ax.get_yticklabels(), key=lambda t: -t.get_window_extent().y0)
    assert [t.get_text() for t in labels] == ["worst", "middle", "ok", "best"]
    assert "worst first" in ax.get_title()
    pyplot().close(fig)
