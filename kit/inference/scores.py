"""Scoring, written once: a model's softmax probabilities on images (batched, averaged over TTA views), and their
loss and top-k accuracy against labels. The run's validation, predict, evaluate, report, blend, robustness and
distillation all call these."""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kit.data.augment import normalize, to_float
from kit.device import Precision

View = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  views: list[View], batch_size: int, prec: Precision) -> torch.Tensor:
    """Softmax probabilities (N, K) on the CPU, averaged over TTA `views`; streams `images` (uint8, any device) in batches."""
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalize(to_float(images[start:start + batch_size].to(prec.device, non_blocking=True)), mean, std)
        probs = 0
        for view in views:
            with prec.autocast():
                logits = model(prec.inputs(view(x)))
            probs = probs + F.softmax(logits.float(), dim=1)
        chunks.append(probs / len(views))
    return torch.cat(chunks).cpu()  # one device-to-host copy at the end


def probs_loss_acc(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy (of the probabilities) and top-1 accuracy."""
    labels = labels.cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


def topk(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k most probable classes."""
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()
