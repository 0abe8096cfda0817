"""Optimizer (timm's factory), gradient clipping, and moving optimizer state between devices."""

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from kit.errors import KitError
from kit.recipe import OptimSpec

# timm names of the optimizers torch runs as one fused kernel on the CPU and on CUDA (torch >= 2.4); these read
# their LR from a device tensor, so the update is the same on every device and can be captured on CUDA.
# (torch's fused Adagrad runs on the CPU only, so it is not here.)
FUSABLE = ("sgd", "momentum", "adam", "adamw")


def build_optimizer(model: nn.Module, spec: OptimSpec, fused: bool = True) -> torch.optim.Optimizer:
    """timm's optimizer factory, fused where torch has the kernel (the engine's update, every device; `fused=False`
    for the bench's seed-style baseline), with torch's all-parameter weight decay unless the recipe exempts norm
    weights and biases (timm's rule: 1-D tensors and `.bias`)."""
    extra = {"betas": spec.betas} if spec.betas else {}
    if fused and spec.name in FUSABLE:
        extra["fused"] = True
    params = model if spec.norm_lr_scale == 1.0 else norm_scaled_groups(model, spec)
    return create_optimizer_v2(params, opt=spec.name, lr=spec.lr, weight_decay=spec.weight_decay,
                               momentum=spec.momentum, filter_bias_and_bn=not spec.decay_norm_and_bias, **extra)


def norm_scaled_groups(model: nn.Module, spec: OptimSpec) -> list[dict]:
    """Parameter groups for `optim.norm_lr_scale`: BatchNorm weights and biases at lr * scale, the rest at lr;
    without weight decay on norm parameters and other biases when `decay_norm_and_bias` is false (timm's factory
    applies its own bias rule only to a model, not to groups, so it is written out here)."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False) if p.requires_grad}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = spec.weight_decay if spec.decay_norm_and_bias else 0.0
    exempt = lambda n, p: not spec.decay_norm_and_bias and (p.ndim <= 1 or n.endswith(".bias"))  # noqa: E731
    groups = [{"params": [p for n, p in named if id(p) not in norm and not exempt(n, p)]},
              {"params": [p for n, p in named if id(p) not in norm and exempt(n, p)], "weight_decay": 0.0},
              {"params": [p for _, p in named if id(p) in norm], "lr_scale": spec.norm_lr_scale, "weight_decay": decay}]
    return [g for g in groups if g["params"]]


def lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Give each parameter group its LR as a float32 tensor on the device, which torch's fused kernels read from
    device memory: the LR then changes inside a captured CUDA graph, and the CPU runs the same update. False
    (and nothing changed) for an optimizer without a fused kernel, which keeps a host float."""
    if not all(g.get("fused") for g in optimizer.param_groups):
        return False
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]) * group.get("lr_scale", 1.0), dtype=torch.float32, device=device)
    return True


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Adam and AdamW refuse CUDA-graph capture of step() unless their groups say capturable (fused or not);
    set on every device, so the CPU runs the same update."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True


DEVICE_FLAGS = ("fused", "foreach", "capturable")  # how a group steps on this device, not what it learned


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: str = "checkpoint") -> None:
    """load_state_dict with this optimizer's device flags and its LR tensors.
    - The flags are copied into the saved groups before loading: torch places Adam's `step` by the *saved*
      groups' fused/capturable flags, so a CPU-saved state would leave fused CUDA Adam with host step counters.
    - The engine writes each update's LR into this optimizer's LR tensors, which load_state_dict would replace."""
    own = [{k: g[k] for k in DEVICE_FLAGS if k in g} for g in optimizer.param_groups]
    lrs = [g["lr"] for g in optimizer.param_groups]
    groups = [{**{k: v for k, v in saved.items() if k not in DEVICE_FLAGS}, **flags}
              for saved, flags in zip(state["param_groups"], own)]
    try:
        optimizer.load_state_dict({**state, "param_groups": groups + state["param_groups"][len(groups):]})
    except ValueError as err:
        raise KitError(f"{source}: the optimizer state does not fit this recipe's optimizer ({err})") from None
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
