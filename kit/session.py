"""Everything one training run holds in memory, built from a recipe: model (and its compiled form),
EMA, optimizer, schedule, scaler, augmentation, loss, precision and the data stream's generator."""

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kit.augment import BatchAugment
from kit.data import Dataset, Split
from kit.device import Precision, training_precision
from kit.ema import CachedModelEma
from kit.engine import ForwardLoss, StepHooks
from kit.models import build_model, count_parameters
from kit.optim import LRSchedule, build_optimizer, clip_gradients
from kit.recipe import Recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)


def to_device(split: Split, device: torch.device) -> Split:
    return Split(split.images.to(device), split.labels.to(device))


@dataclass
class Session:
    model: nn.Module  # the eager module: weights, state dicts, evaluation
    step_model: nn.Module  # ForwardLoss over `model`, compiled or not: what the training step calls
    ema: object | None
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    augment: BatchAugment
    hooks: StepHooks
    prec: Precision
    gen: torch.Generator
    train: Split
    val: Split
    mean: torch.Tensor
    std: torch.Tensor
    num_params: int

    @property
    def ema_model(self) -> nn.Module | None:
        return None if self.ema is None else self.ema.module


def _loss(recipe: Recipe) -> nn.Module:
    if recipe.augment.mixup_alpha or recipe.augment.cutmix_alpha:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()  # mixup already folded label smoothing into the targets
    return nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)


def build_session(recipe: Recipe, dataset: Dataset, device: torch.device, source: str = "recipe") -> Session:
    """Seed, build and place everything a run needs; the data goes to the device once, as uint8."""
    spec = recipe.train
    seed_everything(spec.seed)
    prec = training_precision(spec.precision, spec.channels_last, device)
    model = build_model(recipe, source).to(device)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = _loss(recipe)
    step_model = ForwardLoss(model, loss_fn)
    if spec.compile != "none" and device.type == "cuda":
        step_model = torch.compile(step_model, mode=None if spec.compile == "default" else spec.compile)
    ema = CachedModelEma(model, spec.ema_decay) if spec.ema_decay is not None else None
    optimizer = build_optimizer(model, recipe.optim, fused=device.type == "cuda")
    train = to_device(dataset.train, device)
    schedule = LRSchedule(optimizer, recipe.schedule, spec.epochs, len(train) // spec.batch_size)
    scaler = torch.amp.GradScaler("cuda") if prec.dtype == torch.float16 else None
    mean = torch.tensor(dataset.mean, device=device)
    std = torch.tensor(dataset.std, device=device)
    augment = BatchAugment(recipe.augment, mean, std, recipe.model.num_classes, spec.label_smoothing)
    hooks = StepHooks(optimizer, lambda: clip_gradients(model, recipe.optim), schedule.after_update,
                      ema, model, scaler)
    gen = torch.Generator(device=device)
    gen.manual_seed(spec.seed)
    return Session(model, step_model, ema, optimizer, schedule, scaler, augment, hooks, prec, gen,
                   train, to_device(dataset.val, device), mean, std, count_parameters(model))
