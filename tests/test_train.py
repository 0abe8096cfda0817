"""The training engine on the CPU: it learns, writes every artifact, is deterministic, resumes
bit-exactly, extends, stops early, stops on NaN; the LR schedules mean what the papers mean."""

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2

from kit.cli import RECIPES_DIR, recipe_files
from kit.errors import KitError
from kit.recipe import load_recipe
from kit.training.engine import run_updates
from kit.training.run import METRIC_COLUMNS, resume, train
from kit.training.schedule import lr_table

TIMING = ["seconds", "images_per_s"]


def _metrics(run) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").drop(columns=TIMING)


def test_three_epochs_learn_and_write_every_artifact(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"recipe.yaml", "metrics.csv", "best.pt", "last.pt", "curves.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    metrics = pd.read_csv(trained_run / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS and list(metrics.epoch) == [1, 2, 3]
    # the best weights (what best.pt ships): raw accuracy this early swings with BatchNorm's statistics
    assert max(metrics.val_acc.iloc[-1], metrics.ema_val_acc.iloc[-1]) > 0.5  # chance is 0.1
    assert metrics.ema_val_acc.notna().all() and (metrics.images_per_s > 0).all()
    ckpt = torch.load(trained_run / "last.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "rng", "recipe", "classes", "num_params",
            "kit_version", "mean", "std"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["num_params"] == 78_042 and len(ckpt["classes"]) == 10
    saved = load_recipe(trained_run / "recipe.yaml")
    assert saved.train.epochs == 3 and saved.data.root.startswith("/")


def test_same_recipe_and_seed_give_identical_metrics(demo_data, trained_run, tmp_path, quiet, tiny_recipe):
    again = train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=quiet)
    pd.testing.assert_frame_equal(_metrics(again), _metrics(trained_run))


def test_interrupted_run_resumes_to_the_same_metrics(demo_data, trained_run, tmp_path, quiet, tiny_recipe,
                                                     stop_after_first_epoch):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(), demo_data, tmp_path, "cpu", on_epoch_end=stop_after_first_epoch, echo=quiet)
    (run,) = tmp_path.iterdir()
    assert len(pd.read_csv(run / "metrics.csv")) == 1
    resume(run, device="cpu", echo=quiet)
    pd.testing.assert_frame_equal(_metrics(run), _metrics(trained_run))
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (run, trained_run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_resume_extends_a_finished_run(demo_data, tmp_path, quiet, tiny_recipe):
    run = train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=quiet)
    resume(run, ("train.epochs=4",), device="cpu", echo=quiet)
    assert list(pd.read_csv(run / "metrics.csv").epoch) == [1, 2, 3, 4]
    assert load_recipe(run / "recipe.yaml").train.epochs == 4


def test_early_stopping_triggers(demo_data, tmp_path, tiny_recipe):
    # an lr too small to learn: only BatchNorm statistics move, so the best epoch comes early
    recipe = tiny_recipe(train__epochs=8, train__early_stopping_patience=2, optim__lr=1e-12, train__ema_decay=None)
    lines = []
    run = train(recipe, demo_data, tmp_path, "cpu", echo=lines.append)
    metrics = pd.read_csv(run / "metrics.csv")
    best_epoch = int(metrics.epoch[metrics.val_acc.idxmax()])  # the first epoch reaching the best accuracy
    assert len(metrics) == best_epoch + 2 < 8
    assert any(line.startswith("early stopping: no better validation accuracy for 2 epochs") for line in lines)


def test_nan_loss_stops_with_a_clear_message(demo_data, tmp_path, quiet, tiny_recipe):
    recipe = tiny_recipe(optim__lr=1e30, train__ema_decay=None)
    with pytest.raises(KitError, match=r"training diverged: the loss became (nan|inf) in epoch \d; the last good checkpoint"):
        train(recipe, demo_data, tmp_path, "cpu", echo=quiet)


def test_batch_larger_than_data_is_an_error(demo_data, tmp_path, quiet, tiny_recipe):
    with pytest.raises(KitError, match="larger than the 1197 training images"):
        train(tiny_recipe(train__batch_size=5000), demo_data, tmp_path, "cpu", echo=quiet)


def _lr_per_epoch(recipe_name: str, updates_per_epoch: int = 3, **schedule) -> list[float]:
    """The lr of the first update of every epoch, from the LR table the engine reads."""
    recipe = load_recipe(RECIPES_DIR / f"{recipe_name}.yaml")
    spec = dataclasses.replace(recipe.schedule, **schedule)
    table = lr_table(spec, recipe.optim.lr, recipe.train.epochs, updates_per_epoch)
    assert len(table) == recipe.train.epochs * updates_per_epoch
    return table[::updates_per_epoch].tolist()


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


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


def _reference_lrs(recipe, updates_per_epoch: int) -> list[float]:
    """Each update's lr from the scheduler the recipe names, stepped as its library documents it:
    torch's MultiStepLR and OneCycleLR, timm's schedulers with step_update(t) (or step(epoch))."""
    spec, epochs = recipe.schedule, recipe.train.epochs
    total = epochs * updates_per_epoch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optim.lr)
    lrs = []
    if spec.name in ("multistep", "onecycle") and not spec.warmup_epochs:
        unit = updates_per_epoch if spec.per_update or spec.name == "onecycle" else 1
        scheduler = (torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * unit for m in spec.milestones], spec.decay_rate)
                     if spec.name == "multistep" else
                     torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.optim.lr, total_steps=total, pct_start=spec.onecycle_pct_start))
        for t in range(total):
            lrs.append(current_lr(optimizer))
            if (spec.per_update or spec.name == "onecycle" or (t + 1) % updates_per_epoch == 0) and t + 1 < total:
                scheduler.step()
        return lrs
    if spec.name == "constant" and not spec.warmup_epochs:
        return [recipe.optim.lr] * total
    scheduler, _ = create_scheduler_v2(optimizer, sched="step" if spec.name == "constant" else spec.name, num_epochs=epochs,
                                       decay_epochs=epochs + 1 if spec.name == "constant" else spec.decay_epochs,
                                       decay_rate=spec.decay_rate, min_lr=spec.min_lr, warmup_lr=spec.warmup_lr,
                                       warmup_epochs=spec.warmup_epochs, step_on_epochs=not spec.per_update,
                                       updates_per_epoch=updates_per_epoch)
    for t in range(total):
        if spec.per_update:
            scheduler.step_update(t)
        elif t % updates_per_epoch == 0:
            scheduler.step(t // updates_per_epoch)
        lrs.append(current_lr(optimizer))
    return lrs


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.stem)
def test_lr_table_matches_the_scheduler_at_every_update(path):  # the reference steps a stand-in optimizer's scheduler
    recipe = load_recipe(path)
    table = lr_table(recipe.schedule, recipe.optim.lr, recipe.train.epochs, 7)
    assert table.tolist() == pytest.approx(_reference_lrs(recipe, 7), rel=1e-9, abs=1e-15)


def test_eager_update_equals_a_plain_training_loop(demo_data, quiet, tiny_recipe):
    """The Trainer's update (fused optimizer, LR written on the device from the table), against the loop written
    out by hand in the usual order, on the same streams."""
    from kit.data.datasets import load_dataset
    from kit.training.engine import build_trainer
    recipe = tiny_recipe(optim__grad_clip=1.0, train__label_smoothing=0.1)
    dataset = load_dataset(recipe.data, demo_data)
    ours = build_trainer(recipe, dataset, torch.device("cpu"), echo=quiet)
    run_updates(ours, 5)
    ref = build_trainer(recipe, dataset, torch.device("cpu"), echo=quiet)  # same seeds: same weights, same streams
    order = torch.randperm(len(ref.data), generator=ref.order_gen)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    ref.model.train()
    for update in range(5):
        index = order[update * ref.batch_size:(update + 1) * ref.batch_size]
        inputs, targets = ref.augment(ref.data.images[index], ref.data.labels[index], ref.aug_gen)
        ref.optimizer.zero_grad()
        loss_fn(ref.model(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(ref.model.parameters(), 1.0)
        for group in ref.optimizer.param_groups:  # fused optimizers read their LR from a tensor
            group["lr"].fill_(float(ref.lr.table[update]))
        ref.optimizer.step()
        ref.ema.update(ref.model)
    for (name, a), b in zip(ours.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(ours.ema_model.state_dict().values(), ref.ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_better_weights_is_one_rule_for_numbers_and_columns():
    from kit.inference.checkpoint import better_weights
    assert better_weights(0.5, 0.6) == (0.6, "ema") and better_weights(0.6, 0.6) == (0.6, "raw")
    assert better_weights(0.5, float("nan")) == (0.5, "raw")  # no EMA
    metrics = pd.DataFrame({"val_acc": [0.5, 0.7, 0.4], "ema_val_acc": [0.6, 0.6, float("nan")]})
    scores, sources = better_weights(metrics.val_acc, metrics.ema_val_acc)
    assert list(scores) == [0.6, 0.7, 0.4] and list(sources) == ["ema", "raw", "raw"]


def test_weights_from_better_on_last_pt_is_that_epochs_better_weights(trained_run):
    from kit.inference.checkpoint import better_weights, checkpoint_from_payload, read_payload
    payload = read_payload(trained_run / "last.pt")
    last = pd.read_csv(trained_run / "metrics.csv").iloc[-1]
    assert payload["weights_from"] == better_weights(last.val_acc, last.ema_val_acc)[1]
    best = read_payload(trained_run / "best.pt")
    assert best["weights_from"] == best["best_weights_from"]  # best.pt: its epoch is the best epoch
    payload.update(weights_from="raw", best_weights_from="ema")  # the last epoch's choice differs from the best epoch's
    assert checkpoint_from_payload(payload, trained_run / "last.pt", "better", torch.device("cpu")).weights_from == "raw"
    del payload["weights_from"]  # a checkpoint written before 0.3
    assert checkpoint_from_payload(payload, trained_run / "last.pt", "better", torch.device("cpu")).weights_from == "ema"
    assert checkpoint_from_payload(payload, trained_run / "last.pt", "best", torch.device("cpu")).weights_from == "ema"  # 0.4's name


def test_a_trainer_state_round_trips(demo_data, quiet, tiny_recipe):
    """Trainer.state_dict/load_state_dict: a second trainer loaded from the first continues identically."""
    from kit.data.datasets import load_dataset
    from kit.training.engine import build_trainer
    recipe = tiny_recipe()
    dataset = load_dataset(recipe.data, demo_data)
    first, second = (build_trainer(recipe, dataset, torch.device("cpu"), echo=quiet) for _ in range(2))
    run_updates(first, 3)
    assert second.load_state_dict(copy.deepcopy(first.state_dict()), epoch=0)
    run_updates(first, 2)
    run_updates(second, 2)
    assert first.num_updates == second.num_updates == 5
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))


def test_a_run_keeps_its_validation_probabilities_with_the_images_ids(trained_run, demo_data):
    """Issue 38, part 5: the probabilities the run scored its best epoch with are kept (val.probs.npz, no second
    pass), keyed by the held-out images' own ids, and they are best.pt's better weights' on those images."""
    import numpy as np

    from kit.data.datasets import load_dataset
    from kit.device import inference_precision
    from kit.inference.checkpoint import better_weights, load_checkpoint
    from kit.inference.tta import tta_views
    saved = np.load(trained_run / "val.probs.npz")
    held_out = load_dataset(load_recipe(trained_run / "recipe.yaml").data).held_out
    assert saved["ids"].tolist() == [str(i) for i in held_out.ids] == [f"test_batch/{i}" for i in range(len(held_out))]
    assert np.array_equal(saved["labels"], held_out.labels.numpy())
    metrics = pd.read_csv(trained_run / "metrics.csv")
    best = metrics.iloc[int(np.argmax(better_weights(metrics.val_acc, metrics.ema_val_acc)[0]))]
    assert (saved["probs"].argmax(1) == saved["labels"]).mean() == pytest.approx(max(best.val_acc, best.ema_val_acc))
    checkpoint = load_checkpoint(trained_run, "better", torch.device("cpu"))
    again = checkpoint.probs(held_out.images, tta_views("none"), 100, inference_precision(torch.device("cpu"), "fp32"))
    assert np.allclose(saved["probs"], again.numpy(), atol=1e-5)


def test_the_trainer_owns_the_one_epoch_loop():
    """Issue 38, part 5: only Trainer.fit runs updates and starts epochs; Run.fit, lr-find, kit bench and the tests
    drive it through hooks (a second loop anywhere in kit fails this)."""
    import ast
    from pathlib import Path
    kit_dir = Path(__file__).resolve().parent.parent / "kit"
    callers = set()
    for path in kit_dir.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef):
                for node in ast.walk(func):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                            node.func.attr in ("next_update", "start_epoch"):
                        callers.add(f"{path.relative_to(kit_dir.parent)}:{func.name}")
    assert callers == {"kit/training/engine.py:fit"}


def test_hooks_stop_an_epoch_and_the_next_fit_goes_on_from_there(demo_data, quiet, tiny_recipe):
    """Hooks see every update and epoch; a stop in the middle of an epoch and a second fit end where one fit does."""
    from kit.data.datasets import load_dataset
    from kit.training.engine import Hooks, build_trainer
    recipe = tiny_recipe(train__epochs=2)
    dataset = load_dataset(recipe.data, demo_data)

    class StopOnce(Hooks):
        def __init__(self, at):
            self.at, self.seen, self.epochs = at, [], []

        def after_update(self, trainer, done):
            self.seen.append(done)
            return trainer.num_updates == self.at

        def after_epoch(self, trainer, result):
            self.epochs.append((result.epoch, result.complete, result.updates))
            return result.complete

    whole, split = (build_trainer(recipe, dataset, torch.device("cpu"), echo=quiet) for _ in range(2))
    whole.fit()
    per_epoch = whole.updates_per_epoch
    hooks = StopOnce(at=per_epoch + 2)
    split.fit(hooks)
    assert hooks.epochs == [(1, True, per_epoch), (2, False, 2)] and split.num_updates == per_epoch + 2
    split.fit(hooks)  # goes on inside epoch 2, with its permutation and sums
    assert hooks.epochs[-1] == (2, True, per_epoch) and hooks.seen[-1] == per_epoch
    assert whole.num_updates == split.num_updates == 2 * per_epoch and split.epochs_done == 2
    for a, b in zip(whole.model.state_dict().values(), split.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mix", [{}, {"augment__mixup_alpha": 0.4}], ids=["plain", "mixup"])
def test_soft_one_hot_targets_train_as_the_hard_labels_do(demo_data, quiet, tiny_recipe, mix):
    """Issue 38, part 5: targets may be soft (pseudo-labels). One-hot soft targets are the hard labels: the same
    weights, with label smoothing and with mixup (images mixed as timm mixes them, targets with the same lambda)."""
    import dataclasses

    from kit.data.datasets import load_dataset
    from kit.training.engine import build_trainer
    recipe = tiny_recipe(train__label_smoothing=0.1, **mix)
    dataset = load_dataset(recipe.data, demo_data)
    hard = build_trainer(recipe, dataset, torch.device("cpu"), echo=quiet)
    run_updates(hard, 4)
    soft_train = dataclasses.replace(dataset.train, soft=torch.nn.functional.one_hot(dataset.train.labels, 10).float())
    soft = build_trainer(recipe, dataclasses.replace(dataset, train=soft_train), torch.device("cpu"), echo=quiet)
    run_updates(soft, 4)
    for (name, a), b in zip(hard.model.state_dict().items(), soft.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), (name, (a.float() - b.float()).abs().max())
    changed = build_trainer(recipe, dataclasses.replace(dataset, train=dataclasses.replace(
        soft_train, soft=soft_train.soft.roll(1, dims=1))), torch.device("cpu"), echo=quiet)
    run_updates(changed, 4)
    assert not torch.allclose(changed.model.fc.weight, hard.model.fc.weight, atol=1e-3)  # the targets are what trains
