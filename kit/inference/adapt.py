"""Test-time BatchNorm adaptation (Schneider et al., 2020; Nado et al., 2020): a checkpoint's BatchNorm
statistics re-estimated on the unlabelled images it is about to predict, optionally blended with its training
statistics. Only the model in memory changes; the checkpoint on disk does not.

The statistics are exact over all the given images (cumulative averages over batches, `momentum=None`), in
eval mode for everything but BatchNorm (dropout stays off). With a prior strength N, each layer's mean and
variance are N/(N+n) of the training ones plus n/(N+n) of the new ones, n being the number of images
(Schneider et al.'s rule, with the whole unlabelled set as the test batch)."""

import copy

import torch
from torch import nn

from kit.data.augment import normalize, to_float
from kit.device import Precision
from kit.errors import KitError


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, prec: Precision,
                    batch_size: int = 500, prior: float = 0.0, name: str = "model") -> nn.Module:
    """A copy of `model` whose BatchNorm statistics come from `images` (uint8 (N, C, H, W)), blended with its own
    by the prior strength `prior` (0: the new statistics alone)."""
    adapted = copy.deepcopy(model).eval()
    layers = batchnorm_layers(adapted)
    if not layers:
        raise KitError(f"{name}: has no BatchNorm layer, so --adapt-bn has nothing to re-estimate")
    trained = [(bn.running_mean.clone(), bn.running_var.clone(), bn.momentum) for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: every image weighs the same
        bn.train()
    mean, std = mean.to(prec.device), std.to(prec.device)
    for start in range(0, len(images), batch_size):
        x = normalize(to_float(images[start:start + batch_size].to(prec.device)), mean, std)
        with prec.autocast():
            adapted(prec.inputs(x))
    weight = prior / (prior + len(images))
    for bn, (run_mean, run_var, momentum) in zip(layers, trained):
        bn.running_mean.mul_(1 - weight).add_(run_mean, alpha=weight)
        bn.running_var.mul_(1 - weight).add_(run_var, alpha=weight)
        bn.momentum = momentum
        bn.eval()
    return adapted
