"""The captured update on a real GPU (marker `gpu`; skipped where CUDA is absent, so CI never runs them).
On a lent GPU: `python -m pytest -m gpu tests/gpu` (the first step of `.ci/gpu-results.sh checkup`).

- replay equals eager over several updates for every CIFAR-10 recipe, from the same seed;
- no synchronization after the warm-up (`torch.cuda.set_sync_debug_mode("error")` around the replays);
- no capture hazard on CUDA either (the CPU test's checker, now seeing real host-to-device copies);
- a captured run stopped after an epoch and resumed ends bit-exactly where the uninterrupted one does;
- an Adam run moves CPU -> CUDA and CUDA -> CPU mid-run, its step counters where each device's optimizer wants them."""

import dataclasses

import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.data.datasets import load_dataset
from kit.recipe import load_recipe
from kit.training.engine import EAGER_UPDATES_BEFORE_CAPTURE, build_trainer, run_updates
from kit.training.hazards import find_hazards
from kit.training.run import resume, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CIFAR10_RECIPES = ["kit_best", "kit_fast", "preact_gelu", "resnet_443", "resnet_4643", "resnet_dropout"]
UPDATES = 6  # after the warm-up: the first replays
TIMING = ["seconds", "images_per_s"]


@pytest.fixture
def make_trainer(demo_data, quiet):
    """The recipe `name` at full width on the demo images (CIFAR-10's shape), its precision, captured or eager."""
    def make(name: str, capture: bool, compile_mode: str = "none", precision: str = "auto"):
        recipe = load_recipe(RECIPES_DIR / f"{name}.yaml", (f"train.compile={compile_mode}", "data.validation=test",
                                                            "train.batch_size=64", f"train.precision={precision}"))
        trainer = build_trainer(recipe, load_dataset(recipe.data, demo_data), torch.device("cuda"), echo=quiet)
        trainer.capture = capture and trainer.capture
        return trainer
    return make


def _updates(trainer, n: int) -> None:
    trainer.forward_loss.train()
    run_updates(trainer, n)


@pytest.mark.parametrize("name", CIFAR10_RECIPES)
def test_replay_equals_eager(name, demo_data, make_trainer):
    captured, eager = make_trainer(name, capture=True), make_trainer(name, capture=False)
    assert captured.capture, f"{name}: the update is not captured"
    for trainer in (captured, eager):
        _updates(trainer, EAGER_UPDATES_BEFORE_CAPTURE + UPDATES)
    assert captured.graph is not None
    tol = dict(rtol=2e-2, atol=2e-3)  # bf16 autocast: the graph replays the eager kernels, cuDNN may pick others
    for (key, a), b in zip(captured.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name} {key}: {m}")
    if captured.ema is not None:
        for a, b in zip(captured.ema_model.state_dict().values(), eager.ema_model.state_dict().values()):
            torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(captured.loss_sum, eager.loss_sum, rtol=2e-2, atol=1e-2)
    assert abs(int(captured.correct_sum) - int(eager.correct_sum)) <= 2
    assert captured.num_updates == eager.num_updates == int(captured.device_updates)


@pytest.mark.parametrize("name", ["kit_fast", "kit_best"])
def test_compiled_replay_equals_eager(name, demo_data, make_trainer):
    captured, eager = make_trainer(name, True, "default"), make_trainer(name, False, "default")
    assert captured.capture, f"{name}: the compiled update is not captured"
    for trainer in (captured, eager):
        _updates(trainer, EAGER_UPDATES_BEFORE_CAPTURE + 2)
    assert captured.graph is not None and eager.graph is None  # replay against eager, not eager against eager
    for a, b in zip(captured.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", ["kit_fast", "preact_gelu"])  # SGD and Adam
def test_fp16_captured_update_equals_eager(name, demo_data, make_trainer):
    """fp16 with dynamic loss scaling inside the graph: the scaler's tensors on the device, same result as eager."""
    captured, eager = make_trainer(name, True, precision="fp16"), make_trainer(name, False, precision="fp16")
    assert captured.capture and captured.scaler is not None
    for trainer in (captured, eager):
        _updates(trainer, EAGER_UPDATES_BEFORE_CAPTURE + UPDATES)
    assert captured.graph is not None
    assert captured.scaler.get_scale() == eager.scaler.get_scale()
    assert int(captured.skipped_sum) == int(eager.skipped_sum)
    for a, b in zip(captured.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", CIFAR10_RECIPES)
def test_no_sync_and_no_hazard_after_the_eager_updates(name, demo_data, make_trainer):
    trainer = make_trainer(name, capture=True)
    checked = make_trainer(name, capture=False)
    _updates(checked, EAGER_UPDATES_BEFORE_CAPTURE)
    hazards = find_hazards(checked.update)
    assert not hazards, "\n".join(map(str, hazards))
    _updates(trainer, EAGER_UPDATES_BEFORE_CAPTURE + 1)  # eager updates, capture, first replay
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(UPDATES):
            trainer.next_update()()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert trainer.graph is not None


def _metrics(run) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").drop(columns=TIMING)


def test_a_captured_run_resumes_bit_exactly(demo_data, tmp_path, quiet, tiny_recipe, stop_after_first_epoch):
    recipe = tiny_recipe(train__deterministic=True)
    graphs = []  # each epoch: was the update a replayed graph? (a silent fall-back to eager would compare eager with eager)

    def record(run):
        graphs.append(run.trainer.graph is not None)

    whole = train(recipe, demo_data, tmp_path / "whole", "cuda", on_epoch_end=record, echo=quiet)

    with pytest.raises(KeyboardInterrupt):
        train(recipe, demo_data, tmp_path / "stopped", "cuda", echo=quiet,
              on_epoch_end=lambda run: (record(run), stop_after_first_epoch(run)))
    (stopped,) = (tmp_path / "stopped").iterdir()
    resume(stopped, device="cuda", on_epoch_end=record, echo=quiet)
    assert graphs == [True] * (2 * recipe.train.epochs), graphs
    pd.testing.assert_frame_equal(_metrics(stopped), _metrics(whole))
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (stopped, whole))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_an_adam_run_moves_between_devices(first, then, demo_data, tmp_path, quiet, tiny_recipe, stop_after_first_epoch):
    recipe = dataclasses.replace(tiny_recipe(), name="adam-moves")  # the demo recipe trains with Adam
    assert recipe.optim.name == "adam"

    with pytest.raises(KeyboardInterrupt):
        train(recipe, demo_data, tmp_path, first, on_epoch_end=stop_after_first_epoch, echo=quiet)
    (run,) = tmp_path.iterdir()
    seen = {}

    def check_optimizer(r):
        steps = [s["step"] for s in r.trainer.optimizer.state.values()]
        seen["devices"] = {s.device.type for s in steps}
        seen["dtypes"] = {s.dtype for s in steps}

    resume(run, device=then, on_epoch_end=check_optimizer, echo=quiet)
    assert seen["devices"] == {then} and seen["dtypes"] == {torch.float32}  # fused Adam: step on the device, float32
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.epoch) == [1, 2, 3] and metrics.val_loss.notna().all()
