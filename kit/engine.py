"""The training step and batched inference. Knows nothing about recipe files, runs or the CLI.

One update, in order, in `Trainer.step`: zero_grad -> batch of this epoch's permutation -> augment ->
forward + loss -> backward -> clip -> optimizer step at this update's LR -> EMA -> device-side sums.
It holds no host work: batch indices come from a device permutation and a device offset, the LR from a
device table indexed by a device counter (fused optimizers on every device), random draws from one generator.
The CPU runs this very update eagerly (what the tests exercise, `tests/test_capture.py` under a dispatch mode
that names any capture hazard); on CUDA it is captured once as a CUDA graph and replayed every update, and a
capture that fails falls back to the same update run eagerly, from the same state.
"""

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kit.augment import BatchAugment, normalize, to_float
from kit.data import Split
from kit.device import Precision, side_stream, synchronize
from kit.optim import clip_gradients, load_optimizer_state
from kit.recipe import OptimSpec
from kit.schedule import LearningRate

WARMUP_STEPS = 3  # eager updates on a side stream before capture (cuDNN autotuning, optimizer state allocation)


class ForwardLoss(nn.Module):
    """model + loss + correct-count in one module, so torch.compile sees them as one graph."""

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
class Trainer:
    """Everything one update touches, placed on the device once."""
    model: nn.Module  # the eager module: its parameters are what the optimizer, clipping and EMA see
    forward_loss: nn.Module  # ForwardLoss over `model` (or its DDP wrapper), compiled or not
    optimizer: torch.optim.Optimizer
    augment: BatchAugment
    data: Split  # training images (uint8) and labels, on the device
    lr: LearningRate  # writes update t's LR into the optimizer (from the device, for fused optimizers)
    clip: OptimSpec
    prec: Precision
    order_gen: torch.Generator  # the epoch's permutation: the same on every rank
    aug_gen: torch.Generator  # augmentation draws: one stream per rank
    batch_size: int  # global: every rank takes its slice of each batch
    ema: object | None = None
    scaler: torch.amp.GradScaler | None = None
    rank: int = 0
    world_size: int = 1
    capture: bool = False  # capture the update as a CUDA graph (decided by the session: `graph_blocker`, `captures`)
    num_updates: int = 0  # host count of updates done (the device keeps its own in `update`)
    echo: Callable[[str], None] = print
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)

    def __post_init__(self):
        device = self.prec.device
        self.local_batch = self.batch_size // self.world_size
        self.order = torch.arange(len(self.data), device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)  # where this rank's next slice starts
        self.update = torch.full((), self.num_updates, dtype=torch.long, device=device)
        self.parity = torch.zeros((), dtype=torch.long, device=device)  # the epoch's parity, for alternating flips
        self.loss_sum = torch.zeros((), device=device)
        self.correct_sum = torch.zeros((), dtype=torch.long, device=device)
        self._lane = torch.arange(self.local_batch, device=device)
        self._eager_updates = 0  # since this Trainer was built: a resumed run warms up before capture too

    @property
    def updates_per_epoch(self) -> int:
        return len(self.data) // self.batch_size  # the last partial batch is dropped

    def resume_at(self, num_updates: int) -> None:
        """Set both update counters (host and device) for a resumed run."""
        self.num_updates = num_updates
        self.update.fill_(num_updates)

    def step(self) -> None:
        """One update, in order. No host read, no host tensor, no data-dependent shape: capturable as it stands
        (tests/test_capture.py checks it for every recipe on the CPU)."""
        self.optimizer.zero_grad(set_to_none=False)  # before capture the gradients are None, then allocated in the graph
        inputs, targets, labels = self.augmented_batch()
        loss, correct = self.forward_backward(inputs, targets, labels)
        self.apply_update()
        self.loss_sum += loss.detach().float()
        self.correct_sum += correct
        self.offset += self.batch_size  # the next batch of the permutation
        self.update += 1

    def augmented_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of the next batch of the epoch's permutation, augmented: (inputs, targets, labels)."""
        index = self.order.index_select(0, self.offset + self._lane)  # (B_local,)
        images, labels = self.data.images.index_select(0, index), self.data.labels.index_select(0, index)
        inputs, targets = self.augment(images, labels, self.aug_gen, index=index, parity=self.parity)
        return inputs, targets, labels

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor):
        with self.prec.autocast():
            loss, correct = self.forward_loss(self.prec.inputs(inputs), targets, labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
        else:
            loss.backward()
        return loss, correct

    def apply_update(self) -> None:
        """Clip, optimizer step at this update's LR, EMA."""
        clip_gradients(self.model, self.clip)
        self.lr.write(self.update, self.num_updates)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def epoch(self, max_steps: int | None = None, progress: Callable | None = None) -> EpochResult:
        """One pass over a fresh permutation (the last partial batch is dropped so every update has one shape);
        statistics stay on the device until the end."""
        self.forward_loss.train()
        steps = self.updates_per_epoch if max_steps is None else min(self.updates_per_epoch, max_steps)
        torch.randperm(len(self.data), generator=self.order_gen, device=self.order_gen.device, out=self.order)
        self.offset.fill_(self.rank * self.local_batch)
        self.parity.fill_(self.num_updates // max(self.updates_per_epoch, 1) % 2)
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        start = time.perf_counter()
        for _ in range(steps):
            self._one_update()
            if progress is not None:
                progress(self.local_batch, self.loss_sum)
        loss_sum, correct, seen = self._totals(steps)
        loss_value = loss_sum.item() / max(steps, 1)  # every batch has the same size: mean of batch means
        return EpochResult(loss_value, correct.item() / max(seen, 1), seen, time.perf_counter() - start,
                           finite=bool(torch.isfinite(loss_sum).item()))

    def _one_update(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self._eager_updates >= WARMUP_STEPS:
            self._capture_or_go_eager()
        elif self.capture:
            with side_stream(self.prec.device):
                self.step()
            self._eager_updates += 1
        else:
            self.step()
        self.num_updates += 1

    def _capture_or_go_eager(self) -> None:
        """Capture the update and run it (its first replay); if either raises, put back the state from before
        the attempt and go on eagerly: the same update count, random streams and weights, nothing lost."""
        saved = copy.deepcopy(self.state_dict())
        try:
            self.graph = self.record_graph()
            self.graph.replay()
        except Exception as err:  # torch raises RuntimeError, AssertionError, ... from inside a capture
            self.graph, self.capture = None, False
            self.load_state_dict(saved)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self.echo(f"note: the update could not be captured as a CUDA graph ({reason}); "
                      f"training goes on eagerly from update {self.num_updates}")
            self.step()

    def record_graph(self) -> torch.cuda.CUDAGraph:
        """Record one update as a CUDA graph (its kernels do not run now: the first replay runs them)."""
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.aug_gen)  # each replay advances the augmentation stream
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's pool
        with torch.cuda.graph(graph):
            self.step()
        return graph

    def state_dict(self) -> dict:
        """Everything the update reads and writes (references, as torch's own state_dicts): weights, EMA,
        optimizer, scaler, both counters, the epoch's order and position, the device sums, both random streams."""
        return {"model": self.model.state_dict(), "ema": None if self.ema is None else self.ema.module.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "num_updates": self.num_updates, "order_rng": self.order_gen.get_state(), "augment_rng": self.aug_gen.get_state(),
                "position": {name: getattr(self, name) for name in ("order", "offset", "parity", "loss_sum", "correct_sum")}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.resume_at(state["num_updates"])
        self.order_gen.set_state(state["order_rng"])
        self.aug_gen.set_state(state["augment_rng"])
        for name, value in state["position"].items():
            getattr(self, name).copy_(value)

    def _totals(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Loss and correct sums and images seen, summed over ranks."""
        loss_sum, correct, seen = self.loss_sum.clone(), self.correct_sum.clone(), steps * self.local_batch
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
            loss_sum /= self.world_size  # a mean of per-rank batch means
            seen *= self.world_size
        synchronize(self.prec.device)
        return loss_sum, correct, seen


def graph_blocker(*, cuda_graph: bool, mixup: bool, fp16: bool, optimizer: torch.optim.Optimizer,
                  world_size: int) -> str | None:
    """Why the update cannot be captured as a CUDA graph (None: it can). The same answer on every device: the
    CPU runs the capturable update too (`kit.device.captures` says where it is then recorded)."""
    if not cuda_graph:
        return "train.cuda_graph: false"
    if mixup:
        return "augment.mixup_alpha/cutmix_alpha: timm's Mixup draws its mixing on the host"
    if fp16:
        return "train.precision: fp16: the gradient scaler checks for inf on the host"
    if world_size > 1:
        return "several processes: DistributedDataParallel's gradient hooks are not captured"
    if not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
        return f"optim.name: {type(optimizer).__name__} has no fused kernel reading its LR from the device"
    return None


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
