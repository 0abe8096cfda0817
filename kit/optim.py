"""Optimizer (timm), learning-rate schedule (timm, or torch's one-cycle) and gradient clipping."""

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from torch import nn

from kit.errors import KitError
from kit.recipe import OptimSpec, ScheduleSpec


FUSABLE = ("sgd", "momentum", "adam", "adamw", "adagrad")  # torch optimizers with a fused CUDA kernel


def build_optimizer(model: nn.Module, spec: OptimSpec, fused: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer factory, with torch's all-parameter weight decay unless the recipe exempts BN/bias.
    `fused` (CUDA): one kernel per step instead of per-tensor-group launches; same math."""
    extra = {"betas": spec.betas} if spec.betas else {}
    if fused and spec.name in FUSABLE:
        extra["fused"] = True
    return create_optimizer_v2(model, opt=spec.name, lr=spec.lr, weight_decay=spec.weight_decay,
                               momentum=spec.momentum, filter_bias_and_bn=not spec.decay_norm_and_bias, **extra)


def clip_gradients(model: nn.Module, spec: OptimSpec) -> None:
    """Clip by global norm or by value, as the recipe says."""
    if spec.grad_clip is None:
        return
    if spec.grad_clip_mode == "norm":
        nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    else:
        nn.utils.clip_grad_value_(model.parameters(), spec.grad_clip)


class LRSchedule:
    """One interface over timm's schedulers and torch's OneCycleLR: call `after_update` after every
    optimizer step and `after_epoch` after every epoch; the optimizer's lr is then the next one to use."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, epochs: int, updates_per_epoch: int):
        self.spec, self.epochs = spec, epochs
        self.per_update = spec.per_update and spec.name != "plateau"  # plateau needs an epoch's metric
        self.impl = self._build(optimizer, spec, epochs, updates_per_epoch)

    def _build(self, optimizer, spec: ScheduleSpec, epochs: int, updates_per_epoch: int):
        unit = updates_per_epoch if self.per_update else 1
        if spec.name == "onecycle":
            max_lr = [g["lr"] for g in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * updates_per_epoch,
                                                       pct_start=spec.onecycle_pct_start)
        if spec.name == "multistep":
            # timm decays when t + 1 reaches a milestone, one epoch (or update) before torch's MultiStepLR;
            # shifting each milestone by one step gives torch's meaning: lr drops at the start of epoch m.
            return MultiStepLRScheduler(optimizer, decay_t=[m * unit + 1 for m in spec.milestones],
                                        decay_rate=spec.decay_rate, warmup_t=spec.warmup_epochs * unit,
                                        warmup_lr_init=spec.warmup_lr, t_in_epochs=not self.per_update)
        if spec.name == "constant" and not spec.warmup_epochs:
            return None
        name = "step" if spec.name == "constant" else spec.name
        decay = spec.decay_epochs  # only step uses it; always a number (older timm multiplies it unconditionally)
        if spec.name == "constant":  # a warmup then a flat lr: a step schedule that never decays
            decay = epochs + 1
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=name, num_epochs=epochs, decay_epochs=decay, decay_rate=spec.decay_rate,
            min_lr=spec.min_lr, warmup_lr=spec.warmup_lr, warmup_epochs=spec.warmup_epochs,
            patience_epochs=spec.plateau_patience, step_on_epochs=not self.per_update,
            updates_per_epoch=updates_per_epoch)
        return scheduler

    def after_update(self, num_updates: int) -> None:
        if isinstance(self.impl, torch.optim.lr_scheduler.OneCycleLR):
            if self.impl.last_epoch + 1 < self.impl.total_steps:  # its last step would raise
                self.impl.step()
        elif self.impl is not None and self.per_update:
            self.impl.step_update(num_updates)

    def after_epoch(self, epoch: int, metric: float | None = None) -> None:
        """`epoch` is the number of epochs completed."""
        if self.impl is None or isinstance(self.impl, torch.optim.lr_scheduler.OneCycleLR):
            return
        if self.per_update:
            return
        self.impl.step(epoch, metric) if self.spec.name == "plateau" else self.impl.step(epoch)

    def state_dict(self) -> dict:
        return {} if self.impl is None else self.impl.state_dict()

    def resume(self, state: dict, saved_epochs: int, epochs_done: int, num_updates: int) -> None:
        """Restore after a resume; a changed epoch count rebuilds the schedule for the new length."""
        if self.impl is None:
            return
        if isinstance(self.impl, torch.optim.lr_scheduler.OneCycleLR):
            if saved_epochs != self.epochs:
                raise KitError(f"a one-cycle schedule cannot be extended: the run was planned for {saved_epochs} epochs")
            self.impl.load_state_dict(state)
            return
        if self.spec.name == "plateau" or saved_epochs == self.epochs:
            self.impl.load_state_dict(state)
        # timm's schedules are functions of the step count: set the lr for what comes next
        if self.per_update:
            self.impl.step_update(num_updates)
        elif self.spec.name != "plateau":
            self.impl.step(epochs_done)


DEVICE_FLAGS = ("fused", "foreach", "capturable")  # how a group steps on this device, not what it learned


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """load_state_dict, keeping this optimizer's device flags: a state saved with a fused CUDA optimizer
    then steps with the CPU's kernels, and the other way round."""
    flags = [{k: g[k] for k in DEVICE_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's learning rate."""
    return float(optimizer.param_groups[0]["lr"])
