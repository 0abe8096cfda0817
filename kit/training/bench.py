"""`kit bench`: training throughput of the kit engine against a seed-style loop (torchvision
transforms + DataLoader(num_workers=2), fp32, as the papers trained), same model and batch size,
same process. Prints both figures and their ratio, the eager update's breakdown (augmentation,
forward + backward, optimizer + EMA) and the model's floor (FLOPs and activation bytes per image)."""

import dataclasses
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from kit.data.datasets import Dataset as KitDataset
from kit.data.datasets import Labelled, load_dataset
from kit.device import choose_precision, resolve_device, training_precision
from kit.models import build_model
from kit.recipe import AugmentSpec, Recipe, known_num_classes, with_num_classes
from kit.training.engine import PHASES, Trainer, build_trainer, run_updates
from kit.training.optim import build_optimizer
from kit.training.run import silent
from kit.training.streams import seed_everything

# Dense bf16 matrix throughput and memory bandwidth the floor uses, by device name
PEAKS = {"H100": (800e12, 3.0e12), "H200": (790e12, 4.8e12)}

SYNTHETIC_IMAGES = 50_000  # CIFAR-10's training-set size


class _Images(Dataset):
    """uint8 (C, S, S) tensors through per-sample torchvision transforms, as a seed notebook does."""

    def __init__(self, split: Labelled, transform):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def baseline_transform(spec: AugmentSpec, mean, std, image_size: int = 32) -> v2.Compose:
    """The recipe's augmentation written the usual per-sample way."""
    transforms = []
    if spec.crop_padding:
        transforms.append(v2.RandomCrop(image_size, padding=spec.crop_padding))
    if spec.flip:
        transforms.append(v2.RandomHorizontalFlip())
    if spec.rotation_degrees:
        transforms.append(v2.RandomRotation(spec.rotation_degrees))
    if spec.color_jitter:
        s = spec.color_jitter
        transforms.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    return v2.Compose(transforms + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def _timed(fn: Callable[[], int], device: torch.device) -> float:
    """Images per second of fn(), which returns how many images it trained on."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def _run_updates(trainer: Trainer, n: int) -> int:
    """n updates through the Trainer's epoch loop (over as many epochs as needed); returns the images trained on."""
    run_updates(trainer, n)
    return n * trainer.batch_size


def bench_kit(recipe: Recipe, data: KitDataset, device: torch.device, updates: int, untimed: int) -> tuple[float, bool]:
    """The kit engine: data resident on the device, batch augmentation, the recipe's precision, compile and capture.
    Returns images/s and whether the update ran as a CUDA graph (the trainer's own decision: graph_blocker, captures)."""
    trainer = build_trainer(recipe, data, device, recipe.name, echo=silent)
    _run_updates(trainer, untimed)  # compilation and CUDA-graph capture happen here
    return _timed(lambda: _run_updates(trainer, updates), device), trainer.graph is not None


def update_breakdown(recipe: Recipe, data: KitDataset, device: torch.device, updates: int) -> dict[str, float]:
    """Milliseconds per update of each phase of the Trainer's own update, run eagerly (CUDA events on CUDA, the clock
    on the CPU), marked by its `on_phase` hook."""
    eager = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, cuda_graph=False))
    t = build_trainer(eager, data, device, recipe.name, echo=silent)
    _run_updates(t, 2)
    clock = _EventClock(device)
    totals = dict.fromkeys(PHASES, 0.0)
    marks: list = []  # per update: its start, then the end of each phase
    t.on_phase = lambda phase: marks.append(clock.mark())
    run_updates(t, updates)  # epoch by epoch, as training runs them
    t.on_phase = None
    for start in range(0, len(marks), len(PHASES) + 1):
        for phase, ms in zip(PHASES, clock.elapsed_ms(marks[start:start + len(PHASES) + 1])):
            totals[phase] += ms / updates
    return totals


class _EventClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, marks: list) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [(b - a) * 1000 for a, b in zip(marks, marks[1:])]


def model_floor(recipe: Recipe, device: torch.device) -> dict:
    """FLOPs per image of forward + backward (torch's FLOP counter), bytes of activations written per image
    in the forward (every module's output, in the training precision), and the device's floor where its peaks are known."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(recipe, recipe.name, check_budget=False).to(device).train()
    prec = training_precision(recipe.train.precision, recipe.train.channels_last, device)
    images = torch.randn(2, *recipe.data.image_shape, device=device)
    activation_bytes = 0

    def count(module, args, output):
        nonlocal activation_bytes
        if isinstance(output, torch.Tensor) and not list(module.children()):
            activation_bytes += output.numel() * (2 if prec.dtype is not None else 4)

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with FlopCounterMode(display=False) as counter, prec.autocast():
        model(images).float().logsumexp(1).sum().backward()
    for hook in hooks:
        hook.remove()
    flops, per_image_bytes = counter.get_total_flops() / 2, activation_bytes / 2
    floor = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, (peak_flops, bandwidth) in PEAKS.items():
        if key in name:
            floor = min(peak_flops / flops, bandwidth / per_image_bytes)
    return {"flops_per_image": flops, "activation_bytes_per_image": per_image_bytes, "floor_images_per_s": floor}


def bench_baseline(recipe: Recipe, data: KitDataset, device: torch.device, updates: int, untimed: int) -> float:
    """The seed-style loop: per-sample CPU transforms in 2 workers, fp32, contiguous NCHW."""
    seed_everything(recipe.train.seed)
    model = build_model(recipe, recipe.name, check_budget=False).to(device)
    optimizer = build_optimizer(model, recipe.optim, fused=False)  # a notebook's plain torch optimizer
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(_Images(data.train, baseline_transform(recipe.augment, data.mean, data.std, recipe.data.image_size)),
                        batch_size=recipe.train.batch_size, shuffle=True, num_workers=2, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=True)
    batches = iter(loader)

    def run(n: int) -> int:
        nonlocal batches
        model.train()
        for _ in range(n):
            try:
                inputs, labels = next(batches)
            except StopIteration:
                batches = iter(loader)
                inputs, labels = next(batches)
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return n * recipe.train.batch_size

    run(untimed)
    return _timed(lambda: run(updates), device)


def synthetic_data(n: int, num_classes: int, size: int = 32, channels: int = 3) -> KitDataset:
    """Random pixels: throughput does not depend on content."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    split = Labelled(images, labels, np.arange(n))
    return KitDataset(split, split, [str(i) for i in range(num_classes)], (0.49, 0.48, 0.45)[:channels], (0.25, 0.24, 0.26)[:channels])


def bench(recipe: Recipe, updates: int = 50, batch_size: int | None = None, data_root: str | None = None,
          device: str = "auto", untimed: int = 10, echo: Callable[[str], None] = print) -> dict:
    """Measure both loops, the eager update's phases and the model's floor; returns every figure printed
    ({'kit', 'baseline', 'ratio', 'breakdown_ms', 'flops_per_image', 'activation_bytes_per_image', 'floor_images_per_s'})."""
    if batch_size:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=batch_size))
    dev = resolve_device(device)
    data = load_dataset(recipe.data, data_root) if data_root else synthetic_data(SYNTHETIC_IMAGES, known_num_classes(recipe) or 10,
                                                                                      recipe.data.image_size, recipe.data.channels)
    recipe = with_num_classes(recipe, len(data.classes), recipe.name)
    bs, t = recipe.train.batch_size, recipe.train
    echo(f"bench {recipe.name}: batch {bs}, {updates} timed updates after {untimed} untimed, {dev}"
         f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}, torch {torch.__version__}"
         f"{'' if data_root else ', synthetic images'}")
    kit_rate, capture = bench_kit(recipe, data, dev, updates, untimed)
    echo(f"kit engine  ({choose_precision(t.precision, dev)[0]}, channels_last {t.channels_last and dev.type == 'cuda'}, "
         f"compile {t.compile if dev.type == 'cuda' else 'none'}, cuda_graph {capture}): {kit_rate:,.0f} images/s")
    base_rate = bench_baseline(recipe, data, dev, updates, untimed)
    echo(f"baseline    (torchvision transforms + DataLoader(num_workers=2), fp32): {base_rate:,.0f} images/s")
    ratio = kit_rate / base_rate
    echo(f"ratio: {ratio:.2f}x")
    breakdown = update_breakdown(recipe, data, dev, max(3, min(updates, 20)))
    echo("eager update: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in breakdown.items())
         + f" (sum {sum(breakdown.values()):.2f} ms = {bs / max(sum(breakdown.values()), 1e-9) * 1000:,.0f} images/s)")
    floor = model_floor(recipe, dev)
    line = (f"model: {floor['flops_per_image'] / 1e9:.2f} GFLOP and {floor['activation_bytes_per_image'] / 1e6:.1f} MB of "
            f"activations per image per update")
    if floor["floor_images_per_s"]:
        line += f"; floor on this device {floor['floor_images_per_s']:,.0f} images/s (kit at {kit_rate / floor['floor_images_per_s']:.0%})"
    echo(line)
    return {"kit": kit_rate, "baseline": base_rate, "ratio": ratio, "breakdown_ms": breakdown, **floor}
