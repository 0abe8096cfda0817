"""The training step loop and batched inference. Knows nothing about recipes files, runs or the CLI."""

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kit.augment import normalize, to_float
from kit.data import Split
from kit.device import Precision


class ForwardLoss(nn.Module):
    """model + loss + correct-count in one module, so torch.compile captures them as one graph
    (CUDA graphs then replay the whole forward and backward without per-kernel launches)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor):
        logits = self.model(inputs)
        correct = (logits.detach().argmax(1) == labels).sum()
        return self.loss_fn(logits, targets), correct


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    seconds: float
    finite: bool


@dataclass
class TrainState:
    """What changes every update: the optimizer-step count (the schedule's clock)."""
    num_updates: int = 0


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a fresh permutation; the last partial batch is dropped so every step has
    the same shape (CUDA graphs and mixup need that)."""
    order = torch.randperm(n, generator=gen, device=gen.device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


def train_one_epoch(forward_loss: nn.Module, data: Split, augment: Callable, step_hooks: "StepHooks", state: TrainState, batch_size: int, gen: torch.Generator,
                    prec: Precision, max_steps: int | None = None, progress: Callable | None = None) -> EpochResult:
    """One pass over `data` (resident on the device); statistics stay on the device until the end."""
    forward_loss.train()
    loss_sum = torch.zeros((), device=prec.device)
    correct = torch.zeros((), device=prec.device, dtype=torch.long)
    steps, seen, start = 0, 0, time.perf_counter()
    for index in shuffled_batches(len(data), batch_size, gen):
        if max_steps is not None and steps >= max_steps:
            break
        labels = data.labels[index]
        inputs, targets = augment(data.images[index], labels, gen)
        with prec.autocast():
            loss, batch_correct = forward_loss(prec.inputs(inputs), targets, labels)
        step_hooks.backward_and_step(loss)
        state.num_updates += 1
        step_hooks.after_update(state.num_updates)
        loss_sum += loss.detach().float()
        correct += batch_correct
        steps, seen = steps + 1, seen + len(labels)
        if progress is not None:
            progress(len(labels), loss)
    if prec.device.type == "cuda":
        torch.cuda.synchronize()
    loss_value = loss_sum.item() / max(steps, 1)  # every batch has the same size: mean of batch means
    return EpochResult(loss_value, correct.item() / max(seen, 1), seen, time.perf_counter() - start,
                       finite=bool(torch.isfinite(loss_sum).item()))


@dataclass
class StepHooks:
    """The per-update work around the forward pass: backward, clipping, optimizer, schedule, EMA."""
    optimizer: torch.optim.Optimizer
    clip: Callable[[], None]
    schedule_after_update: Callable[[int], None]
    ema: object | None = None
    ema_model: nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
            self.clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.clip()
            self.optimizer.step()

    def after_update(self, num_updates: int) -> None:
        self.schedule_after_update(num_updates)
        if self.ema is not None:
            self.ema.update(self.ema_model, step=num_updates)


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
        chunks.append((probs / len(views)).cpu())
    return torch.cat(chunks)


def probs_loss_acc(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy (of the probabilities) and top-1 accuracy."""
    labels = labels.cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()
