"""mnistlab/optim.py: the written-out Nesterov SGD against torch.optim.SGD, its checkpoints both ways, the start-up
it saves (no torch._dynamo import in a training process), and Muon's orthogonalized steps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mnistlab.models import create_model
from mnistlab.optim import Muon, NesterovSGD, orthogonalize


def model_and_groups(seed: int = 0) -> tuple[torch.nn.Module, list[dict]]:
    """The fast recipe's CNN in channels-last (its weights' layout in training) and make_optimizer's two groups."""
    torch.manual_seed(seed)
    model = create_model("cnn", widths=[8, 16, 32], stem_stride=2, hidden=32, pool_first=True)
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return model, [dict(params=decay, weight_decay=5e-3), dict(params=rest, weight_decay=0.0)]


def take_steps(model: torch.nn.Module, optimizer, steps: range, lr: float = 0.1) -> None:
    """Steps with a changing learning rate, as the one-cycle loop sets it, on fixed random batches."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 + step) / 10
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def torch_sgd(groups: list[dict]) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, foreach=False)


def test_it_follows_torch_sgd_step_for_step():
    ours, groups = model_and_groups()
    theirs, their_groups = model_and_groups()
    take_steps(ours, NesterovSGD(groups, lr=0.1, momentum=0.9), range(8))
    take_steps(theirs, torch_sgd(their_groups), range(8))
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours.state_dict()["head.weight"], model_and_groups()[0].state_dict()["head.weight"])


def test_without_momentum_or_decay_it_is_plain_gradient_descent():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = NesterovSGD([p], lr=0.5, momentum=0.0)
    p.grad = torch.tensor([0.2, 0.4])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -2.2]))


@pytest.mark.parametrize("first, then", [("torch", "ours"), ("ours", "torch")])
def test_a_state_dict_from_either_resumes_in_the_other(first, then):
    """Four steps in one optimizer, its state_dict loaded into the other kind on a copy of the model, four more:
    the same weights as eight uninterrupted steps of torch.optim.SGD."""
    make = {"torch": torch_sgd, "ours": lambda groups: NesterovSGD(groups, lr=0.1, momentum=0.9)}
    straight, straight_groups = model_and_groups()
    take_steps(straight, torch_sgd(straight_groups), range(8))

    model, groups = model_and_groups()
    before = make[first](groups)
    take_steps(model, before, range(4))
    state = before.state_dict()
    assert set(state["state"][0]) == {"momentum_buffer"} and state["param_groups"][0]["nesterov"] is True
    resumed, resumed_groups = model_and_groups(seed=1)  # other weights: all must come from the copy below
    resumed.load_state_dict(model.state_dict())
    after = make[then](resumed_groups)
    after.load_state_dict(state)
    take_steps(resumed, after, range(4, 8))
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_state_dict_of_other_groups_is_refused():
    _, groups = model_and_groups()
    state = NesterovSGD(groups, lr=0.1).state_dict()
    _, other = model_and_groups()
    with pytest.raises(ValueError, match="other parameter groups"):
        NesterovSGD(other[:1], lr=0.1).load_state_dict(state)


@pytest.mark.slow
def test_training_imports_no_torch_dynamo(tmp_path):
    """The point of the class: a `mnistlab train` with SGD never imports torch._dynamo (1.5-1.9 s)."""
    code = ("import sys; from mnistlab.cli import main; "
            f"main(['train', '--dataset', 'digits', '--epochs', '1', '--run-dir', {str(tmp_path / 'run')!r}]); "
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no dynamo"


@pytest.mark.parametrize("shape", [(48, 216), (96, 432), (64, 16)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    """Newton-Schulz's five steps: from singular values spread over two orders of magnitude to about [0.7, 1.2]
    (not exactly 1: the coefficients trade that for speed), with the singular vectors kept. Values much below a
    thousandth of the norm stay below that: five steps multiply a small one by at most 3.4445^5, about 490."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    s = torch.logspace(0, -2, min(shape))  # 1 ... 0.01
    m = u @ torch.diag(s) @ v.T
    out = orthogonalize(m)
    values = torch.linalg.svdvals(out)
    assert values.min() > 0.6 and values.max() < 1.25, (values.min(), values.max())
    # the same directions: out is close to U V^T, far closer than m itself is
    target = u @ v.T
    assert (out - target).norm() / target.norm() < 0.35
    assert (m / m.norm() * target.norm() - target).norm() / target.norm() > 0.5


def muon(model: torch.nn.Module, lr_ratio: float) -> Muon:
    """make_optimizer's Muon at lr 0.1 without weight decay: the hidden convs orthogonalized at lr x lr_ratio."""
    from mnistlab.config import TrainConfig
    from mnistlab.lifecycle import make_optimizer

    return make_optimizer(model, TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.1 * lr_ratio, weight_decay=0.0))


def test_muon_takes_orthogonal_steps_on_its_groups_and_sgd_elsewhere():
    """One step from zero momentum: a hidden conv moves by lr x ratio x sqrt(max(1, rows / cols)) x an orthogonal
    matrix; every other parameter moves exactly as Nesterov SGD moves it."""
    model, _ = model_and_groups()
    twin, _ = model_and_groups()
    twin.load_state_dict(model.state_dict())
    optimizer = muon(model, lr_ratio=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_steps(model, optimizer, range(1))  # lr 0.1 x 1 / 10 at step 0
    take_steps(twin, NesterovSGD(twin.parameters(), lr=0.1, momentum=0.9), range(1))  # no weight decay either
    hidden = {id(p) for p in optimizer.param_groups[0]["params"]}
    twins = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if id(p) in hidden:
            step = (before[name] - p.detach()).reshape(p.shape[0], -1) / (0.01 * 0.5)
            assert torch.linalg.svdvals(step).min() > 0.6 and torch.linalg.svdvals(step).max() < 1.25, name
        else:
            torch.testing.assert_close(p.detach(), twins[name].detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert len(hidden) == 2  # the fast CNN's second and third convs


def test_muon_resumes_exactly_from_its_state_dict():
    """Four steps, a state_dict (momentum buffers and the groups' orthogonalize and lr_ratio), four more in a new
    optimizer on a copy: the same weights as eight uninterrupted steps."""
    straight, _ = model_and_groups()
    take_steps(straight, muon(straight, 0.5), range(8))
    model, _ = model_and_groups()
    first = muon(model, 0.5)
    take_steps(model, first, range(4))
    state = first.state_dict()
    assert state["param_groups"][0]["orthogonalize"] is True and state["param_groups"][0]["lr_ratio"] == 0.5
    resumed, _ = model_and_groups(seed=1)
    resumed.load_state_dict(model.state_dict())
    after = muon(resumed, 1.0)
    after.load_state_dict(state)  # the saved ratio (0.5) replaces the new optimizer's
    take_steps(resumed, after, range(4, 8))
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_make_optimizer_gives_muon_the_hidden_convs_only():
    from mnistlab.config import TrainConfig
    from mnistlab.errors import UserError
    from mnistlab.lifecycle import make_optimizer

    model, _ = model_and_groups()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.02))
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert isinstance(opt, Muon) and opt.param_groups[0]["params"] == convs[1:]
    assert opt.param_groups[0]["lr_ratio"] == pytest.approx(0.2) and opt.param_groups[0]["weight_decay"] == 0
    others = [p for g in opt.param_groups[1:] for p in g["params"]]
    assert convs[0] in others and len(others) + len(convs) - 1 == len(list(model.parameters()))
    with pytest.raises(UserError, match="no hidden conv|none after its first"):
        make_optimizer(create_model("mlp"), TrainConfig(model="mlp", optimizer="muon"))


def test_make_optimizer_leaves_a_fixed_whitening_stem_out_and_still_gives_muon_both_hidden_convs():
    """whiten=true freezes the first conv: it is in no group, and Muon still takes the two convs after it (not
    the first of the trainable ones)."""
    from mnistlab.config import TrainConfig
    from mnistlab.lifecycle import make_optimizer

    model = create_model("cnn", widths=[18, 16, 32], stem_stride=2, hidden=32, pool_first=True, whiten=True)
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.02))
    stem, *hidden = [p for p in model.parameters() if p.ndim == 4]
    assert opt.param_groups[0]["params"] == hidden and len(hidden) == 2
    assert all(p is not stem for g in opt.param_groups for p in g["params"])
