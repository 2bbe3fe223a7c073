"""Accuracy, loss, per-class accuracy and the confusion matrix of a model on a split."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnistlab.data.batches import to_input


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
) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` on uint8 `images` (N, H, W) already on its device.

    hflip_tta: average the class probabilities of each image and its mirror image. Only sound for a
    model trained with random flips on a mirror-symmetric dataset, where the mirror image is simply
    a second view of the same item (+0.4 points on Fashion-MNIST for the `best` recipe, measured).
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=images.device)
    preds = []
    for i in range(0, len(labels), batch_size):
        x = to_input(images[i : i + batch_size], mean, std)  # (B, 1, H, W)
        logits = model(x)  # (B, K)
        if hflip_tta:  # log of the mean probability of the two views, so the loss stays a cross-entropy
            both = torch.stack([logits.float().log_softmax(1), model(x.flip(-1)).float().log_softmax(1)])
            logits = torch.logsumexp(both, 0) - math.log(2)
        y = labels[i : i + batch_size]
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        preds.append(logits.argmax(1))
    model.train(was_training)
    predictions = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    labels_cpu = labels.cpu()
    n = max(len(labels_cpu), 1)
    return EvalResult(
        loss=total_loss.item() / n,
        accuracy=(predictions == labels_cpu).sum().item() / n,
        predictions=predictions,
        labels=labels_cpu,
    )


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """(K,) recall of each class: the diagonal over the row sums."""
    return confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
