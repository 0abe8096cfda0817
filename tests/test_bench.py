"""`kit bench`'s figures come back from bench() itself (no parsing of rounded printed rates), and the
model's FLOP count agrees with a count by hand."""

import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.models import build_model
from kit.recipe import load_recipe
from kit.training.bench import bench, model_floor

CPU = torch.device("cpu")


pytestmark = pytest.mark.slow


def test_bench_returns_the_ratio_of_the_rates_it_measured():
    lines = []
    figures = bench(load_recipe(RECIPES_DIR / "demo.yaml"), updates=2, untimed=1, device="cpu", echo=lines.append)
    assert figures["kit"] > 0 and figures["baseline"] > 0
    assert figures["ratio"] == figures["kit"] / figures["baseline"]
    assert f"ratio: {figures['ratio']:.2f}x" in lines
    assert set(figures["breakdown_ms"]) == {"augmentation", "forward + backward", "optimizer + EMA"}
    assert all(ms > 0 for ms in figures["breakdown_ms"].values())
    assert figures["floor_images_per_s"] is None  # no known peak for a CPU


def test_bench_runs_past_the_recipes_planned_updates():
    recipe = load_recipe(RECIPES_DIR / "demo.yaml", ("train.epochs=1", "train.batch_size=600"))  # 2 updates planned
    figures = bench(recipe, updates=3, untimed=2, device="cpu", echo=lambda _: None)
    assert figures["kit"] > 0


def test_the_breakdown_times_the_trainers_own_update(monkeypatch, demo_data):
    """No copy of the update in the bench: every timed update is Trainer.update, its phases marked by its own hook,
    and the figures are the gaps between the marks it made."""
    from kit.data.datasets import load_dataset
    from kit.training import bench as bench_module
    from kit.training.engine import PHASES, Trainer
    calls, marks = [], iter(range(100))
    original = Trainer.update
    monkeypatch.setattr(Trainer, "update", lambda self: (calls.append(self.on_phase is not None), original(self))[1])
    monkeypatch.setattr(bench_module._EventClock, "mark", lambda self: float(next(marks)))  # 1 ms between marks
    recipe = load_recipe(RECIPES_DIR / "demo.yaml", ("model.args.width=0.125",))
    totals = bench_module.update_breakdown(recipe, load_dataset(recipe.data, demo_data), CPU, updates=3)
    assert calls == [False, False, True, True, True]  # two untimed, three timed
    assert totals == dict.fromkeys(PHASES, 1000.0)  # the clock's seconds as milliseconds, each phase one tick


def _forward_flops_by_hand(model: torch.nn.Module) -> float:
    """2 x multiply-adds of every convolution and the classifier for one 32x32 image."""
    flops, hooks = 0.0, []

    def conv(module, args, output):
        nonlocal flops
        k = module.kernel_size[0] * module.kernel_size[1]
        flops += 2 * module.in_channels * k * output[0].numel()

    def linear(module, args, output):
        nonlocal flops
        flops += 2 * module.in_features * module.out_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return flops


def test_model_floor_counts_forward_and_backward_flops():
    recipe = load_recipe(RECIPES_DIR / "resnet_4643.yaml")
    forward = _forward_flops_by_hand(build_model(recipe))
    figures = model_floor(recipe, CPU)
    # backward costs two forwards, less the input gradient of the first convolution
    assert 2.9 * forward < figures["flops_per_image"] <= 3.0 * forward
    assert figures["activation_bytes_per_image"] > 0
    assert 1.8e9 < figures["flops_per_image"] < 1.9e9  # the "~1.9 GFLOP per image per step" for resnet_4643
