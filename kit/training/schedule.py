"""The learning rate as a pure function of the update count: a table with one entry per update, computed
once from the recipe's schedule. timm's schedulers define the values (warmup included), torch's OneCycleLR
the one-cycle formula; they are stepped on a stand-in optimizer and read off. Resume and `--set
train.epochs=N` rebuild the table; nothing about the schedule needs saving but a plateau's state."""

import warnings
from dataclasses import dataclass

import torch
from timm.scheduler import MultiStepLRScheduler, PlateauLRScheduler, create_scheduler_v2

from kit.recipe import ScheduleSpec
from kit.training.optim import lr_on_device


def _stand_in(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lr_table(spec: ScheduleSpec, base_lr: float, epochs: int, updates_per_epoch: int) -> torch.Tensor:
    """(epochs * updates_per_epoch,) float64: the lr of update t (0-based). `per_update: false` holds each
    epoch's value for all its updates. A plateau schedule's table is its starting lr; `Plateau` lowers it."""
    total = epochs * updates_per_epoch
    optimizer = _stand_in(base_lr)
    if spec.name == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=base_lr, total_steps=total,
                                                    pct_start=spec.onecycle_pct_start)
        values = []
        with warnings.catch_warnings():  # the stand-in optimizer never steps: torch's order warning does not apply
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for t in range(total):
                values.append(optimizer.param_groups[0]["lr"])
                if t + 1 < total:
                    sched.step()
        return torch.tensor(values, dtype=torch.float64)
    scheduler = _timm_scheduler(optimizer, spec, epochs, updates_per_epoch)
    if scheduler is None or spec.name == "plateau":
        return torch.full((total,), float(optimizer.param_groups[0]["lr"]), dtype=torch.float64)
    values = []
    for t in range(total):
        if spec.per_update:
            scheduler.step_update(t)  # timm: the lr for update t
        elif t % updates_per_epoch == 0:
            scheduler.step(t // updates_per_epoch)
        values.append(optimizer.param_groups[0]["lr"])
    return torch.tensor(values, dtype=torch.float64)


def _timm_scheduler(optimizer, spec: ScheduleSpec, epochs: int, updates_per_epoch: int):
    unit = updates_per_epoch if spec.per_update else 1
    if spec.name == "multistep":
        # timm decays when t + 1 reaches a milestone, one epoch (or update) before torch's MultiStepLR;
        # shifting each milestone by one step gives torch's meaning: lr drops at the start of epoch m.
        return MultiStepLRScheduler(optimizer, decay_t=[m * unit + 1 for m in spec.milestones], decay_rate=spec.decay_rate,
                                    warmup_t=spec.warmup_epochs * unit, warmup_lr_init=spec.warmup_lr,
                                    t_in_epochs=not spec.per_update)
    if spec.name == "constant" and not spec.warmup_epochs:
        return None
    name = "step" if spec.name == "constant" else spec.name
    decay = spec.decay_epochs  # only step uses it; always a number (older timm multiplies it unconditionally)
    if spec.name == "constant":  # a warmup then a flat lr: a step schedule that never decays
        decay = epochs + 1
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs, decay_epochs=decay, decay_rate=spec.decay_rate, min_lr=spec.min_lr,
        warmup_lr=spec.warmup_lr, warmup_epochs=spec.warmup_epochs, patience_epochs=spec.plateau_patience,
        step_on_epochs=not spec.per_update, updates_per_epoch=updates_per_epoch)
    return scheduler


@dataclass
class Plateau:
    """timm's PlateauLRScheduler driven by validation accuracy after each epoch; it rewrites the rest of
    the table. Its state (a few numbers) travels in the checkpoint."""
    scheduler: PlateauLRScheduler

    @classmethod
    def build(cls, spec: ScheduleSpec, base_lr: float, epochs: int) -> "Plateau":
        optimizer = _stand_in(base_lr)
        scheduler, _ = create_scheduler_v2(optimizer, sched="plateau", num_epochs=epochs, decay_rate=spec.decay_rate,
                                           min_lr=spec.min_lr, patience_epochs=spec.plateau_patience, plateau_mode="max")
        return cls(scheduler)

    def after_epoch(self, epoch: int, val_acc: float, table: torch.Tensor, updates_per_epoch: int) -> None:
        """`epoch` epochs are done: step the scheduler and write its lr into every later update."""
        self.scheduler.step(epoch, val_acc)
        table[epoch * updates_per_epoch:] = self._lr()

    def state_dict(self) -> dict:
        # timm's own state_dict drops the bad-epoch count: save torch's ReduceLROnPlateau whole, and the lr
        return {"plateau": self.scheduler.lr_scheduler.state_dict(), "lr": self._lr()}

    def load_state_dict(self, state: dict, table: torch.Tensor, epoch: int, updates_per_epoch: int) -> None:
        self.scheduler.lr_scheduler.load_state_dict(state["plateau"])
        self.scheduler.optimizer.param_groups[0]["lr"] = state["lr"]
        table[epoch * updates_per_epoch:] = state["lr"]

    def _lr(self) -> float:
        return float(self.scheduler.optimizer.param_groups[0]["lr"])


class LearningRate:
    """The learning rate of a run in one object: the table (float64 on the host: what the metrics print and a
    plateau rewrites), its float32 copy on the device, the per-update write into the optimizer's LR tensors,
    and the plateau schedule with its state.

    A fused optimizer (every device) reads its LR from a device tensor: `write` fills it from the device table at
    the device's update counter with `take`, so no value crosses to the host and the write is captured with the
    rest of the update. Other optimizers (Lookahead, RMSprop, ...) keep a host float, set from the host table."""

    def __init__(self, table: torch.Tensor, optimizer: torch.optim.Optimizer, device: torch.device,
                 updates_per_epoch: int, plateau: Plateau | None = None):
        self.table, self.groups, self.updates_per_epoch, self.plateau = table, optimizer.param_groups, updates_per_epoch, plateau
        self.on_device = lr_on_device(optimizer, device)
        self.device_table = table.to(device=device, dtype=torch.float32) if self.on_device else None
        self.last = len(table) - 1  # past the planned updates (a long bench) the last LR holds

    def write(self, update: torch.Tensor, num_updates: int) -> None:
        """Set every group's LR for the update about to run (`update` on the device, `num_updates` its host twin)."""
        if self.on_device:
            lr = self.device_table.take(update.clamp(max=self.last))  # 0-dim, on the device: no host read
            for group in self.groups:
                group["lr"].copy_(lr * group.get("lr_scale", 1.0))
        else:
            lr = float(self.table[min(num_updates, self.last)])
            for group in self.groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def use_table(self, table: torch.Tensor) -> None:
        """Put another table in place before the first update (kit lr-find's sweep): a captured update reads the
        device table it was recorded with."""
        self.table, self.last = table.to(torch.float64), len(table) - 1
        if self.on_device:
            self.device_table = self.table.to(device=self.device_table.device, dtype=torch.float32)

    def at_epoch(self, epoch: int) -> float:
        """The LR of the first update of epoch `epoch` (0-based)."""
        return float(self.table[min(epoch * self.updates_per_epoch, self.last)])

    def after_epoch(self, epoch: int, val_acc: float) -> None:
        """`epoch` epochs are done: a plateau schedule rewrites the rest of the table (others are fixed)."""
        if self.plateau is not None:
            self.plateau.after_epoch(epoch, val_acc, self.table, self.updates_per_epoch)
            self._to_device()

    def state_dict(self) -> dict:
        return self.plateau.state_dict() if self.plateau is not None else {}

    def load_state_dict(self, state: dict, epoch: int) -> None:
        if self.plateau is not None:
            self.plateau.load_state_dict(state, self.table, epoch, self.updates_per_epoch)
            self._to_device()

    def _to_device(self) -> None:
        if self.device_table is not None:
            self.device_table.copy_(self.table)  # between epochs, outside the update
