"""The training engine on the CPU: it learns, writes every artifact, is deterministic, resumes
bit-exactly, extends, stops early, stops on NaN; the LR schedules mean what the papers mean."""

import dataclasses

import pandas as pd
import pytest
import torch
from conftest import ROOT, quiet, tiny_recipe
from timm.scheduler import MultiStepLRScheduler

from kit.errors import KitError
from kit.optim import LRSchedule, current_lr
from kit.recipe import load_recipe
from kit.train import METRIC_COLUMNS, resume, train

TIMING = ["seconds", "images_per_s"]


def _metrics(run) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").drop(columns=TIMING)


def test_two_epochs_learn_and_write_every_artifact(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"recipe.yaml", "metrics.csv", "best.pt", "last.pt", "curves.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    metrics = pd.read_csv(trained_run / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS and list(metrics.epoch) == [1, 2]
    assert metrics.val_acc.iloc[-1] > 0.5  # chance is 0.1
    assert metrics.ema_val_acc.notna().all() and (metrics.images_per_s > 0).all()
    ckpt = torch.load(trained_run / "last.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "rng", "recipe", "classes", "num_params",
            "kit_version", "mean", "std"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["num_params"] == 78_042 and len(ckpt["classes"]) == 10
    saved = load_recipe(trained_run / "recipe.yaml")
    assert saved.train.epochs == 2 and saved.data.root.startswith("/")


def test_same_recipe_and_seed_give_identical_metrics(demo_data, trained_run, tmp_path):
    again = train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=quiet)
    pd.testing.assert_frame_equal(_metrics(again), _metrics(trained_run))


def test_interrupted_run_resumes_to_the_same_metrics(demo_data, trained_run, tmp_path):
    def stop_after_first(run):
        if run.epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(), demo_data, tmp_path, "cpu", on_epoch_end=stop_after_first, echo=quiet)
    (run,) = tmp_path.iterdir()
    assert len(pd.read_csv(run / "metrics.csv")) == 1
    resume(run, device="cpu", echo=quiet)
    pd.testing.assert_frame_equal(_metrics(run), _metrics(trained_run))
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (run, trained_run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_resume_extends_a_finished_run(demo_data, tmp_path):
    run = train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=quiet)
    resume(run, ("train.epochs=3",), device="cpu", echo=quiet)
    assert list(pd.read_csv(run / "metrics.csv").epoch) == [1, 2, 3]
    assert load_recipe(run / "recipe.yaml").train.epochs == 3


def test_early_stopping_triggers(demo_data, tmp_path):
    # an lr too small to learn: only BatchNorm statistics move, so the best epoch comes early
    recipe = tiny_recipe(train__epochs=8, train__early_stopping_patience=2, optim__lr=1e-12, train__ema_decay=None)
    lines = []
    run = train(recipe, demo_data, tmp_path, "cpu", echo=lines.append)
    metrics = pd.read_csv(run / "metrics.csv")
    best_epoch = int(metrics.epoch[metrics.val_acc.idxmax()])  # the first epoch reaching the best accuracy
    assert len(metrics) == best_epoch + 2 < 8
    assert any(line.startswith("early stopping: no better validation accuracy for 2 epochs") for line in lines)


def test_nan_loss_stops_with_a_clear_message(demo_data, tmp_path):
    recipe = tiny_recipe(optim__lr=1e30, train__ema_decay=None)
    with pytest.raises(KitError, match=r"training diverged: the loss became (nan|inf) in epoch \d; the last good checkpoint"):
        train(recipe, demo_data, tmp_path, "cpu", echo=quiet)


def test_batch_larger_than_data_is_an_error(demo_data, tmp_path):
    with pytest.raises(KitError, match="larger than the 1197 training images"):
        train(tiny_recipe(train__batch_size=5000), demo_data, tmp_path, "cpu", echo=quiet)


def _lr_per_epoch(recipe_name: str, updates_per_epoch: int = 3, **schedule) -> list[float]:
    """The lr of the first update of every epoch, stepping the schedule as the engine does."""
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml")
    spec = dataclasses.replace(recipe.schedule, **schedule)
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=recipe.optim.lr)
    schedule_ = LRSchedule(optimizer, spec, recipe.train.epochs, updates_per_epoch)
    lrs, updates = [], 0
    for epoch in range(recipe.train.epochs):
        lrs.append(current_lr(optimizer))
        for _ in range(updates_per_epoch):
            optimizer.step()
            updates += 1
            schedule_.after_update(updates)
        schedule_.after_epoch(epoch + 1, 0.5)
    return lrs


def test_timm_multistep_drops_one_epoch_early_on_its_own():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = MultiStepLRScheduler(optimizer, decay_t=[30], decay_rate=0.1)
    scheduler.step(29)
    assert current_lr(optimizer) == pytest.approx(0.01)  # torch's MultiStepLR still uses 0.1 in epoch 29


@pytest.mark.parametrize("per_update", [True, False])
def test_resnet_443_multistep_milestones(per_update):
    lrs = _lr_per_epoch("resnet_443", per_update=per_update)
    assert lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)
    assert lrs[39] == pytest.approx(0.01) and lrs[40] == pytest.approx(0.001)
    assert lrs[59] == pytest.approx(0.001) and lrs[60] == pytest.approx(1e-4) and lrs[74] == pytest.approx(1e-4)


@pytest.mark.parametrize("per_update", [True, False])
def test_resnet_dropout_step_every_20_epochs(per_update):
    lrs = _lr_per_epoch("resnet_dropout", per_update=per_update)
    assert lrs[0] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)
    assert lrs[40] == pytest.approx(0.001) and lrs[59] == pytest.approx(0.001)


def test_resnet_4643_cosine_over_80_epochs():
    lrs = _lr_per_epoch("resnet_4643")
    assert lrs[0] == pytest.approx(1e-3) and lrs[40] == pytest.approx(5e-4, rel=1e-6)
    assert lrs[79] < 1e-5 and all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_preact_gelu_constant_lr():
    assert set(_lr_per_epoch("preact_gelu")) == {1e-3}


def test_resnet18_cifar100_one_cycle_peaks_at_0_1():
    lrs = _lr_per_epoch("resnet18_cifar100", updates_per_epoch=10)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert max(lrs) == pytest.approx(0.1, rel=0.02) and 6 <= peak <= 9  # 30% of 25 epochs
    assert lrs[0] < 0.01 and lrs[-1] < 0.01
