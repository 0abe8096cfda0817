"""The training update and the Trainer that owns everything it touches (built by `build_trainer`). Knows nothing
about run directories, inference or the CLI (scoring is kit.inference.scores).

One update, in order, in `Trainer.update`: zero_grad -> batch of this epoch's permutation -> augment ->
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
from torch import nn

from kit.data.augment import BatchAugment, normalize, to_float
from kit.data.datasets import Dataset, Labelled
from kit.device import Precision, captures, compiles, side_stream, synchronize, training_precision
from kit.faults import fault_point
from kit.recipe import OptimSpec, Recipe, with_num_classes
from kit.training import distributed
from kit.training.ema import CachedModelEma
from kit.training.optim import build_optimizer, load_optimizer_state, make_capturable
from kit.training.schedule import LearningRate, Plateau, lr_table
from kit.training.streams import restore_rng, rng_state, seed_everything

EAGER_UPDATES_BEFORE_CAPTURE = 3  # on a side stream (cuDNN autotuning, optimizer state allocation)
AUGMENT_SEED_STRIDE = 10_000  # rank r draws augmentation from seed + stride * (r + 1): apart from the order stream


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
    skipped: int = 0  # fp16: updates the loss scaler skipped (a non-finite gradient)
    updates: int = 0  # done in this epoch (those before a resume included)
    complete: bool = True  # False: stopped on request before the epoch's last update
    epoch: int = 0  # its number, from 1
    lr: float = float("nan")  # the LR at its first update


class Hooks:
    """What a driver of the one epoch loop (`Trainer.fit`) does between updates and at each epoch's end, as fastai's
    callbacks: Run (scoring, saving, the progress bar, signals), lr-find (the sweep's losses and its stop rule), kit
    bench and the tests (a number of updates). Never inside the update, which may be a captured CUDA graph. The
    defaults train every planned epoch."""

    def before_epoch(self, trainer: "Trainer") -> None:
        """The epoch's permutation is drawn (or, for an epoch stopped in the middle, its position restored)."""

    def after_update(self, trainer: "Trainer", done: int) -> bool:
        """After each update (`done` of this epoch's, those before a resume included); True stops the epoch here."""
        return False

    def after_epoch(self, trainer: "Trainer", result: "EpochResult") -> bool:
        """After the epoch's updates (all, or those before a stop); False ends the loop."""
        return result.complete


class UpdateBudget(Hooks):
    """Stop once the Trainer has done `until` updates in all (kit bench, lr-find's length, the tests)."""

    def __init__(self, until: int):
        self.until, self.results = until, []

    def after_update(self, trainer: "Trainer", done: int) -> bool:
        return trainer.num_updates >= self.until

    def after_epoch(self, trainer: "Trainer", result: "EpochResult") -> bool:
        self.results.append(result)
        return trainer.num_updates < self.until


PHASES = ("augmentation", "forward + backward", "optimizer + EMA")  # Trainer.update's on_phase: "start", then these ends
POSITION = ("order", "offset", "parity", "loss_sum", "correct_sum", "skipped_sum")  # where the epoch in progress stands


@dataclass
class Trainer:
    """Everything one update touches, placed on the device once."""
    model: nn.Module  # the eager module: its parameters are what the optimizer, clipping and EMA see
    forward_loss: nn.Module  # ForwardLoss over `model` (or its DDP wrapper), compiled or not
    optimizer: torch.optim.Optimizer
    augment: BatchAugment
    data: Labelled  # training images (uint8) and labels, on the device
    lr: LearningRate  # writes update t's LR into the optimizer (from the device, for fused optimizers)
    clip: OptimSpec
    prec: Precision
    order_gen: torch.Generator  # the epoch's permutation: the same on every rank
    aug_gen: torch.Generator  # augmentation draws: one stream per rank
    batch_size: int  # global: every rank takes its slice of each batch
    ema: CachedModelEma | None = None
    scaler: torch.amp.GradScaler | None = None
    rank: int = 0
    world_size: int = 1
    capture: bool = False  # record the update as a CUDA graph (decided by `build_trainer`: `graph_blocker`, `captures`)
    num_epochs: int = 1  # planned: `fit` trains until this many epochs are done (train.epochs)
    num_updates: int = 0  # host count of updates done (the device keeps its own in `device_updates`): the epoch count too
    echo: Callable[[str], None] = print
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)
    on_phase: Callable[[str], None] | None = field(default=None, repr=False)  # kit bench's clock (never while capturing)

    def __post_init__(self):
        device = self.prec.device
        self.local_batch = self.batch_size // self.world_size
        self.order = torch.arange(len(self.data), device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)  # where this rank's next slice starts
        self.device_updates = torch.full((), self.num_updates, dtype=torch.long, device=device)
        self.parity = torch.zeros((), dtype=torch.long, device=device)  # the epoch's parity, for alternating flips
        self.loss_sum = torch.zeros((), device=device)
        self.correct_sum = torch.zeros((), dtype=torch.long, device=device)
        self.skipped_sum = torch.zeros((), device=device)  # fp16: updates skipped for a non-finite gradient
        self._lane = torch.arange(self.local_batch, device=device)
        self._eager_updates = 0  # since this Trainer was built: a resumed run also runs eager updates before capture

    @property
    def updates_per_epoch(self) -> int:
        return len(self.data) // self.batch_size  # the last partial batch is dropped

    @property
    def epochs_done(self) -> int:
        return self.num_updates // max(self.updates_per_epoch, 1)

    @property
    def in_epoch(self) -> int:
        """Updates done in the epoch in progress (non-zero only when a hook stopped it in the middle)."""
        return self.num_updates - self.epochs_done * self.updates_per_epoch

    @property
    def ema_model(self) -> nn.Module | None:
        return None if self.ema is None else self.ema.module

    @property
    def num_params(self) -> int:
        from kit.models import count_parameters
        return count_parameters(self.model)

    def resume_at(self, num_updates: int) -> None:
        """Set both update counters (host and device) for a resumed run."""
        self.num_updates = num_updates
        self.device_updates.fill_(num_updates)

    def update(self) -> None:
        """One update, top to bottom. No host read, no host tensor, no data-dependent shape: capturable as it stands
        (tests/test_capture.py checks it for every recipe on the CPU). `on_phase`, when set (kit bench), is told
        where the update starts and where each of its PHASES ends."""
        if self.on_phase is not None:
            self.on_phase("start")
        self.optimizer.zero_grad(set_to_none=False)  # before capture the gradients are None, then allocated in the graph
        # this rank's slice of the next batch of the epoch's permutation, augmented on the device
        index = self.order.index_select(0, self.offset + self._lane)  # (B_local,)
        images, labels = self.data.images.index_select(0, index), self.data.labels.index_select(0, index)
        soft = None if self.data.soft is None else self.data.soft.index_select(0, index)  # (B_local, K): pseudo-labels
        inputs, targets = self.augment(images, labels, self.aug_gen, index=index, parity=self.parity, soft=soft)
        if self.on_phase is not None:
            self.on_phase(PHASES[0])
        with self.prec.autocast():  # forward and loss
            loss, correct = self.forward_loss(self.prec.inputs(inputs), targets, labels)
        if self.scaler is not None:  # backward: fp16 scales the loss, then unscales to clip true gradients
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.on_phase is not None:
            self.on_phase(PHASES[1])
        if self.clip.grad_clip is not None:  # on the device: no host read of the norm
            clip = nn.utils.clip_grad_norm_ if self.clip.grad_clip_mode == "norm" else nn.utils.clip_grad_value_
            clip(self.model.parameters(), self.clip.grad_clip)
        self.lr.write(self.device_updates, self.num_updates)  # this update's LR, read from the device table
        if self.scaler is not None:  # fused optimizers take the scale and the inf flag as device tensors: no host read
            self.scaler.step(self.optimizer)  # skipped (weights, moments and step count unchanged) on a non-finite gradient
            # GradScaler keeps this update's inf flags per device until update(); pinned by tests/test_precision.py
            self.skipped_sum += sum(self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values())
            self.scaler.update()  # halves the scale after a skip, grows it after `growth_interval` clean updates
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.loss_sum += loss.detach().float()  # the epoch's sums stay on the device
        self.correct_sum += correct
        self.offset += self.batch_size  # the next batch of the permutation
        self.device_updates += 1
        self.num_updates += 1  # its host twin (a replay counts itself: the graph runs no Python)
        if self.on_phase is not None:
            self.on_phase(PHASES[2])

    def start_epoch(self) -> None:
        """A fresh permutation of the training images for the next epoch, this rank's position at its start, the
        epoch's sums zeroed. (An epoch continued after a stop skips this: load_state_dict put its position back.)"""
        self.forward_loss.train()
        torch.randperm(len(self.data), generator=self.order_gen, device=self.order_gen.device, out=self.order)
        self.offset.fill_(self.rank * self.local_batch)
        self.parity.fill_(self.num_updates // max(self.updates_per_epoch, 1) % 2)
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        self.skipped_sum.zero_()

    def next_update(self) -> Callable[[], None]:
        """What runs the next update: `update` itself (eager), or, when the update is captured on CUDA, the graph's
        replay, the capture (recorded once, then replayed) or one of the eager updates on a side stream before it."""
        if self.graph is not None:
            return self._replay
        if self.capture and self._eager_updates >= EAGER_UPDATES_BEFORE_CAPTURE:
            return self._capture_or_go_eager
        if self.capture:
            return self._eager_before_capture
        return self.update

    def end_epoch(self, done: int, planned: int, seconds: float, epoch: int = 0, lr: float = float("nan")) -> EpochResult:
        """The epoch's figures after `done` of its `planned` updates (the device sums read once, summed over ranks)."""
        loss_sum, correct, seen = self._totals(done)
        loss_value = loss_sum.item() / max(done, 1)  # every batch has the same size: mean of batch means
        return EpochResult(loss_value, correct.item() / max(seen, 1), seen, seconds, finite=bool(torch.isfinite(loss_sum).item()),
                           skipped=int(self.skipped_sum.item()), updates=done, complete=done == planned, epoch=epoch, lr=lr)

    def fit(self, hooks: Hooks = Hooks()) -> None:
        """The one epoch loop, top to bottom, that Run.fit, lr-find, kit bench and the tests drive through `hooks`: each
        epoch's updates (Trainer.update, or its CUDA graph's replay; the last partial batch is dropped so every update
        has one shape), then its figures. An epoch a hook stopped in the middle goes on from there at the next call."""
        while self.epochs_done < self.num_epochs:
            epoch, planned, done = self.epochs_done, self.updates_per_epoch, self.in_epoch
            lr, start = self.lr.at_epoch(epoch), time.perf_counter()
            if done == 0:
                self.start_epoch()
            hooks.before_epoch(self)
            while done < planned:
                fault_point(f"update:{self.num_updates}")
                self.next_update()()
                done += 1
                if hooks.after_update(self, done):
                    break
            result = self.end_epoch(done, planned, time.perf_counter() - start, epoch + 1, lr)
            if not hooks.after_epoch(self, result):
                return

    def _replay(self) -> None:
        self.graph.replay()
        self.num_updates += 1

    def _eager_before_capture(self) -> None:
        with side_stream(self.prec.device):  # cuDNN autotuning and optimizer state allocation, off the capture's stream
            self.update()
        self._eager_updates += 1

    def _capture_or_go_eager(self) -> None:
        """Capture the update and run it (its first replay); if either raises, put back the state from before
        the attempt and go on eagerly: the same update count, random streams and weights, nothing lost."""
        saved = copy.deepcopy(self.state_dict())
        epoch = self.num_updates // max(self.updates_per_epoch, 1)
        try:
            self.graph = self.record_graph()
            self._replay()
        except Exception as err:  # torch raises RuntimeError, AssertionError, ... from inside a capture
            self.graph, self.capture = None, False
            self.load_state_dict(saved, epoch)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self.echo(f"note: the update could not be captured as a CUDA graph ({reason}); "
                      f"training goes on eagerly from update {self.num_updates}")
            self.update()

    def record_graph(self) -> torch.cuda.CUDAGraph:
        """Record one update as a CUDA graph (its kernels do not run now: the first replay runs them)."""
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.aug_gen)  # each replay advances the augmentation stream
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated from the graph's pool
        with torch.cuda.graph(graph):
            self.update()
        self.num_updates -= 1  # recording ran the update's Python once, its kernels not at all: the replay counts it
        return graph

    def state_dict(self) -> dict:
        """Everything the update reads and writes (references, as torch's own state_dicts): weights, EMA, optimizer,
        scaler, the LR schedule's state, both update counters, the epoch's order and position, the device sums, and
        every random stream, every rank's augmentation stream included (collective under torchrun: every rank calls it)."""
        augment_states = distributed.gather(self.aug_gen.get_state(), distributed.Ranks(self.rank, self.world_size))
        return {"model": self.model.state_dict(), "ema": None if self.ema is None else self.ema_model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "scheduler": self.lr.state_dict(), "num_updates": self.num_updates,
                "rng": rng_state(self.order_gen, augment_states),
                "position": {name: getattr(self, name) for name in POSITION}}

    def load_state_dict(self, state: dict, epoch: int, source: str = "checkpoint") -> bool:
        """Continue from `state` (also one saved on another device: flags and tensors are this device's). Returns
        False when the data streams were saved on another device type or process count and could not continue: they
        then restart from their seeds + `epoch`."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema_model.load_state_dict(state["ema"])
        load_optimizer_state(self.optimizer, state["optimizer"], source)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.lr.load_state_dict(state["scheduler"], epoch)
        self.resume_at(state["num_updates"])
        for name, value in state.get("position", {}).items():
            if getattr(self, name).shape == value.shape:
                getattr(self, name).copy_(value)
        if restore_rng(state["rng"], self.order_gen, self.aug_gen, self.rank, self.world_size):
            return True
        self.order_gen.manual_seed(self.order_gen.initial_seed() + epoch)
        self.aug_gen.manual_seed(self.aug_gen.initial_seed() + epoch)
        return False

    def _totals(self, updates: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Loss and correct sums and images seen, summed over ranks."""
        loss_sum, correct, seen = self.loss_sum.clone(), self.correct_sum.clone(), updates * self.local_batch
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
            loss_sum /= self.world_size  # a mean of per-rank batch means
            seen *= self.world_size
        synchronize(self.prec.device)
        return loss_sum, correct, seen


def graph_blocker(*, cuda_graph: bool, mixup: bool, optimizer: torch.optim.Optimizer, world_size: int) -> str | None:
    """Why the update cannot be captured as a CUDA graph (None: it can). The same answer on every device: the
    CPU runs the capturable update too (`kit.device.captures` says where it is then recorded)."""
    if not cuda_graph:
        return "train.cuda_graph: false"
    if mixup:
        return "augment.mixup_alpha/cutmix_alpha: timm's Mixup draws its mixing on the host"
    if world_size > 1:
        return "several processes: DistributedDataParallel's gradient hooks are not captured"
    if not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
        return f"optim.name: {type(optimizer).__name__} has no fused kernel reading its LR from the device"
    return None


def whitening_sample(dataset: Dataset, mean: torch.Tensor, std: torch.Tensor, n: int = 5000) -> torch.Tensor:
    """The first n training images, normalized (airbench whitens from 5,000)."""
    return normalize(to_float(dataset.train.images[:n].to(mean.device)), mean, std)


def _loss(recipe: Recipe) -> nn.Module:
    if recipe.augment.mixup_alpha or recipe.augment.cutmix_alpha:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()  # mixup already folded label smoothing into the targets
    return nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)


def _wrap(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _compile(forward_loss: nn.Module, mode: str, capture: bool, device: torch.device) -> nn.Module:
    if mode == "none" or not compiles(device):
        return forward_loss
    if capture:  # the whole update is one CUDA graph: compiled kernels go inside it, without graphs of their own
        return torch.compile(forward_loss, mode="max-autotune-no-cudagraphs" if mode == "max-autotune" else None)
    return torch.compile(forward_loss, mode=None if mode == "default" else mode)


def build_trainer(recipe: Recipe, dataset: Dataset, device: torch.device, source: str = "recipe", rank: int = 0,
                  world_size: int = 1, echo: Callable[[str], None] = print) -> Trainer:
    """Seed, build and place everything the update touches; the training images go to the device once, as uint8."""
    from kit.models import build_model
    from kit.models.resnet import init_whitening, whiten_stem
    recipe = with_num_classes(recipe, len(dataset.classes), source)
    spec = recipe.train
    seed_everything(spec.seed)
    prec = training_precision(spec.precision, spec.channels_last, device)
    model = build_model(recipe, source).to(device)
    mean, std = torch.tensor(dataset.mean, device=device), torch.tensor(dataset.std, device=device)
    stem = whiten_stem(model)
    if stem is not None:
        init_whitening(stem, whitening_sample(dataset, mean, std))
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = CachedModelEma(model, spec.ema_decay) if spec.ema_decay is not None else None
    optimizer = build_optimizer(model, recipe.optim)
    train = dataset.train.to(device)
    updates_per_epoch = len(train) // spec.batch_size
    plateau = Plateau.build(recipe.schedule, recipe.optim.lr, spec.epochs) if recipe.schedule.name == "plateau" else None
    lr = LearningRate(lr_table(recipe.schedule, recipe.optim.lr, spec.epochs, updates_per_epoch), optimizer, device,
                      updates_per_epoch, plateau)
    # fp16 asked for, or chosen: dynamic loss scaling, on the CPU too (there in fp32 math: the same update's code)
    fp16 = spec.precision == "fp16" or prec.dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    blocker = graph_blocker(cuda_graph=spec.cuda_graph, mixup=bool(recipe.augment.mixup_alpha or recipe.augment.cutmix_alpha),
                            optimizer=optimizer, world_size=world_size)
    if blocker is None:
        make_capturable(optimizer)  # on every device: the CPU runs the update CUDA captures
    elif captures(device):
        echo(f"eager update (not one CUDA graph): {blocker}")
    capture = blocker is None and captures(device)
    forward_loss = ForwardLoss(_wrap(model, world_size, device), _loss(recipe))
    if recipe.distill.teachers:
        from kit.training.distill import DistillLoss, load_teachers
        forward_loss = DistillLoss(forward_loss.model, forward_loss.loss_fn, load_teachers(recipe, mean, std, device),
                                   recipe.distill.alpha)
    forward_loss = _compile(forward_loss, spec.compile, capture, device)
    augment = BatchAugment(recipe.augment, mean, std, recipe.model.num_classes, spec.label_smoothing, recipe.data.image_size)
    order_gen = torch.Generator(device=device).manual_seed(spec.seed)
    aug_gen = torch.Generator(device=device).manual_seed(spec.seed + AUGMENT_SEED_STRIDE * (rank + 1))
    return Trainer(model, forward_loss, optimizer, augment, train, lr, recipe.optim, prec, order_gen, aug_gen,
                   spec.batch_size, ema=ema, scaler=scaler, rank=rank, world_size=world_size, capture=capture,
                   num_epochs=spec.epochs, echo=echo)


def run_updates(trainer: Trainer, n: int) -> list[EpochResult]:
    """`n` more updates through the epoch loop, across epochs as needed and whatever the planned epochs (kit bench,
    the tests); returns the figures of each epoch run (the last one stopped at the n-th update)."""
    budget = UpdateBudget(trainer.num_updates + n)
    planned, trainer.num_epochs = trainer.num_epochs, -(-(trainer.num_updates + n) // trainer.updates_per_epoch)
    try:
        trainer.fit(budget)
    finally:
        trainer.num_epochs = planned
    return budget.results
