"""Optimizer (timm's factory), gradient clipping, and moving optimizer state between devices."""

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from kit.recipe import OptimSpec


FUSABLE = ("sgd", "momentum", "adam", "adamw", "adagrad")  # torch optimizers with a fused CUDA kernel


def build_optimizer(model: nn.Module, spec: OptimSpec, fused: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer factory, with torch's all-parameter weight decay unless the recipe exempts BN/bias.
    `fused` (CUDA): one kernel per step instead of per-tensor-group launches; same math."""
    extra = {"betas": spec.betas} if spec.betas else {}
    if fused and spec.name in FUSABLE:
        extra["fused"] = True
    params = model
    if spec.norm_lr_scale != 1.0:
        norm = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False) if p.requires_grad]
        ids = {id(p) for p in norm}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        decay = spec.weight_decay if spec.decay_norm_and_bias else 0.0
        params = [{"params": rest}, {"params": norm, "lr_scale": spec.norm_lr_scale, "weight_decay": decay}]
    return create_optimizer_v2(params, opt=spec.name, lr=spec.lr, weight_decay=spec.weight_decay,
                               momentum=spec.momentum, filter_bias_and_bn=not spec.decay_norm_and_bias, **extra)


def clip_gradients(model: nn.Module, spec: OptimSpec) -> None:
    """Clip by global norm or by value, as the recipe says."""
    if spec.grad_clip is None:
        return
    if spec.grad_clip_mode == "norm":
        nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    else:
        nn.utils.clip_grad_value_(model.parameters(), spec.grad_clip)


def lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Give each parameter group its LR as a device tensor, which torch's fused CUDA kernels read from
    device memory: the LR then changes inside a captured CUDA graph. False (and nothing changed) for an
    optimizer without a fused kernel."""
    if not all(g.get("fused") for g in optimizer.param_groups):
        return False
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]) * group.get("lr_scale", 1.0), device=device)
    return True


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Adam and AdamW refuse CUDA-graph capture of step() unless their groups say capturable (fused or not)."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True


DEVICE_FLAGS = ("fused", "foreach", "capturable")  # how a group steps on this device, not what it learned


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """load_state_dict, keeping this optimizer's device flags (a state saved with a fused CUDA optimizer then
    steps with the CPU's kernels, and the other way round) and its LR tensors: the engine writes each update's
    LR into those very tensors, which load_state_dict would otherwise replace with the saved ones."""
    flags = [{k: g[k] for k in DEVICE_FLAGS if k in g} for g in optimizer.param_groups]
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own, lr in zip(optimizer.param_groups, flags, lrs):
        group.update(own)
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr


