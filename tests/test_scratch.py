"""The scratch engine against PyTorch: every op's values and input gradients, finite differences, whole models.

Ops are compared in float64 with a random upstream gradient (not just ones, which would hide a
transposed or mis-summed gradient). Tolerances are stated per op: 1e-9 where both sides compute the
same formula, looser where we approximate (erf in gelu).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mnistlab.scratch import functional as F
from mnistlab.scratch import nn, optim, tensor
from mnistlab.scratch.engine import no_grad

SETTINGS = settings(max_examples=25, deadline=None)
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def check(scratch_fn, torch_fn, *arrays, atol=1e-9, rtol=1e-7, seed=0):
    """Run both engines on float64 copies of `arrays`; compare outputs and every input's gradient."""
    xs = [tensor(a.astype(np.float64), requires_grad=True) for a in arrays]
    ts = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in arrays]
    out, tout = scratch_fn(*xs), torch_fn(*ts)
    np.testing.assert_allclose(out.data, tout.detach().numpy(), atol=atol, rtol=rtol)
    upstream = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(upstream)
    tout.backward(torch.tensor(upstream))
    for x, t in zip(xs, ts, strict=True):
        np.testing.assert_allclose(x.grad, t.grad.numpy(), atol=atol * 10, rtol=rtol * 10)


def floats(shape, lo=-3.0, hi=3.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(lo, hi, allow_nan=False, width=64))


small_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)

UNARY = {
    "neg": (lambda x: -x, lambda t: -t, 1e-12),
    "exp": (lambda x: x.exp(), torch.exp, 1e-9),
    "relu": (lambda x: x.relu(), torch.relu, 1e-12),
    "leaky_relu": (lambda x: x.leaky_relu(0.01), lambda t: TF.leaky_relu(t, 0.01), 1e-12),
    "sigmoid": (lambda x: x.sigmoid(), torch.sigmoid, 1e-12),
    "tanh": (lambda x: x.tanh(), torch.tanh, 1e-12),
    "softplus": (lambda x: x.softplus(), lambda t: TF.softplus(t, threshold=50), 1e-12),
    "gelu": (lambda x: x.gelu(), TF.gelu, 2e-7),  # erf from a rational approximation, |error| < 1.2e-7
    "square": (lambda x: x**2, lambda t: t**2, 1e-12),
    "log_softmax": (lambda x: x.log_softmax(-1), lambda t: t.log_softmax(-1), 1e-12),
}


@pytest.mark.parametrize("name", list(UNARY))
@SETTINGS
@given(data=st.data())
def test_unary_op_matches_torch(name, data):
    shape = data.draw(small_shapes)
    a = data.draw(floats(shape))
    f, tf, atol = UNARY[name]
    check(f, tf, a, atol=atol)


@SETTINGS
@given(a=floats(hnp.array_shapes(max_dims=3, max_side=5), 0.1, 5.0), p=st.sampled_from([0.5, 3.0, -1.0]))
def test_log_and_pow_on_positive_inputs_match_torch(a, p):
    check(lambda x: x.log(), torch.log, a)
    check(lambda x: x**p, lambda t: t**p, a, rtol=1e-6)


BINARY = {
    "add": (lambda x, y: x + y, lambda s, t: s + t),
    "sub": (lambda x, y: x - y, lambda s, t: s - t),
    "mul": (lambda x, y: x * y, lambda s, t: s * t),
    "div": (lambda x, y: x / (y * y + 0.5), lambda s, t: s / (t * t + 0.5)),  # denominator kept away from 0
}


@pytest.mark.parametrize("name", list(BINARY))
@SETTINGS
@given(data=st.data())
def test_broadcasting_binary_op_matches_torch(name, data):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4))
    a, b = data.draw(floats(shapes.input_shapes[0])), data.draw(floats(shapes.input_shapes[1]))
    f, tf = BINARY[name]
    check(f, tf, a, b)


@SETTINGS
@given(data=st.data())
def test_matmul_with_broadcast_batch_axes_matches_torch(data):
    n, k, m = (data.draw(st.integers(1, 5)) for _ in range(3))
    batch = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3))
    a = data.draw(floats((*batch.input_shapes[0], n, k)))
    b = data.draw(floats((*batch.input_shapes[1], k, m)))
    check(lambda x, y: x @ y, torch.matmul, a, b)


@SETTINGS
@given(data=st.data())
def test_reductions_match_torch(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=5))
    a = data.draw(floats(shape))
    axis = data.draw(st.none() | st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple))
    keep = data.draw(st.booleans())
    dims = tuple(range(len(shape))) if axis is None else axis
    check(lambda x: x.sum(axis, keep), lambda t: t.sum(dims, keepdim=keep), a)
    check(lambda x: x.mean(axis, keep), lambda t: t.mean(dims, keepdim=keep), a)
    check(lambda x: x.max(axis, keep), lambda t: t.amax(dims, keepdim=keep), a)


def test_max_shares_the_gradient_between_tied_maxima_like_amax():
    a = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    check(lambda x: x.max(1), lambda t: t.amax(1), a)


@SETTINGS
@given(data=st.data())
def test_reshape_transpose_and_indexing_match_torch(data):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4))
    a = data.draw(floats(shape))
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    check(lambda x: x.transpose(*perm), lambda t: t.permute(perm), a)
    check(lambda x: x.reshape(-1, shape[-1]), lambda t: t.reshape(-1, shape[-1]), a)
    rows = np.array(data.draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, max_size=6)))  # repeats allowed
    check(lambda x: x[rows], lambda t: t[torch.from_numpy(rows)], a)
    check(lambda x: x[:, 1:], lambda t: t[:, 1:], a)


@SETTINGS
@given(data=st.data())
def test_cross_entropy_matches_torch(data):
    n, k = data.draw(st.integers(1, 8)), data.draw(st.integers(2, 6))
    logits = data.draw(floats((n, k), -10, 10))
    y = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    eps = data.draw(st.sampled_from([0.0, 0.1]))
    check(lambda x: F.cross_entropy(x, y, eps),
          lambda t: TF.cross_entropy(t, torch.from_numpy(y), label_smoothing=eps), logits)


@SETTINGS
@given(data=st.data())
def test_conv2d_matches_torch(data):
    n, c, o = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    k, stride, pad = data.draw(st.sampled_from([1, 2, 3])), data.draw(st.integers(1, 2)), data.draw(st.integers(0, 2))
    h, w = data.draw(st.integers(k, 9)), data.draw(st.integers(k, 9))
    x, wt, b = data.draw(floats((n, c, h, w))), data.draw(floats((o, c, k, k))), data.draw(floats((o,)))
    check(lambda x_, w_, b_: F.conv2d(x_, w_, b_, stride, pad),
          lambda x_, w_, b_: TF.conv2d(x_, w_, b_, stride=stride, padding=pad), x, wt, b)


@SETTINGS
@given(data=st.data())
def test_max_pool2d_matches_torch(data):
    k = data.draw(st.sampled_from([2, 3]))
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(k, 9)),
             data.draw(st.integers(k, 9)))
    # distinct values: with ties, which element "wins" is a convention, not a gradient
    a = np.random.default_rng(data.draw(st.integers(0, 1000))).permutation(int(np.prod(shape))).reshape(shape) * 0.1
    check(lambda x: F.max_pool2d(x, k), lambda t: TF.max_pool2d(t, k), a)


def test_dropout_zeroes_about_p_scales_the_rest_and_routes_the_gradient_through_the_mask():
    x = tensor(np.ones((200, 100)), requires_grad=True)
    y = F.dropout(x, 0.3, training=True, rng=np.random.default_rng(0))
    kept = y.data != 0
    assert abs(1 - kept.mean() - 0.3) < 0.01
    np.testing.assert_allclose(y.data[kept], 1 / 0.7)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, y.data)  # d(mask * x / (1-p))/dx = mask / (1-p)
    assert F.dropout(x, 0.3, training=False, rng=np.random.default_rng(0)) is x


def test_gradient_of_a_reused_node_sums_over_its_paths():
    x = tensor(np.array([[2.0]]), requires_grad=True)
    y = x * x + x.exp() * x  # x used four times
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * 2.0 + np.exp(2.0) * (1 + 2.0))


def finite_difference(f, a, eps=1e-6):
    """Central differences of scalar f at every element of a: (f(a + eps e_i) - f(a - eps e_i)) / 2 eps."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        hi, lo = a.copy(), a.copy()
        hi[i] += eps
        lo[i] -= eps
        g[i] = (f(hi) - f(lo)) / (2 * eps)
    return g


_W = np.random.default_rng(1).standard_normal((3, 3, 3, 3))
_B = np.random.default_rng(2).standard_normal((6, 2))
FD_CASES = {  # name: (input shape, scalar-or-tensor function of one Tensor)
    "add_broadcast": ((4, 6), lambda x: x + tensor(_B[:, 0])),
    "sub": ((4, 6), lambda x: 1.5 - x),
    "mul": ((4, 6), lambda x: x * x * 0.5),
    "div": ((4, 6), lambda x: x / (x * x + 1.0)),
    "neg": ((4, 6), lambda x: -x),
    "pow": ((4, 6), lambda x: x**3),
    "exp": ((4, 6), lambda x: x.exp()),
    "log": ((4, 6), lambda x: (x * x + 1.0).log()),
    "relu": ((4, 6), lambda x: x.relu()),
    "leaky_relu": ((4, 6), lambda x: x.leaky_relu(0.1)),
    "sigmoid": ((4, 6), lambda x: x.sigmoid()),
    "tanh": ((4, 6), lambda x: x.tanh()),
    "softplus": ((4, 6), lambda x: x.softplus()),
    "gelu": ((4, 6), lambda x: x.gelu()),
    "log_softmax": ((4, 6), lambda x: x.log_softmax(-1)),
    "sum": ((4, 6), lambda x: x.sum(0)),
    "mean": ((4, 6), lambda x: x.mean(1, keepdims=True)),
    "max": ((4, 6), lambda x: x.max(1)),
    "reshape_transpose": ((4, 6), lambda x: x.reshape(2, 12).T),
    "index": ((4, 6), lambda x: x[np.array([0, 2, 2])]),
    "matmul": ((4, 6), lambda x: x @ tensor(_B)),
    "conv2d": ((2, 3, 5, 5), lambda x: F.conv2d(x, tensor(_W), None, 1, 1)),
    "conv2d_stride2": ((2, 3, 6, 6), lambda x: F.conv2d(x, tensor(_W), None, 2, 0)),
    "max_pool2d": ((2, 3, 6, 6), lambda x: F.max_pool2d(x, 2)),
    "dropout": ((4, 6), lambda x: F.dropout(x, 0.5, True, np.random.default_rng(0))),
    "cross_entropy": ((4, 6), lambda x: F.cross_entropy(x, np.array([0, 5, 2, 3]), 0.1)),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_gradient_matches_central_finite_differences(name):
    shape, f = FD_CASES[name]
    a = np.random.default_rng(3).standard_normal(shape)
    out_shape = f(tensor(a)).shape
    weights = np.random.default_rng(4).standard_normal(out_shape)  # a random linear functional of the output

    def scalar(arr):
        return float((f(tensor(arr)).data * weights).sum())

    x = tensor(a, requires_grad=True)
    (f(x) * tensor(weights)).sum().backward()
    np.testing.assert_allclose(x.grad, finite_difference(scalar, a), atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # starts a process
def test_importing_scratch_leaves_torch_unloaded():
    code = "import sys, mnistlab.scratch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_grad_builds_no_graph():
    x = tensor(np.ones((2, 2)), requires_grad=True)
    with no_grad():
        y = (x * 2).sum()
    assert not y.requires_grad and y._parents == ()


# ---- whole models ---------------------------------------------------------------------------

def torch_twin(model: nn.Module) -> torch.nn.Module:
    """The same architecture in torch, with the scratch model's weights copied in (float64)."""
    if isinstance(model, nn.MLP):
        from mnistlab.models.mlp import MLP

        twin = MLP(hidden=(32, 16), activation="tanh")
    else:
        twin = torch.nn.Sequential()
        twin.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten())
        twin.fc = torch.nn.Sequential(torch.nn.Linear(8 * 49, 16), torch.nn.ReLU())
        twin.head = torch.nn.Linear(16, 10)
    twin = twin.double()
    state = {k: torch.from_numpy(v.astype(np.float64)) for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)  # same names: a mismatch fails here
    return twin


def make_scratch(kind: str) -> nn.Module:
    nn.manual_seed(0)
    if kind == "mlp":
        return nn.MLP(hidden=(32, 16), activation="tanh")
    return nn.CNN(widths=(4, 8), hidden=16)


def batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)), rng.integers(0, 10, n)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_model_loss_and_gradients_match_torch_on_a_batch(kind):
    model = make_scratch(kind)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    twin = torch_twin(model)
    x, y = batch()
    loss = F.cross_entropy(model(tensor(x)), y)
    loss.backward()
    tloss = TF.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    assert abs(loss.item() - tloss.item()) < 1e-12
    tparams = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tparams[name].grad.numpy(), atol=1e-12, rtol=1e-9, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kind,opt", [("mlp", "sgd"), ("cnn", "sgd"), ("mlp", "adamw"), ("mlp", "adam")])
def test_100_training_steps_follow_torchs_loss_curve(kind, opt):
    """float64 on both sides, so that rounding (which chaotic training amplifies) does not hide a wrong update."""
    model = make_scratch(kind)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    twin = torch_twin(model)
    if opt == "sgd":
        sopt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        topt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    elif opt == "adamw":
        sopt = optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        topt = torch.optim.AdamW(twin.parameters(), lr=2e-3, weight_decay=0.05)
    else:
        sopt = optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-3)
        topt = torch.optim.Adam(twin.parameters(), lr=2e-3, weight_decay=1e-3)
    ours, theirs = [], []
    for step in range(100):
        x, y = batch(32, seed=step % 5)  # five batches in turn: the loss must go down
        loss = F.cross_entropy(model(tensor(x)), y)
        sopt.zero_grad()
        loss.backward()
        sopt.step()
        tloss = TF.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
        topt.zero_grad()
        tloss.backward()
        topt.step()
        ours.append(loss.item())
        theirs.append(tloss.item())
    np.testing.assert_allclose(ours, theirs, atol=1e-8, rtol=1e-8)
    assert ours[-1] < 0.9 * ours[0]  # and it learns


# ---- mnistlab train --engine scratch --------------------------------------------------------

@pytest.mark.slow
def test_scratch_engine_trains_mlp_on_digits_and_writes_the_same_run_folder(tmp_path, capsys):
    from mnistlab.cli import main

    run = tmp_path / "run"
    args = ["train", "--engine", "scratch", "--model", "mlp", "--dataset", "digits", "--run-dir", str(run)]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["engine"] == "scratch" and results["test_accuracy"] >= 0.93, results
    assert {"config.json", "env.json", "metrics.jsonl", "checkpoint.safetensors"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "config.json").read_text())["engine"] == "scratch"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == results["epochs"] and records[-1]["val_accuracy"] > 0.9
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # eval rebuilds the scratch model from the folder alone
    report = json.loads(capsys.readouterr().out)
    assert report["engine"] == "scratch"
    assert report["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)


@pytest.mark.slow
def test_scratch_engine_trains_a_small_cnn_on_digits(tmp_path):
    from mnistlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--engine", "scratch", "--model", "cnn", "--dataset", "digits", "--epochs", "6",
                 "--model-arg", "widths=[8,16]", "--model-arg", "hidden=64", "--run-dir", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["test_accuracy"] >= 0.9


@pytest.mark.parametrize("flags", [["--model", "vit"], ["--model", "mlp", "--augment", "shift"],
                                   ["--model", "mlp", "--erase", "0.5"],
                                   ["--model", "mlp", "--device", "cuda"],
                                   ["--model", "mlp", "--model-arg", "depth=3"], ["--recipe", "fast"]])
def test_scratch_engine_refuses_what_it_lacks_with_exit_2(flags, capsys):
    from mnistlab.cli import main

    assert main(["train", "--engine", "scratch", "--dataset", "digits", *flags]) == 2
    assert "scratch" in capsys.readouterr().err


def test_scratch_mlp_and_torch_mlp_share_parameter_names_and_shapes():
    from mnistlab.models import create_model

    ours = {k: v.shape for k, v in nn.MLP().state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in create_model("mlp").state_dict().items()}
    assert ours == theirs
