"""`kit doctor [RECIPE]`: what this machine will do with kit, before a team spends its GPU hours: the device and
its compute capability, torch and CUDA versions, whether torch's build has kernels for the device, the precision
and whether a recipe's update will be one CUDA graph (and if not, why), free memory, the optional packages, and
one line of advice wherever two of these disagree."""

import importlib.metadata
from typing import Callable

import torch

from kit.device import choose_precision, resolve_device

OPTIONAL = ("timm", "optuna", "onnxruntime", "safetensors", "tensorboard")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with these architectures runs on a device of this compute capability: its own sm_XY,
    an sm_XZ of the same major with Z <= Y (binary compatible), or PTX (compute_XY) at or below it."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        a_major, a_minor = int(number[:-1]), int(number[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def doctor(recipe_path: str | None = None, device: str = "auto", echo: Callable[[str], None] = print) -> list[str]:
    """Print (and return) the lines; advice lines start with `advice:`."""
    dev = resolve_device(device)
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}; "
             + ", ".join(f"{p} {_version(p)}" for p in OPTIONAL)]
    advice = []
    if dev.type == "cuda":
        capability = torch.cuda.get_device_capability(dev)
        arch = torch.cuda.get_arch_list()
        free, total = torch.cuda.mem_get_info(dev)
        lines.append(f"device: {torch.cuda.get_device_name(dev)}, compute capability {capability[0]}.{capability[1]}, "
                     f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        lines.append(f"torch's kernels: {' '.join(arch) or 'none listed'}")
        if not has_kernels(capability, arch):
            advice.append(f"advice: this torch build has no kernels for sm_{capability[0]}{capability[1]}: install a torch "
                          f"build whose arch list includes it (older CUDA builds of torch still ship sm_60/sm_70)")
    else:
        lines.append("device: the CPU (no CUDA device here): kit trains and predicts in fp32, eagerly, no CUDA graph")
    precision, why = choose_precision("auto", dev)
    lines.append(f"precision: {precision} ({why}); predict, evaluate and report use the same rule")
    if recipe_path is not None:
        lines += _recipe_lines(recipe_path, dev, advice)
    lines += advice
    for line in lines:
        echo(line)
    return lines


def _recipe_lines(recipe_path: str, dev: torch.device, advice: list[str]) -> list[str]:
    from kit.models import build_model, count_parameters
    from kit.recipe import load_recipe
    from kit.training.engine import graph_blocker
    from kit.training.optim import build_optimizer, lr_on_device
    recipe = load_recipe(recipe_path)
    model = build_model(recipe, recipe_path, check_budget=False)
    optimizer = build_optimizer(model, recipe.optim)
    lr_on_device(optimizer, torch.device("cpu"))  # as build_trainer does: a fused optimizer reads its LR from a tensor
    blocker = graph_blocker(cuda_graph=recipe.train.cuda_graph, mixup=bool(recipe.augment.mixup_alpha or recipe.augment.cutmix_alpha),
                            optimizer=optimizer, world_size=1)
    precision, why = choose_precision(recipe.train.precision, dev)
    if blocker is not None:
        graph = f"eager, not one CUDA graph: {blocker}"
    else:
        graph = "one CUDA graph per update" if dev.type == "cuda" else "one CUDA graph per update on a GPU (eager here)"
    lines = [f"recipe {recipe.name}: {count_parameters(model):,} parameters, precision {precision} ({why}), update: {graph}"]
    if dev.type == "cuda" and recipe.train.precision == "bf16" and precision == "bf16" and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        advice.append(f"advice: {recipe_path} asks for bf16, which this GPU only emulates: set train.precision: auto (fp16 here)")
    return lines
