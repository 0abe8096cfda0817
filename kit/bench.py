"""`kit bench`: training throughput of the kit engine against a seed-style loop (torchvision
transforms + DataLoader(num_workers=2), fp32, as the papers trained), same model and batch size,
same process. Prints both figures and their ratio."""

import dataclasses
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from kit.data import Split, load_dataset
from kit.data import Dataset as KitDataset
from kit.engine import TrainState, train_one_epoch
from kit.models import build_model
from kit.optim import build_optimizer
from kit.recipe import AugmentSpec, Recipe
from kit.device import resolve_device
from kit.session import build_session, seed_everything

SYNTHETIC_IMAGES = 50_000  # CIFAR-10's training-set size


class _Images(Dataset):
    """uint8 (3, 32, 32) tensors through per-sample torchvision transforms, as a seed notebook does."""

    def __init__(self, split: Split, transform):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def baseline_transform(spec: AugmentSpec, mean, std) -> v2.Compose:
    """The recipe's augmentation written the usual per-sample way."""
    steps = []
    if spec.crop_padding:
        steps.append(v2.RandomCrop(32, padding=spec.crop_padding))
    if spec.flip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.rotation_degrees:
        steps.append(v2.RandomRotation(spec.rotation_degrees))
    if spec.color_jitter:
        s = spec.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def _timed(fn: Callable[[], int], device: torch.device) -> float:
    """Images per second of fn(), which returns how many images it trained on."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def bench_kit(recipe: Recipe, data: KitDataset, device: torch.device, steps: int, warmup: int) -> float:
    """The kit engine: data resident on the device, batch augmentation, the recipe's precision/compile."""
    s = build_session(recipe, data, device, recipe.name)
    state, bs = TrainState(), recipe.train.batch_size

    def run(n: int) -> int:
        done = 0
        while done < n:
            done += train_one_epoch(s.step_model, s.train, s.augment, s.hooks, state, bs,
                                    s.gen, s.prec, max_steps=n - done).images // bs
        return done * bs

    run(warmup)  # compilation and CUDA-graph capture happen here
    return _timed(lambda: run(steps), device)


def bench_baseline(recipe: Recipe, data: KitDataset, device: torch.device, steps: int, warmup: int) -> float:
    """The seed-style loop: per-sample CPU transforms in 2 workers, fp32, contiguous NCHW."""
    seed_everything(recipe.train.seed)
    model = build_model(recipe, recipe.name, check_budget=False).to(device)
    optimizer = build_optimizer(model, recipe.optim)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(_Images(data.train, baseline_transform(recipe.augment, data.mean, data.std)),
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

    run(warmup)
    return _timed(lambda: run(steps), device)


def synthetic_data(n: int, num_classes: int) -> KitDataset:
    """Random pixels: throughput does not depend on content."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    split = Split(images, labels)
    return KitDataset(split, split, [str(i) for i in range(num_classes)], (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def bench(recipe: Recipe, steps: int = 50, batch_size: int | None = None, data_root: str | None = None,
          device: str = "auto", warmup: int = 10, echo: Callable[[str], None] = print) -> dict:
    """Measure both loops; returns {'kit': img/s, 'baseline': img/s, 'ratio': kit/baseline}."""
    if batch_size:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=batch_size))
    dev = resolve_device(device)
    data = load_dataset(recipe.data, data_root) if data_root else synthetic_data(SYNTHETIC_IMAGES, recipe.model.num_classes)
    bs, t = recipe.train.batch_size, recipe.train
    echo(f"bench {recipe.name}: batch {bs}, {steps} timed steps after {warmup} warm-up, {dev}"
         f"{'' if data_root else ', synthetic images'}")
    kit_rate = bench_kit(recipe, data, dev, steps, warmup)
    echo(f"kit engine  ({t.precision if dev.type == 'cuda' else 'fp32'}, channels_last {t.channels_last and dev.type == 'cuda'}, "
         f"compile {t.compile if dev.type == 'cuda' else 'none'}): {kit_rate:,.0f} images/s")
    base_rate = bench_baseline(recipe, data, dev, steps, warmup)
    echo(f"baseline    (torchvision transforms + DataLoader(num_workers=2), fp32): {base_rate:,.0f} images/s")
    echo(f"ratio: {kit_rate / base_rate:.2f}x")
    return {"kit": kit_rate, "baseline": base_rate, "ratio": kit_rate / base_rate}
