"""RNN/GRU/LSTM and the ViT: the written-out paths equal PyTorch's, and the vanishing gradient shows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mnistlab.checkpoint import load_model, save_checkpoint
from mnistlab.cli import main
from mnistlab.data.batches import to_input
from mnistlab.data.dataset import load_dataset
from mnistlab.gradflow import time_step_grad_norms
from mnistlab.models import create_model
from mnistlab.models.vit import scaled_dot_product_weights


@pytest.fixture(autouse=True)
def one_thread():
    """784-step loops of small matmuls: a second BLAS thread adds no speed, only a barrier per op that
    stalls for a whole scheduler slice whenever the machine is busy (50 s instead of 1 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seq, cell", [
    pytest.param(seq, cell, marks=[pytest.mark.slow] if (seq, cell) in {("pixels", "gru"), ("pixels", "lstm")} else [])
    for seq in ("rows", "pixels") for cell in ("rnn", "gru", "lstm")])  # 784 unrolled gru, lstm steps: ~0.5 s each
def test_unrolled_cell_equations_equal_the_fused_layer(seq, cell):
    torch.manual_seed(0)
    model = create_model(cell, seq=seq, hidden=16, layers=2).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    logits, hs = model.unrolled(x)
    assert len(hs) == (28 if seq == "rows" else 784)
    torch.testing.assert_close(logits, model(x), rtol=1e-10, atol=1e-10)


def test_bidirectional_reads_both_ends():
    model = create_model("gru", bidirectional=True, hidden=8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.head.in_features == 16


def test_permutation_comes_from_the_seed_and_travels_in_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    a = create_model("lstm", seq="permuted", hidden=8)
    torch.manual_seed(1)
    b = create_model("lstm", seq="permuted", hidden=8)
    torch.manual_seed(2)
    c = create_model("lstm", seq="permuted", hidden=8)
    assert torch.equal(a.order, b.order) and not torch.equal(a.order, c.order)
    assert sorted(a.order.tolist()) == list(range(784)) and not torch.equal(a.order, torch.arange(784))
    meta = dict(model="lstm", model_kwargs=dict(seq="permuted", hidden=8), in_chans=1, num_classes=10)
    save_checkpoint(tmp_path / "c.safetensors", a, meta)
    torch.manual_seed(99)  # a different RNG state at load time must not change the order
    loaded, _ = load_model(tmp_path / "c.safetensors")
    assert torch.equal(loaded.order, a.order)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), a.eval()(x))


@pytest.mark.parametrize("heads, t, d", [(1, 5, 8), (4, 50, 16), (2, 17, 32)])
def test_written_out_attention_equals_torch_sdpa(heads, t, d):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, heads, t, d, dtype=torch.float64) for _ in range(3))
    ours = scaled_dot_product_weights(q, k) @ v
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)


def test_vit_attention_module_equals_sdpa_end_to_end():
    torch.manual_seed(0)
    vit = create_model("vit", patch=4, dim=32, heads=4, depth=1, pool="cls").double().eval()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    b, t, dim = x.shape
    q, k, v = attn.qkv(x).reshape(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, dim))
    torch.testing.assert_close(attn(x), ref, rtol=0, atol=1e-6)
    maps = vit.attention_maps(torch.randn(2, 1, 28, 28, dtype=torch.float64))
    assert maps[0].shape == (2, 4, 50, 50)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 50, dtype=torch.float64))


def test_vit_mean_pooling_and_patch_sizes():
    model = create_model("vit", patch=7, pool="mean", dim=32, heads=2, depth=2)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.pos_embed.shape[1] == 16
    assert create_model("vit", patch=4, pool="cls").pos_embed.shape[1] == 49 + 1  # 7x7 patches and the class token


@pytest.mark.parametrize("patch", [4, 7])
def test_vit_patch_embedding_equals_the_strided_conv(patch):
    embed = create_model("vit", patch=patch, in_chans=2).patch_embed
    x = torch.randn(3, 2, 28, 28)
    conv = F.conv2d(x, embed.weight, embed.bias, stride=patch).flatten(2).transpose(1, 2)  # (B, N, D)
    torch.testing.assert_close(embed(x), conv, atol=1e-5, rtol=1e-5)


def _log10_first_to_last(cell: str) -> float:
    ds = load_dataset("digits")
    x = to_input(ds.train_images[:16], ds.mean, ds.std)  # 16 images show it as clearly as 64, in a quarter the time
    y = ds.train_labels[:16]
    torch.manual_seed(0)
    model = create_model(cell, seq="pixels", hidden=64)
    norms = time_step_grad_norms(model, x, y)
    assert len(norms) == 784 and norms[0] > 0  # float64: tiny, but not rounded to zero
    return math.log10(norms[0] / norms[-1])


def test_rnn_gradient_vanishes_over_784_pixels_and_lstm_keeps_far_more():
    rnn, lstm = _log10_first_to_last("rnn"), _log10_first_to_last("lstm")
    assert rnn < -3, rnn  # the first pixel gets orders of magnitude less gradient than the last
    assert lstm > rnn + 20, (rnn, lstm)  # the LSTM's first pixel gets over 1e20 times more than the RNN's


@pytest.mark.slow
def test_grad_flow_recorded_in_training_and_plotted(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "rnn", "--seq", "pixels", "--model-arg", "hidden=32",
                 "--epochs", "1", "--batch-size", "128", "--grad-flow", "--grad-flow-steps", "0,5",
                 "--run-dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "grad_flow.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5]
    assert len(records[0]["time_grad_norm"]) == 784
    assert "rnn.weight_hh_l0" in records[0]["layer_grad_norm"]
    png = tmp_path / "flow.png"
    assert main(["plot", "grad-flow", str(run), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "||dL/dh_1|| / ||dL/dh_T||" in capsys.readouterr().out


@pytest.mark.slow
def test_grad_flow_for_a_non_recurrent_model_records_layers_only(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "linear", "--epochs", "1", "--grad-flow",
                 "--run-dir", str(run)]) == 0
    records = [json.loads(line) for line in (run / "grad_flow.jsonl").read_text().splitlines()]
    assert records[0]["time_grad_norm"] is None and "fc.weight" in records[0]["layer_grad_norm"]
    png = tmp_path / "f.png"
    assert main(["plot", "grad-flow", str(run), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_seq_flag_is_refused_for_non_recurrent_models(capsys):
    assert main(["train", "--model", "cnn", "--seq", "pixels", "--dataset", "digits"]) == 2
    assert "--seq applies to rnn, gru and lstm" in capsys.readouterr().err


def test_flops_count_recurrent_and_attention_matmuls():
    from mnistlab.models.flops import forward_flops

    lstm = create_model("lstm", hidden=16, seq="rows")
    assert forward_flops(lstm) == 2 * 28 * 4 * 16 * (28 + 16) + 2 * 16 * 10
    vit = create_model("vit", dim=32, heads=2, depth=1, mlp_ratio=2.0, patch=7, pool="cls")
    tokens = 16 + 1
    expected = (2 * 16 * 32 * 49  # patch embedding: 16 patches, 49 pixels each
                + 2 * tokens * 32 * 96 + 2 * tokens * 32 * 32  # qkv and output projections
                + 2 * 2 * tokens * tokens * 32  # the two attention matmuls
                + 2 * tokens * 32 * 64 * 2  # the MLP
                + 2 * 32 * 10)  # head
    assert forward_flops(vit) == expected


@pytest.mark.slow
@pytest.mark.parametrize("model, floor", [("rnn", 0.70), ("gru", 0.85), ("lstm", 0.90), ("vit", 0.85)])
def test_sequence_models_and_vit_learn_digits_with_defaults(tmp_path, model, floor):
    """Measured with these defaults: rnn 83.6%, gru 93.1%, lstm 97.2%, vit 96.1% (seed 0)."""
    run = tmp_path / model
    assert main(["train", "--dataset", "digits", "--model", model, "--run-dir", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["test_accuracy"] >= floor


@pytest.mark.slow
def test_permuted_order_is_used_by_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "gru", "--seq", "permuted", "--model-arg", "hidden=16",
                 "--epochs", "1", "--seed", "5", "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-12)


def test_scaled_norm_survives_where_the_sum_of_squares_underflows():
    from mnistlab.gradflow import scaled_norm

    g = torch.tensor([3e-200, 4e-200], dtype=torch.float64)
    assert g.norm().item() == 0.0  # the naive way loses it
    assert scaled_norm(g) == pytest.approx(5e-200, rel=1e-12)
    assert scaled_norm(torch.zeros(3)) == 0.0
