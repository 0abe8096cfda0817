"""Everything one training run holds in memory, built from a recipe: the model, EMA, optimizer, the LR
table, augmentation, loss, precision, the two random streams, and the `Trainer` that runs the update."""

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from kit.augment import BatchAugment, normalize, to_float
from kit.data import Dataset, Split
from kit.device import Precision, captures, compiles, training_precision
from kit.ema import CachedModelEma
from kit.engine import ForwardLoss, Trainer, graph_blocker
from kit.models import build_model, count_parameters
from kit.models.resnet import init_whitening, whiten_stem
from kit.optim import build_optimizer, make_capturable
from kit.recipe import Recipe
from kit.schedule import LearningRate, Plateau, lr_table

AUGMENT_SEED_STRIDE = 10_000  # rank r draws augmentation from seed + stride * (r + 1): apart from the order stream


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)


def to_device(split: Split, device: torch.device) -> Split:
    return Split(split.images.to(device), split.labels.to(device))


@dataclass
class Session:
    model: nn.Module  # the eager module: weights, state dicts, evaluation
    ema: object | None
    optimizer: torch.optim.Optimizer
    trainer: Trainer
    scaler: torch.amp.GradScaler | None
    prec: Precision
    val: Split
    mean: torch.Tensor
    std: torch.Tensor
    num_params: int

    @property
    def updates_per_epoch(self) -> int:
        return self.trainer.updates_per_epoch

    @property
    def ema_model(self) -> nn.Module | None:
        return None if self.ema is None else self.ema.module

    @property
    def lr(self) -> LearningRate:
        return self.trainer.lr


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
    if capture:  # the whole step is one CUDA graph: compiled kernels go inside it, without graphs of their own
        return torch.compile(forward_loss, mode="max-autotune-no-cudagraphs" if mode == "max-autotune" else None)
    return torch.compile(forward_loss, mode=None if mode == "default" else mode)


def build_session(recipe: Recipe, dataset: Dataset, device: torch.device, source: str = "recipe", rank: int = 0,
                  world_size: int = 1, echo: Callable[[str], None] = print) -> Session:
    """Seed, build and place everything a run needs; the data goes to the device once, as uint8."""
    spec = recipe.train
    seed_everything(spec.seed)
    prec = training_precision(spec.precision, spec.channels_last, device)
    model = build_model(recipe, source).to(device)
    mean = torch.tensor(dataset.mean, device=device)
    std = torch.tensor(dataset.std, device=device)
    stem = whiten_stem(model)
    if stem is not None:
        init_whitening(stem, whitening_sample(dataset, mean, std))
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = CachedModelEma(model, spec.ema_decay) if spec.ema_decay is not None else None
    optimizer = build_optimizer(model, recipe.optim)
    train = to_device(dataset.train, device)
    updates_per_epoch = len(train) // spec.batch_size
    plateau = Plateau.build(recipe.schedule, recipe.optim.lr, spec.epochs) if recipe.schedule.name == "plateau" else None
    lr = LearningRate(lr_table(recipe.schedule, recipe.optim.lr, spec.epochs, updates_per_epoch), optimizer, device,
                      updates_per_epoch, plateau)
    scaler = torch.amp.GradScaler("cuda") if prec.dtype == torch.float16 else None
    blocker = graph_blocker(cuda_graph=spec.cuda_graph, mixup=bool(recipe.augment.mixup_alpha or recipe.augment.cutmix_alpha),
                            fp16=scaler is not None, optimizer=optimizer, world_size=world_size)
    if blocker is None:
        make_capturable(optimizer)  # on every device: the CPU runs the update CUDA captures
    elif captures(device):
        echo(f"eager step (not one CUDA graph): {blocker}")
    capture = blocker is None and captures(device)
    forward_loss = ForwardLoss(_wrap(model, world_size, device), _loss(recipe))
    if recipe.distill.teachers:
        from kit.distill import DistillLoss, load_teachers
        forward_loss = DistillLoss(forward_loss.model, forward_loss.loss_fn, load_teachers(recipe, mean, std, device),
                                   recipe.distill.alpha)
    forward_loss = _compile(forward_loss, spec.compile, capture, device)
    augment = BatchAugment(recipe.augment, mean, std, recipe.model.num_classes, spec.label_smoothing)
    order_gen = torch.Generator(device=device).manual_seed(spec.seed)
    aug_gen = torch.Generator(device=device).manual_seed(spec.seed + AUGMENT_SEED_STRIDE * (rank + 1))
    trainer = Trainer(model, forward_loss, optimizer, augment, train, lr, recipe.optim, prec, order_gen, aug_gen,
                      spec.batch_size, ema=ema, scaler=scaler, rank=rank, world_size=world_size, capture=capture, echo=echo)
    return Session(model, ema, optimizer, trainer, scaler, prec, to_device(dataset.val, device), mean, std,
                   count_parameters(model))
