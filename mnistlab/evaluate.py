"""Accuracy, loss, per-class accuracy and the confusion matrix of a model on a split, with test-time
augmentation (TTA) named view by view."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnistlab.data.batches import to_input
from mnistlab.files import to_json

ONE_PIXEL_MOVES = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]  # the 8 (dy, dx) of shift TTA


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) int64 on the CPU
    labels: torch.Tensor  # (N,) int64 on the CPU

    def confusion(self, num_classes: int) -> torch.Tensor:
        return confusion_matrix(self.predictions, self.labels, num_classes)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    batch_size: int = 1000,
    hflip_tta: bool = False,
    shift_tta: bool = False,
) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` on uint8 `images` (N, H, W) already on its device.

    hflip_tta: average the class probabilities of each image and its mirror image. Only sound for a
    model trained with random flips on a mirror-symmetric dataset, where the mirror image is simply
    a second view of the same item (docs/experiments.md has the measurements).
    shift_tta: also average over the image moved by one pixel in each of the 8 directions (9 positions,
    18 views with flips): for models trained with shifts, to which these are more views of the same
    item. All 8 one-pixel moves rather than the 4 straight ones: they did better on validation accuracy
    (docs/experiments.md).
    """
    was_training = model.training
    model.eval()
    batch_losses = []  # float32 sums per batch, added up in float64 on the CPU (MPS has no float64)
    preds = []
    background = (0.0 - mean) / std  # a black pixel, normalised: what moves into view
    for i in range(0, len(labels), batch_size):
        x = to_input(images[i : i + batch_size], mean, std)  # (B, 1, H, W)
        views = [x]
        if shift_tta:  # the content moved by (dy, dx), black filling what comes into view
            h, w = x.shape[-2:]
            padded = F.pad(x, (1, 1, 1, 1), value=background)  # (B, 1, H + 2, W + 2)
            views += [padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w] for dy, dx in ONE_PIXEL_MOVES]
        if hflip_tta:
            views = [u for v in views for u in (v, v.flip(-1))]
        if len(views) == 1:
            logits = model(x)  # (B, K)
        else:  # log of the views' mean probability, so the loss stays a cross-entropy
            logp = torch.stack([model(v).float().log_softmax(1) for v in views])  # (V, B, K)
            logits = torch.logsumexp(logp, 0) - math.log(len(views))
        y = labels[i : i + batch_size]
        batch_losses.append(F.cross_entropy(logits.float(), y, reduction="sum"))
        preds.append(logits.argmax(1))
    model.train(was_training)
    predictions = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    labels_cpu = labels.cpu()
    n = max(len(labels_cpu), 1)
    return EvalResult(
        loss=sum(float(b) for b in batch_losses) / n,
        accuracy=(predictions == labels_cpu).sum().item() / n,
        predictions=predictions,
        labels=labels_cpu,
    )


def tta_views(hflip_tta: bool = False, shift_tta: bool = False) -> list[str]:
    """The names of the views `evaluate` averages for these flags, in the order it builds them."""
    views = ["identity"] + ([f"shift {dy:+d},{dx:+d} px" for dy, dx in ONE_PIXEL_MOVES] if shift_tta else [])
    return [u for v in views for u in (v, "hflip" if v == "identity" else f"hflip {v}")] if hflip_tta else views


def describe_views(hflip_tta: bool = False, shift_tta: bool = False) -> str:
    """The views in a few words: "TTA over 2 views: identity, hflip"."""
    n = len(tta_views(hflip_tta, shift_tta))
    if not (hflip_tta or shift_tta):
        return "plain images (1 view, no TTA)"
    shifts = "identity and the 8 one-pixel shifts (±1 px, diagonals included)" if shift_tta else "identity"
    return f"TTA over {n} views: {shifts}" + (", each also mirrored (hflip)" if shift_tta and hflip_tta
                                               else ", hflip" if hflip_tta else "")


def untrained_views_warning(hflip_tta: bool, shift_tta: bool, trained_flips: bool, trained_shifts: bool) -> str | None:
    """One line when TTA shows the model views its training augmentation did not include, else None."""
    unseen = [(view, flag) for view, flag, shown, trained in (
        ("mirror images (hflip)", "--tta off", hflip_tta, trained_flips),
        ("one-pixel shifts", "--tta-shifts off", shift_tta, trained_shifts)) if shown and not trained]
    if not unseen:
        return None
    return (f"warning: TTA averages over {' and '.join(v for v, _ in unseen)}, which this run's training "
            "augmentation did not include: to this model they may not be the same item, so accuracy can fall; "
            f"{' '.join(f for _, f in unseen)} leaves them out")


def eval_json(summary: dict) -> str:
    """Strict JSON of an evaluation summary, one field per line and a matrix one row per line (not one
    number per line): short to read, parsed by any JSON reader."""
    fields = []
    for key, value in summary.items():
        if isinstance(value, list) and value and all(isinstance(row, list) for row in value):
            text = "[\n" + ",\n".join("    " + to_json(row, indent=None) for row in value) + "\n  ]"
        else:
            text = to_json(value, indent=None)
        fields.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}"


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """(K,) recall of each class: the diagonal over the row sums."""
    return confusion.diag().double() / confusion.sum(1).clamp(min=1).double()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, weight_decay: float = 1e-3, iterations: int = 100) -> float:
    """Validation accuracy of a linear classifier (multinomial logistic regression) fitted on frozen features:
    the usual measure of what a self-supervised encoder has learned (He et al. 2021, section 4).

    Features are standardised with the training features' statistics; the fit is full-batch L-BFGS from
    zeros, so the answer is a function of its inputs alone (no seed)."""
    mu, sd = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_val = (train_features - mu) / sd, (val_features - mu) / sd  # (N, D), (M, D)
    k = int(max(train_labels.max(), val_labels.max())) + 1
    w = torch.zeros(x_train.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ w + b, train_labels) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x_val @ w + b).argmax(1) == val_labels).float().mean().item()
