"""Every registered model, through one interface: shapes, backward, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from mnistlab.checkpoint import load_model, save_checkpoint
from mnistlab.models import create_model, list_models
from mnistlab.models.flops import count_params, forward_flops

ALL = list_models()


@pytest.fixture(autouse=True)
def one_thread():
    """Batches of 2-16 images: a second BLAS thread adds no speed, only a barrier per op that stalls for a
    whole scheduler slice whenever the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_holds_the_first_models():
    assert {"linear", "mlp", "lenet5", "cnn"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_output_shape_and_features(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(3, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (3, 7)
    feats = model.forward_features(x)
    assert feats.ndim == 2 and feats.shape[0] == 3
    # logits, not probabilities or log-probabilities: no softmax or log_softmax inside
    assert not torch.allclose(logits.sum(1), torch.ones(3))
    assert not torch.allclose(logits.exp().sum(1), torch.ones(3))


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name).eval()
    # a non-default state (BatchNorm running stats included) must survive the trip
    model.train()
    model(torch.randn(16, 1, 28, 28))
    model.eval()
    meta = dict(model=name, model_kwargs={}, in_chans=1, num_classes=10, step=0)
    save_checkpoint(tmp_path / "c.safetensors", model, meta)
    loaded, meta2 = load_model(tmp_path / "c.safetensors")
    state, state2 = model.state_dict(), loaded.state_dict()
    assert state.keys() == state2.keys()
    for k in state:
        assert torch.equal(state[k], state2[k]), k  # bit for bit
    # the same function; the loaded model may hold its weights in another memory format (channels-last),
    # whose kernels sum in another order
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert meta2["model"] == name


@pytest.mark.parametrize("name", ALL)
def test_params_and_flops_are_counted(name):
    model = create_model(name)
    assert count_params(model) > 1000
    assert forward_flops(model) >= 2 * 7840  # at least the first linear map's worth


def test_unknown_model_and_bad_kwarg_are_user_errors():
    from mnistlab.errors import UserError

    with pytest.raises(UserError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")
    with pytest.raises(UserError, match="colour"):
        create_model("cnn", colour="blue")
    with pytest.raises(UserError, match="unknown activation 'swish'"):
        create_model("mlp", activation="swish")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "softplus", "gelu", "tanh", "sigmoid"])
def test_mlp_activations(activation):
    model = create_model("mlp", hidden=[32], activation=activation)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_lenet5_has_the_classic_parameter_count():
    # C1 156 + C3 2,416 + C5 48,120 + F6 10,164 + output 850 (full C3 table, linear output)
    assert count_params(create_model("lenet5")) == 61_706


FAST_CNN = dict(widths=[16, 32, 64], stem_stride=2, hidden=512)


def test_cnn_pool_first_normalizes_the_pooled_values():
    """pool_first: conv -> max-pool -> BatchNorm -> ReLU in each stage that pools, the same parameters as the
    usual order, and the BatchNorm's statistics are those of the pooled values (measured: its running mean after
    one training-mode batch from zero, with momentum 1, is the mean of the pooled conv output)."""
    usual, first = (create_model("cnn", **FAST_CNN, pool_first=p) for p in (False, True))
    assert count_params(usual) == count_params(first)
    blocks = [m for m in first.features if isinstance(m, torch.nn.Sequential)]
    kinds = [[type(layer).__name__ for layer in block] for block in blocks]
    assert kinds == [["Conv2d", "BatchNorm2d", "ReLU"]] + [["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]] * 2
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in first.features if not isinstance(m, torch.nn.Sequential))
    assert isinstance(first.pool, torch.nn.Flatten)  # the head's 7 -> 3 pool is the last block's
    conv, pool, norm, _ = blocks[1]
    norm.momentum, norm.running_mean = 1.0, torch.zeros_like(norm.running_mean)
    x = torch.randn(8, 1, 28, 28)
    first.train()
    first(x)
    with torch.no_grad():
        pooled = pool(conv(blocks[0](x)))  # (8, 32, 7, 7)
    torch.testing.assert_close(norm.running_mean, pooled.mean(dim=(0, 2, 3)))
    assert first.features(x).shape == (8, 64, 3, 3) and first(x).shape == (8, 10)


def test_cnn_stage1_stride_replaces_the_second_pool_by_a_strided_conv():
    model = create_model("cnn", **FAST_CNN, stage1_stride=2)
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.features.modules())  # both done by strides
    assert count_params(model) == count_params(create_model("cnn", **FAST_CNN))
    assert model.features(torch.randn(2, 1, 28, 28)).shape == (2, 64, 7, 7)


def test_cnn_whiten_makes_the_stem_decorrelate_the_patches_it_reads_and_keeps_it_fixed():
    """whiten=true: after init_from_data, the first conv's 9 filters take the images' 3x3 patches (at its stride)
    to outputs of unit variance and zero correlation, the other 9 are their negatives, and training leaves them
    alone (not trainable); without whiten, init_from_data changes nothing."""
    torch.manual_seed(0)
    # correlated patches, as images have: noise plus noise smoothed along the rows only (so a filter laid out
    # transposed would not decorrelate them; every direction keeps variance >= 1, so the small floor added to
    # each variance, WHITEN_EPS, moves the result by less than the tolerance)
    noise = torch.randn(64, 1, 28, 30)
    x = noise[..., 1:-1] + 3 * torch.nn.functional.avg_pool2d(noise, (1, 3), stride=1)  # (64, 1, 28, 28)
    model = create_model("cnn", widths=[18, 16, 32], stem_stride=2, hidden=32, pool_first=True, whiten=True)
    model.init_from_data(lambda: x)
    stem = model.features[0][0]
    assert not stem.weight.requires_grad
    filters = stem.weight.reshape(18, 9)
    torch.testing.assert_close(filters[9:], -filters[:9])
    # measured on the conv's own outputs (channels-last, as in training), so the filters' layout is checked too
    with torch.no_grad():
        out = stem.to(memory_format=torch.channels_last)(x)  # (64, 18, 14, 14)
    out = torch.cov(out.transpose(0, 1).reshape(18, -1)[:9])  # (9, 9) over every image and position
    torch.testing.assert_close(out, torch.eye(9), atol=0.05, rtol=0)
    before = stem.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(64, dtype=torch.long)).backward()
    optimizer.step()
    assert stem.weight.grad is None and torch.equal(stem.weight, before)
    # widths[0] = 16 keeps the 8 directions of largest variance: the same filters less the last
    fewer = create_model("cnn", widths=[16, 16, 32], stem_stride=2, hidden=32, whiten=True)
    fewer.init_from_data(lambda: x)
    torch.testing.assert_close(fewer.features[0][0].weight.reshape(16, 9)[:8], filters[:8])
    # filter i has norm 1 / sqrt(variance i): the filters come in order of falling variance, so the one dropped
    # had the least
    assert (filters[:9].norm(dim=1).diff() > 0).all()
    plain = create_model("cnn", **FAST_CNN)
    weights = plain.features[0][0].weight.clone()
    plain.init_from_data(lambda: x)
    assert torch.equal(plain.features[0][0].weight, weights)


def test_cnn_bn_momentum_sets_every_batchnorm():
    model = create_model("cnn", **FAST_CNN, bn_momentum=0.03)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.03}
