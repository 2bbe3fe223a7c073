"""Recurrent models that read an image as a sequence (notes: RNN/LSTM and their vanishing gradients).

    --seq rows      28 steps of 28 pixels (one image row per step)
    --seq pixels    784 steps of 1 pixel (sequential MNIST, Le et al. 2015)
    --seq permuted  784 steps in a fixed pixel order drawn from the run's seed (permuted MNIST):
                    neighbouring pixels land far apart in time, so memory must be long

The fast path uses PyTorch's fused nn.RNN/nn.GRU/nn.LSTM. `unrolled()` recomputes the same
function one time step at a time from the same weights, with the cell equations written out, so
that dLoss/dh_t can be read at every step t: that is how `--grad-flow` shows the vanishing gradient.
A test proves both paths agree.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn as nn

from mnistlab.models.registry import check_positive, register_model

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
SeqMode = Literal["rows", "pixels", "permuted"]
SEQ_MODES: tuple[str, ...] = get_args(SeqMode)


class SequenceClassifier(nn.Module):
    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        cell: Literal["rnn", "gru", "lstm"] = "lstm",
        seq: SeqMode = "rows",
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = False,
        img_size: int = 28,
    ):
        super().__init__()
        check_positive(hidden=hidden, layers=layers, img_size=img_size)
        self.cell, self.seq, self.img_size = cell, seq, img_size
        input_size = in_chans * img_size if seq == "rows" else in_chans
        kwargs = dict(nonlinearity="tanh") if cell == "rnn" else {}
        self.rnn = CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True,
                               bidirectional=bidirectional, **kwargs)
        if cell == "lstm":
            # Forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015): the cell starts out
            # remembering, sigmoid(1) = 0.73 per step instead of 0.5, which over 784 steps is the
            # difference between a gradient of 1e-52 and one of 1e-236 at the first pixel.
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        p[hidden : 2 * hidden].fill_(1.0)  # gate order i, f, g, o
        # The pixel order is drawn from torch's RNG, which training seeds with --seed before building
        # the model; as a buffer it is saved in every checkpoint, so eval reads the same order back.
        n = img_size * img_size
        self.register_buffer("order", torch.randperm(n) if seq == "permuted" else torch.arange(n))
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, F): rows (T=H, F=C*W) or pixels (T=H*W, F=C) in self.order."""
        b, c, h, w = x.shape
        if self.seq == "rows":
            return x.permute(0, 2, 1, 3).reshape(b, h, c * w)
        return x.reshape(b, c, h * w)[:, :, self.order].transpose(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.to_sequence(x).contiguous())  # (B, T, H*dirs)
        if self.rnn.bidirectional:
            h = self.rnn.hidden_size
            # forward direction's last step, backward direction's first step: each has read everything
            return torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=1)
        return out[:, -1]  # (B, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def _step(self, layer: int, x_t: torch.Tensor, state):
        """One time step of the first direction of `layer`, written out (PyTorch's gate order)."""
        w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{layer}"), getattr(self.rnn, f"weight_hh_l{layer}")
        b_ih, b_hh = getattr(self.rnn, f"bias_ih_l{layer}"), getattr(self.rnn, f"bias_hh_l{layer}")
        gi, gh = x_t @ w_ih.T + b_ih, (state[0] if self.cell == "lstm" else state) @ w_hh.T + b_hh
        if self.cell == "rnn":
            return torch.tanh(gi + gh)  # h_t = tanh(W x_t + U h_{t-1} + b)
        if self.cell == "gru":
            r_i, z_i, n_i = gi.chunk(3, 1)
            r_h, z_h, n_h = gh.chunk(3, 1)
            r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
            n = torch.tanh(n_i + r * n_h)
            return (1 - z) * n + z * state  # the update gate z lets h_{t-1} through untouched
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)  # additive memory path
        return torch.sigmoid(o) * torch.tanh(c), c

    def unrolled(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, [h_1 ... h_T] of the last layer), step by step, each h_t retaining its gradient.

        Unidirectional models only: a bidirectional model's backward pass has no single h_t.
        """
        if self.rnn.bidirectional:
            raise ValueError("unrolled() needs a unidirectional model")
        seq = self.to_sequence(x)  # (B, T, F)
        b = seq.shape[0]
        inputs = list(seq.unbind(1))
        for layer in range(self.rnn.num_layers):
            zeros = seq.new_zeros(b, self.rnn.hidden_size)
            state = (zeros, zeros) if self.cell == "lstm" else zeros
            outputs = []
            for x_t in inputs:
                state = self._step(layer, x_t, state)
                h_t = state[0] if self.cell == "lstm" else state
                outputs.append(h_t)
            inputs = outputs
        for h_t in inputs:
            h_t.retain_grad()
        return self.head(inputs[-1]), inputs


# One class, three registered models: the cell is fixed by the name, not an option.
register_model("rnn", "Elman RNN (tanh) reading rows, pixels or permuted pixels", fixed={"cell": "rnn"})(
    SequenceClassifier)
register_model("gru", "GRU (Cho et al. 2014) reading rows, pixels or permuted pixels", fixed={"cell": "gru"})(
    SequenceClassifier)
register_model("lstm", "LSTM (Hochreiter & Schmidhuber 1997) reading rows, pixels or permuted pixels",
               fixed={"cell": "lstm"})(SequenceClassifier)
