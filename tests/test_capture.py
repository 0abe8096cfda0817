"""The captured update, proven on the CPU. The CPU runs the very update CUDA captures (fused optimizers, the LR
as a device tensor, Adam capturable); a dispatch mode names every op in it that would break a CUDA-graph
capture (a host read, a tensor from Python values or without a device, a copy between devices, a
data-dependent shape), for every recipe and for the options no recipe uses; a capture that fails leaves the
run going eagerly from the same state."""

import dataclasses

import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR, recipe_files
from kit.recipe import OptimSpec
from kit.training import engine
from kit.training.engine import EAGER_UPDATES_BEFORE_CAPTURE, Trainer, build_trainer, graph_blocker
from kit.training.hazards import find_hazards
from kit.training.optim import FUSABLE, build_optimizer, load_optimizer_state
from kit.training.run import train

CPU = torch.device("cpu")
TIMING = ["seconds", "images_per_s"]


def _hazards_before_capture(trainer) -> list:
    """The hazards of one update as CUDA would capture it: after the eager updates that precede capture."""
    trainer.forward_loss.train()
    for _ in range(EAGER_UPDATES_BEFORE_CAPTURE):
        trainer.update()
    return find_hazards(trainer.update)


def _blocker(trainer) -> str | None:
    return graph_blocker(cuda_graph=True, mixup=trainer.augment.mixup is not None, optimizer=trainer.optimizer, world_size=1)


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.stem)
def test_every_recipe_runs_the_capturable_update_on_the_cpu(path, demo_data, tiny_trainer):
    trainer = tiny_trainer(path, demo_data)
    assert _blocker(trainer) is None  # every shipped recipe is captured on CUDA
    groups = trainer.optimizer.param_groups
    assert all(g["fused"] for g in groups) and all(isinstance(g["lr"], torch.Tensor) for g in groups)
    assert all(g.get("capturable", True) for g in groups)  # Adam/AdamW: capturable on the CPU too
    hazards = _hazards_before_capture(trainer)
    assert not hazards, "\n".join(map(str, hazards))


EXTRA_CASES = {  # options no shipped recipe combines, each on the demo recipe
    "randaugment+sharpness+rotation+jitter+cutout": ("augment.policy=randaugment", "augment.sharpness_factor=2",
                                                     "augment.sharpness_prob=0.5", "augment.rotation_degrees=15",
                                                     "augment.color_jitter=0.3", "augment.cutout_size=8"),
    "augmix": ("augment.policy=augmix", "augment.augmix_width=2"),
    "fp16-loss-scaling+sgd": ("train.precision=fp16", "optim.name=sgd"),
    "fp16-loss-scaling+adam": ("train.precision=fp16",),
    "erasing-const-reflect": ("augment.erasing_prob=0.5", "augment.erasing_mode=const", "augment.crop_padding_mode=reflect"),
    "erasing-rand": ("augment.erasing_prob=0.5", "augment.erasing_mode=rand"),
    "whitening+alternating-flip": ("model.name=resnet", "model.args.stem=whiten", "model.args.blocks=[1,1]",
                                   "model.args.channels=[16,32]", "augment.flip=true", "augment.alternate_flip=true"),
    "plateau+clip-norm+adamw": ("schedule.name=plateau", "schedule.per_update=false", "optim.name=adamw", "optim.grad_clip=1.0"),
    "clip-value+sgd+norm-lr-scale": ("optim.name=sgd", "optim.grad_clip=0.1", "optim.grad_clip_mode=value",
                                     "optim.norm_lr_scale=4", "optim.decay_norm_and_bias=false", "optim.weight_decay=5e-4"),
    "label-smoothing+no-ema": ("train.label_smoothing=0.1", "train.ema_decay=null"),
}


@pytest.mark.parametrize("overrides", EXTRA_CASES.values(), ids=EXTRA_CASES.keys())
def test_options_outside_the_recipes_are_capture_safe(overrides, demo_data, tiny_trainer):
    trainer = tiny_trainer(RECIPES_DIR / "demo.yaml", demo_data, overrides=overrides)
    assert _blocker(trainer) is None
    hazards = _hazards_before_capture(trainer)
    assert not hazards, "\n".join(map(str, hazards))


def test_distillation_teachers_are_capture_safe(trained_run, demo_data, quiet, tiny_recipe):
    recipe = tiny_recipe()
    recipe = dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, teachers=(str(trained_run / "best.pt"),)))
    from kit.data.datasets import load_dataset
    trainer = build_trainer(recipe, load_dataset(recipe.data, demo_data), CPU, echo=quiet)
    hazards = _hazards_before_capture(trainer)
    assert not hazards, "\n".join(map(str, hazards))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_are_capture_safe(demo_data, quiet, tiny_recipe, smoothing):
    """Pseudo-labels as soft targets (Labelled.soft, gathered per batch on the device) keep the update capturable."""
    from kit.data.datasets import load_dataset
    recipe = tiny_recipe(train__label_smoothing=smoothing)
    dataset = load_dataset(recipe.data, demo_data)
    soft = torch.softmax(torch.randn(len(dataset.train), 10, generator=torch.Generator().manual_seed(0)), 1)
    dataset = dataclasses.replace(dataset, train=dataclasses.replace(dataset.train, soft=soft))
    trainer = build_trainer(recipe, dataset, CPU, echo=quiet)
    assert _blocker(trainer) is None and trainer.data.soft is not None
    hazards = _hazards_before_capture(trainer)
    assert not hazards, "\n".join(map(str, hazards))


def test_mixup_and_lookahead_are_named_as_what_blocks_capture(demo_data, tiny_trainer):
    mixup = tiny_trainer(RECIPES_DIR / "demo.yaml", demo_data, overrides=("augment.mixup_alpha=0.2",))
    assert "mixup" in _blocker(mixup)
    lookahead = tiny_trainer(RECIPES_DIR / "demo.yaml", demo_data, overrides=("optim.name=lookahead_momentum",))
    assert "no fused kernel" in _blocker(lookahead)


# The checker itself: each hazard it exists for is named with its op and line, so the tests above can fail.

def _bug_index_with_device_scalar():
    table, update = torch.linspace(0, 1, 10), torch.tensor(3)
    return table[update]  # engine.py's LR read before the fix


def _bug_python_value_into_tensor():
    kernel = torch.full((3, 3), 1.0 / 13.0)
    kernel[1, 1] = 5.0 / 13.0  # autoaugment.sharpen before the fix


def _bug_tensor_without_device():
    return torch.arange(4) + 1


def _bug_boolean_mask():
    x = torch.randn(8, device=CPU)
    return x[x > 0]


_ON_DEVICE = torch.ones(3, device=CPU)  # on CUDA, each method below would copy it to the host


def _bug_copy_to_host():
    return _ON_DEVICE.cpu()


def _bug_numpy():
    return _ON_DEVICE.numpy()


def _bug_tolist():
    return _ON_DEVICE.tolist()


def _bug_numpy_asarray():
    import numpy as np
    return np.asarray(_ON_DEVICE)


def _bug_to_the_host():
    return _ON_DEVICE.to("cpu")


def _bug_normal_without_device():
    return torch.normal(0.0, 1.0, size=(3,))


def _bug_tril_indices_without_device():
    return torch.tril_indices(3, 3)


@pytest.mark.parametrize("bug, op, line", [
    (_bug_index_with_device_scalar, "aten._local_scalar_dense", "return table[update]"),
    (_bug_python_value_into_tensor, "aten.lift_fresh", "kernel[1, 1] = 5.0 / 13.0"),
    (_bug_tensor_without_device, "torch.arange", "return torch.arange(4) + 1"),
    (_bug_boolean_mask, "aten.index.Tensor", "return x[x > 0]"),
    (_bug_copy_to_host, "Tensor.cpu", "return _ON_DEVICE.cpu()"),
    (_bug_numpy, "Tensor.numpy", "return _ON_DEVICE.numpy()"),
    (_bug_tolist, "Tensor.tolist", "return _ON_DEVICE.tolist()"),
    (_bug_numpy_asarray, "Tensor.__array__", "return np.asarray(_ON_DEVICE)"),
    (_bug_to_the_host, "Tensor.to", 'return _ON_DEVICE.to("cpu")'),
    (_bug_normal_without_device, "torch.normal", "return torch.normal(0.0, 1.0, size=(3,))"),
    (_bug_tril_indices_without_device, "torch.tril_indices", "return torch.tril_indices(3, 3)"),
])
def test_the_checker_names_each_hazard_with_its_op_and_line(bug, op, line):
    hazards = find_hazards(bug)
    assert any(h.op.startswith(op) and line in h.where and "test_capture.py" in h.where for h in hazards), hazards


def test_the_checker_finds_a_host_read_and_a_data_dependent_shape():
    x = torch.arange(6, device=CPU)
    hazards = find_hazards(lambda: (x.nonzero(), float(x.sum())))
    assert [h.op.split(".")[1] for h in hazards] == ["nonzero", "_local_scalar_dense"]
    assert find_hazards(lambda: x.take(x[:1].squeeze().clamp(max=5)) * 2.0) == []
    # made on a device, or from a tensor (inheriting its device): no hazard
    assert find_hazards(lambda: (torch.normal(0.0, 1.0, size=(3,), device=CPU), torch.zeros_like(x), x.new_ones(2),
                                 x.to(torch.float16), torch.tril_indices(3, 3, device=CPU))) == []


# A capture that cannot crash a run: the capture path forced on the CPU with stand-ins for the CUDA graph.

class _StandInGraph:
    """A recorded update replayed by running it (what a CUDA graph does on the device: its kernels, not its Python,
    so the host's update count is left to the Trainer, as a real replay leaves it)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def replay(self) -> None:
        host_count = self.trainer.num_updates
        self.trainer.update()
        self.trainer.num_updates = host_count


def _force_capture(monkeypatch, record_graph) -> None:
    monkeypatch.setattr(engine, "captures", lambda device: True)
    monkeypatch.setattr(Trainer, "record_graph", record_graph)


def _metrics(run) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").drop(columns=TIMING)


def test_a_failed_capture_goes_on_eagerly_from_the_same_state(demo_data, trained_run, tmp_path, monkeypatch, tiny_recipe):
    attempts = []

    def failing_capture(self):
        attempts.append(self.num_updates)
        self.update()  # on the CPU the "recorded" kernels really run: the fallback must undo them
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    _force_capture(monkeypatch, failing_capture)
    lines = []
    run = train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=lines.append)
    assert attempts == [EAGER_UPDATES_BEFORE_CAPTURE]  # tried once, after the warm-up, then eager for the rest of the run
    notes = [line for line in lines if "could not be captured" in line]
    assert notes == [f"note: the update could not be captured as a CUDA graph (CUDA error: operation not permitted when "
                     f"stream is capturing); training goes on eagerly from update {EAGER_UPDATES_BEFORE_CAPTURE}"]
    pd.testing.assert_frame_equal(_metrics(run), _metrics(trained_run))
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (run, trained_run))
    assert a["num_updates"] == b["num_updates"] and torch.equal(a["rng"]["augment"][0], b["rng"]["augment"][0])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_captured_run_equals_the_eager_one(demo_data, trained_run, tmp_path, monkeypatch, quiet, tiny_recipe):
    recorded = []

    def stand_in_capture(self):
        recorded.append(self.num_updates)
        return _StandInGraph(self)

    _force_capture(monkeypatch, stand_in_capture)
    run = train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=quiet)
    assert recorded == [EAGER_UPDATES_BEFORE_CAPTURE]
    pd.testing.assert_frame_equal(_metrics(run), _metrics(trained_run))


# Optimizer state across devices, weight decay of biases, the fused list.

def _adam(fused: bool) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused, capturable=fused)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("saved_fused", [True, False], ids=["fused-saved", "plain-saved"])
def test_adam_state_loads_with_the_loading_optimizers_device_flags(saved_fused, monkeypatch):
    saved = _adam(saved_fused).state_dict()
    loading = _adam(not saved_fused)
    seen = []
    original = torch.optim.Optimizer.load_state_dict
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", lambda self, state: (seen.append(state), original(self, state))[1])
    load_optimizer_state(loading, saved)
    (given,) = seen
    for group in given["param_groups"]:  # torch places `step` by these flags: they must be this optimizer's
        assert group["fused"] is (not saved_fused) and group["capturable"] is (not saved_fused)
    assert [g["fused"] for g in loading.param_groups] == [not saved_fused]
    fresh = _adam(not saved_fused)
    for param, state in loading.state.items():
        step = state["step"]
        expected = next(iter(fresh.state.values()))["step"]
        assert (step.dtype, step.device) == (expected.dtype, expected.device) and float(step) == 1.0
    assert saved["param_groups"][0]["fused"] is saved_fused  # the caller's dict is not changed


def test_norm_lr_scale_exempts_every_bias_from_weight_decay_when_asked():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 2))
    spec = OptimSpec(name="momentum", lr=0.1, weight_decay=5e-4, decay_norm_and_bias=False, norm_lr_scale=8.0)
    optimizer = build_optimizer(model, spec)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model[0].bias)] == 0.0 and decay_of[id(model[3].bias)] == 0.0
    assert decay_of[id(model[1].weight)] == 0.0 and decay_of[id(model[1].bias)] == 0.0
    assert decay_of[id(model[0].weight)] == 5e-4 and decay_of[id(model[3].weight)] == 5e-4
    scale_of = {id(p): g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]}
    assert scale_of[id(model[1].weight)] == 8.0 and scale_of[id(model[0].bias)] == 1.0
    with_decay = build_optimizer(model, dataclasses.replace(spec, decay_norm_and_bias=True))
    assert {g["weight_decay"] for g in with_decay.param_groups} == {5e-4}


def test_only_optimizers_fused_on_every_device_are_fused():
    assert "adagrad" not in FUSABLE  # torch's fused Adagrad runs on the CPU only
    model = torch.nn.Linear(2, 2)
    for name in FUSABLE:
        assert all(g["fused"] for g in build_optimizer(model, OptimSpec(name=name)).param_groups), name
    assert not any(g.get("fused") for g in build_optimizer(model, OptimSpec(name="adagrad")).param_groups)
