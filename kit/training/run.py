"""Wiring a run: recipe -> data + trainer -> epochs -> run directory (recipe.yaml, metrics.csv,
best.pt, last.pt, curves.png). One path trains a new run or continues one from last.pt, bit-exactly (`train`
and `resume` differ only in where they start). Under torchrun every rank trains its slice of each batch;
rank 0 evaluates, writes and prints.

Nothing is lost at any moment. One save is one commit: metrics.csv and curves.png first, then best.pt when
this epoch is the best, then last.pt, which also holds the metrics history; a resume rewrites metrics.csv and
the curves from last.pt, so a file written ahead of last.pt never survives as history. A run directory without
a checkpoint resumes from the start. SIGTERM and SIGINT stop at the next update boundary, save the position
inside the epoch to last.pt, and exit 143 or 130; the resumed run continues from that update."""

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from kit.data.datasets import Dataset, load_dataset
from kit.device import choose_precision, deterministic, device_name
from kit.errors import KitError
from kit.faults import Stopped, StopRequest, fault_point
from kit.inference.checkpoint import better_weights, read_payload, save_checkpoint
from kit.inference.plots import in_notebook, plot_curves
from kit.inference.probs import probs_arrays, write_probs
from kit.inference.scores import predict_probs, probs_loss_acc
from kit.io import write_text
from kit.recipe import Recipe, load_recipe, recipe_as_dict, save_recipe, with_num_classes
from kit.training import distributed
from kit.training.distill import resolve_teachers
from kit.training.distributed import Ranks
from kit.training.engine import EpochResult, Hooks, Trainer, build_trainer
from kit.training.tensorboard import EpochLog

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc", "seconds", "images_per_s",
                  "skipped_updates"]  # skipped_updates: fp16 updates the loss scaler skipped (a non-finite gradient)


def new_run_dir(out_root: str | Path, name: str, stamp: str | None = None) -> Path:
    """runs/<recipe>-<YYYYmmdd-HHMMSS>, or with the next free suffix: claimed by creating it, so runs started in
    the same second (one per GPU) each get their own."""
    base = Path(out_root) / f"{name}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    run, n = base, 1
    while True:
        try:
            run.mkdir()
            return run
        except FileExistsError:
            run, n = base.with_name(f"{base.name}-{n}"), n + 1


def with_data_root(recipe: Recipe, data_root: str | Path | None) -> Recipe:
    """The recipe with its data root made absolute (and replaced if given), as the run will save it."""
    root = Path(data_root or recipe.data.root).resolve()
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=str(root)))


RUN_INFO = "run.json"  # the device, its name, the precision, processes and parameters of the run's latest start
VAL_PROBS = "val.probs.npz"  # a run's validation probabilities at its best epoch (kit blend's labelled side)


class Run(Hooks):
    """One run directory being trained (by this process, one of `ranks`): the trainer, the images it is
    validated on, the normalization, the metrics history and which epoch is best. It drives the Trainer's epoch loop
    as its hooks: the progress bar and signals between updates; scoring, saving and early stopping at each epoch's end."""

    def __init__(self, recipe: Recipe, run_dir: Path, trainer: Trainer, dataset: Dataset, echo: Callable[[str], None],
                 ranks: Ranks = Ranks()):
        self.recipe, self.dir, self.trainer, self.classes, self.ranks = recipe, run_dir, trainer, dataset.classes, ranks
        self.split = dataset.split  # a fold's run: which folds
        device = trainer.prec.device
        self.held_out = dataset.held_out.to(device)  # the validation images
        self.mean, self.std = torch.tensor(dataset.mean, device=device), torch.tensor(dataset.std, device=device)
        self.echo = echo if ranks.main else silent
        self.best_acc, self.best_epoch, self.best_weights_from = -1.0, 0, "raw"
        self.weights_from = "raw"  # the better of raw and EMA at the last completed epoch
        self.metrics = pd.DataFrame()
        self.val_probs: torch.Tensor | None = None  # the better weights' probabilities on the held-out images, last epoch
        self.log: EpochLog | None = None
        self.stop = StopRequest()
        self.progress: EpochProgress | None = None
        self.on_epoch_end: Callable[["Run"], None] | None = None

    @property
    def epoch(self) -> int:
        """Epochs completed (the Trainer's count)."""
        return self.trainer.epochs_done

    @property
    def in_epoch(self) -> int:
        """Updates done in the epoch in progress (non-zero only when a signal stopped it), the Trainer's count."""
        return self.trainer.in_epoch

    def payload(self) -> dict:
        """The checkpoint: the trainer's state and the run's (collective under torchrun: every rank's
        augmentation stream is gathered)."""
        t = self.trainer
        state = t.state_dict()
        return {**state, "epoch": self.epoch, "planned_epochs": self.recipe.train.epochs, "recipe": recipe_as_dict(self.recipe),
                "classes": self.classes, "num_params": t.num_params, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "best_weights_from": self.best_weights_from,
                "weights_from": self.weights_from, "world_size": self.ranks.world_size, "in_epoch": self.in_epoch,
                "split": self.split,
                "metrics": self.metrics.to_dict("records")}

    def restore(self, payload: dict) -> None:
        """Continue from a last.pt, also one saved on another device (the tensors were mapped to the CPU on reading)."""
        t = self.trainer
        if self.recipe.schedule.name == "onecycle" and payload["planned_epochs"] != self.recipe.train.epochs:
            raise KitError(f"a one-cycle schedule cannot be extended: the run was planned for {payload['planned_epochs']} epochs")
        self.best_acc, self.best_epoch, self.best_weights_from = payload["best_acc"], payload["best_epoch"], payload["best_weights_from"]
        self.weights_from = payload.get("weights_from", self.best_weights_from)
        epoch = payload["epoch"]
        if epoch * t.updates_per_epoch + payload.get("in_epoch", 0) != payload["num_updates"]:
            raise KitError(f"{payload['path']}: {payload['num_updates']} updates do not make {epoch} epochs of "
                           f"{t.updates_per_epoch}: resume with the run's own train.batch_size and data")
        if not t.load_state_dict(payload, epoch, payload["path"]):
            saved = f"{payload['rng'].get('generator_device', '?')} with {len(payload['rng'].get('augment', []))} process(es)"
            self.echo(f"note: the data streams were saved on {saved} and cannot continue on {t.order_gen.device.type} with "
                      f"{self.ranks.world_size}: they restart from train.seed + {self.epoch} (the run goes on, not bit-exactly)")
        if "metrics" in payload:  # the history as last.pt recorded it
            self.metrics = pd.DataFrame(payload["metrics"], columns=METRIC_COLUMNS)
        else:  # a checkpoint written before 0.3
            metrics = pd.read_csv(self.dir / "metrics.csv")
            self.metrics = metrics[metrics.epoch <= self.epoch].reset_index(drop=True)
        if self.ranks.main:  # a metrics.csv written ahead of last.pt loses its extra rows now
            self.write_metrics()

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float, torch.Tensor | None]:
        """Loss, accuracy and the (N, K) probabilities on the held-out images (kept: they are the run's validation
        predictions, and a fold's out-of-fold ones)."""
        if not len(self.held_out):  # data.validation: none
            return float("nan"), float("nan"), None
        probs = predict_probs(model, self.held_out.images, self.mean, self.std, [lambda x: x],
                              self.recipe.predict.batch_size, self.trainer.prec)
        return (*probs_loss_acc(probs, self.held_out.labels), probs)

    def record(self, result: EpochResult) -> dict:
        """Evaluate raw and EMA weights (rank 0, after averaging BatchNorm statistics over ranks), append the
        metrics row, keep the best; returns the row."""
        t = self.trainer
        distributed.average_buffers(t.model, self.ranks)
        distributed.average_buffers(t.ema_model, self.ranks)
        scores, probs = None, {}
        if self.ranks.main:
            val_loss, val_acc, probs["raw"] = self.evaluate(t.model)
            ema_acc, probs["ema"] = self.evaluate(t.ema_model)[1:] if t.ema is not None else (float("nan"), None)
            scores = (val_loss, val_acc, ema_acc)
        val_loss, val_acc, ema_acc = distributed.broadcast(scores, self.ranks)
        t.lr.after_epoch(self.epoch, val_acc)
        row = {"epoch": self.epoch, "lr": result.lr, "train_loss": result.loss, "train_acc": result.acc, "val_loss": val_loss,
               "val_acc": val_acc, "ema_val_acc": ema_acc, "seconds": result.seconds,
               "images_per_s": result.images / max(result.seconds, 1e-9), "skipped_updates": result.skipped}
        new = pd.DataFrame([row], columns=METRIC_COLUMNS)
        self.metrics = new if self.metrics.empty else pd.concat([self.metrics, new], ignore_index=True)
        score, self.weights_from = better_weights(val_acc, ema_acc)
        unscored = not len(self.held_out)  # data.validation: none
        if unscored:  # the last epoch is the best, with its EMA weights when there are some
            self.weights_from = "ema" if t.ema is not None else "raw"
        if unscored or score > self.best_acc:
            self.best_acc, self.best_epoch, self.best_weights_from = score, self.epoch, self.weights_from
        self.val_probs = probs.get(self.weights_from)
        if self.log is not None:
            self.log.write(row)
        return row

    def save(self) -> None:
        """One commit: the derived files first, last.pt last (what it records is on disk beside it)."""
        payload = self.payload()
        if not self.ranks.main:
            return
        if self.in_epoch == 0:
            self.write_metrics()
            fault_point("saved:metrics.csv")
            if self.best_epoch == self.epoch:
                self.write_val_probs()
                save_checkpoint(payload, self.dir / "best.pt")
                fault_point("saved:best.pt")
        save_checkpoint(payload, self.dir / "last.pt")
        fault_point("saved:last.pt")

    def write_val_probs(self) -> None:
        """val.probs.npz beside best.pt: the best epoch's better weights' probabilities on the held-out images, with
        their ids and labels (what kit evaluate --probs-out writes without TTA, here without a second pass)."""
        if self.val_probs is None:
            return
        probs = self.val_probs.numpy()
        write_probs(self.dir / VAL_PROBS, probs_arrays(self.held_out.ids, probs, self.classes, [str(self.dir)], probs[None],
                                                       self.held_out.labels.cpu().numpy(), source=f"{self.dir}'s validation"))

    def write_metrics(self) -> None:
        write_text(self.dir / "metrics.csv", self.metrics.to_csv(index=False))
        plot_curves(self.metrics, self.dir / "curves.png", self.recipe.name)

    def stop_asked(self) -> bool:
        """Whether a signal asked this run to stop, on any rank (so that every rank stops at the same update)."""
        return distributed.any_rank(bool(self.stop), self.ranks, self.trainer.prec.device)

    def stopped(self, where: str) -> Stopped:
        """What to raise once a signal arrived and last.pt holds where the run stands: how to go on."""
        name = signal.Signals(self.stop.signum).name
        return Stopped(self.stop.signum, f"stopped by {name} {where}; saved in {self.dir / 'last.pt'}: "
                                         f"continue with kit train --resume {self.dir}")

    def should_stop_early(self) -> bool:
        return stopped_early(self.epoch, self.best_epoch, self.recipe.train.early_stopping_patience)

    def fit(self, on_epoch_end: Callable[["Run"], None] | None = None) -> None:
        """Train the planned epochs through the Trainer's loop (kit/training/engine.py: Trainer.fit, Trainer.update),
        this run as its hooks. A signal stops it at the next update, its position saved in last.pt."""
        t, spec = self.trainer, self.recipe.train
        if self.should_stop_early():  # a finished run resumed: it stopped early, and would stop again at once
            self.echo(f"{self.dir}: stopped early at epoch {self.epoch} (best {self.best_acc:.2%} at epoch {self.best_epoch})")
            return
        if spec.log == "tensorboard" and self.ranks.main:
            self.log = EpochLog(self.dir, self.recipe.name, first_epoch=self.epoch + 1)
        self.on_epoch_end = on_epoch_end
        try:
            with deterministic(spec.deterministic), self.stop.installed():
                t.fit(self)
        finally:
            if self.progress is not None:
                self.progress.close()
            if self.log is not None:
                self.log.close()
        if not distributed.parameters_agree(t.model, self.ranks):
            raise KitError(f"{self.dir}: the {self.ranks.world_size} processes ended with different parameters")
        if self.ranks.world_size > 1:
            self.echo(f"ranks agree: identical parameters in all {self.ranks.world_size} processes")

    def before_epoch(self, trainer: Trainer) -> None:
        self.progress = EpochProgress(self.epoch + 1, self.recipe.train.epochs, trainer.updates_per_epoch, self.ranks.main)

    def after_update(self, trainer: Trainer, done: int) -> bool:
        self.progress.update(trainer.local_batch, trainer.loss_sum)
        return done < trainer.updates_per_epoch and self.stop_asked()

    def after_epoch(self, trainer: Trainer, result: EpochResult) -> bool:
        """After an epoch's updates: score, save and print it, or save where a signal stopped it and raise; returns
        whether training goes on (False: early stopping)."""
        self.progress.close()
        if not result.complete:  # stopped inside the epoch: last.pt records the update it stopped at
            self.save()
            raise self.stopped(f"at update {self.trainer.num_updates} ({result.updates} of "
                               f"{self.trainer.updates_per_epoch} in epoch {result.epoch})")
        if not result.finite:
            raise KitError(f"{self.dir}: training diverged: the loss became {result.loss} in epoch {result.epoch}; "
                           f"the last good checkpoint is {self.dir / 'last.pt'} (epoch {result.epoch - 1})")
        row = self.record(result)
        self.save()
        self.echo(_summary(row, self.recipe.train.epochs))
        if self.stop_asked():  # saved just above
            raise self.stopped(f"after epoch {self.epoch}")
        if self.on_epoch_end is not None:
            self.on_epoch_end(self)
        if self.should_stop_early():
            self.echo(f"early stopping: no better validation accuracy for {self.epoch - self.best_epoch} epochs "
                      f"(best {self.best_acc:.2%} at epoch {self.best_epoch})")
            return False
        return True


def stopped_early(epoch: int, best_epoch: int, patience: int | None) -> bool:
    """Early stopping's rule: `patience` epochs (train.early_stopping_patience) without a new best."""
    return patience is not None and epoch - best_epoch >= patience


def silent(_: str) -> None:
    """An echo that prints nothing (the ranks other than 0, kit bench's trainers)."""


def _summary(row: dict, epochs: int) -> str:
    ema = "" if math.isnan(row["ema_val_acc"]) else f" ema_val_acc {row['ema_val_acc']:.2%}"
    return (f"epoch {row['epoch']}/{epochs} lr {row['lr']:.3g} train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.2%} val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.2%}{ema} "
            f"{row['seconds']:.1f}s {row['images_per_s']:,.0f} img/s"
            + (f" ({row['skipped_updates']} fp16 updates skipped)" if row["skipped_updates"] else ""))


def progress_bar(total: int, desc: str, main: bool = True):
    """tqdm's bar where it draws in place: its text bar on a terminal, its widget in a notebook that has ipywidgets.
    None elsewhere: in a notebook without ipywidgets tqdm's text fallback writes a line per refresh (hundreds per epoch,
    kept in the saved notebook), and a log file needs none (the epoch lines are printed either way)."""
    if not main:
        return None
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bar is an ipywidgets widget)
        except ImportError:
            return None
        from tqdm.notebook import tqdm
    elif sys.stderr.isatty():
        from tqdm import tqdm
    else:
        return None
    return tqdm(total=total, desc=desc, leave=False, unit="update")


class EpochProgress:
    """An epoch's bar (rank 0) where one draws in place (`progress_bar`); the epoch summary line is printed either way."""

    def __init__(self, epoch: int, epochs: int, updates: int, main: bool = True):
        self.bar, self.n = progress_bar(updates, f"epoch {epoch}/{epochs}", main), 0

    def update(self, images: int, loss_sum: torch.Tensor) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.n += 1
        if self.n % 20 == 0:  # .item() syncs the device: only now and then
            rate = self.bar.format_dict["rate"] or 0
            self.bar.set_postfix(loss=f"{loss_sum.item() / self.n:.3f}", img_s=f"{rate * images:,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train(recipe: Recipe, data_root: str | Path | None = None, out_root: str | Path = "runs", device: str = "auto",
          on_epoch_end: Callable[[Run], None] | None = None, echo: Callable[[str], None] = print,
          run_dir: str | Path | None = None) -> Path:
    """Train a recipe into a new run directory (`run_dir`, or out_root/<recipe>-<time>); returns its path."""
    recipe = resolve_teachers(with_data_root(recipe, data_root), recipe.name)
    run = open_run(recipe, None, run_dir=run_dir, out_root=out_root, device=device, echo=echo)
    run.fit(on_epoch_end)
    return run.dir


def resume(run_dir: str | Path, overrides: tuple[str, ...] = (), data_root: str | Path | None = None,
           device: str = "auto", on_epoch_end: Callable[[Run], None] | None = None,
           echo: Callable[[str], None] = print) -> Path:
    """Continue a run from its last.pt (optimizer, LR table, EMA, RNG); `train.epochs=N` may extend it.
    A run trained on CUDA continues on the CPU (`device='cpu'`) and the other way round."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise KitError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = with_data_root(load_recipe(run_dir / "recipe.yaml", overrides), data_root)
    recipe = resolve_teachers(recipe, str(run_dir / "recipe.yaml"))
    for stale in run_dir.glob(".*.tmp"):  # a write that a kill cut short: never renamed into place
        stale.unlink(missing_ok=True)
    payload = None
    if (run_dir / "last.pt").is_file():
        payload = read_payload(run_dir / "last.pt")
    else:  # stopped before its first checkpoint: start it again, the same way
        echo(f"{run_dir}: no checkpoint yet: training it from the start (its recipe.yaml, train.seed {recipe.train.seed})")
    run = open_run(recipe, payload, run_dir=run_dir, device=device, echo=echo)
    run.fit(on_epoch_end)
    return run.dir


def open_run(recipe: Recipe, init_from: dict | None, run_dir: str | Path | None = None, out_root: str | Path = "runs",
             device: str = "auto", echo: Callable[[str], None] = print) -> Run:
    """The one way a run starts, ready for Run.fit: from scratch (`init_from` None) or from a checkpoint's payload,
    into `run_dir` (a new out_root/<recipe>-<time> when None)."""
    source = recipe.name if init_from is None else str(Path(run_dir) / "recipe.yaml")
    dataset, pseudo = load_dataset(recipe.data), None
    if recipe.pseudo.probs:
        from kit.training.pseudo import add_pseudo_labels
        dataset, pseudo = add_pseudo_labels(dataset, recipe)
    check_batch(recipe, len(dataset.train))
    recipe = with_num_classes(recipe, len(dataset.classes), source)
    ranks, dev = distributed.start(device)
    starts = distributed.gather(None if init_from is None else init_from["num_updates"], ranks)
    if len(set(starts)) > 1:  # under torchrun: a node that does not see the run folder the others see
        seen = ", ".join(f"rank {r}: {'no checkpoint' if n is None else f'{n} updates'}" for r, n in enumerate(starts))
        raise KitError(f"{run_dir}: the {ranks.world_size} processes start from different checkpoints ({seen}): "
                       "--runs must be one folder that every node shares")
    if recipe.train.batch_size % ranks.world_size:
        raise KitError(f"{source}: train.batch_size {recipe.train.batch_size} does not split over {ranks.world_size} processes")
    trainer = build_trainer(recipe, dataset, dev, source, rank=ranks.rank, world_size=ranks.world_size,
                            echo=echo if ranks.main else silent)
    if run_dir is None:
        run_dir = distributed.broadcast(new_run_dir(out_root, recipe.name) if ranks.main else None, ranks)
    run = Run(recipe, Path(run_dir), trainer, dataset, echo, ranks)
    if init_from is not None:
        if len(dataset.classes) != len(init_from["classes"]):
            raise KitError(f"{init_from['path']}: has {len(init_from['classes'])} classes but the data has {len(dataset.classes)}")
        run.restore(init_from)
    if ranks.main:
        save_recipe(recipe, run.dir / "recipe.yaml")
    if pseudo is not None and ranks.main:
        from kit.training.pseudo import PSEUDO_TABLE, describe
        write_text(run.dir / PSEUDO_TABLE, pseudo.to_csv(index=False))
        run.echo(describe(pseudo, recipe))
    precision, why = choose_precision(recipe.train.precision, dev)
    if ranks.main:  # what the files do not say: where it trained (kit runs reads it)
        write_text(run.dir / RUN_INFO, json.dumps({"device": str(dev), "device_name": device_name(dev), "precision": precision,
                                                   "processes": ranks.world_size, "parameters": trainer.num_params}))
    if init_from is None:
        processes = f", {ranks.world_size} processes" if ranks.world_size > 1 else ""
        run.echo(f"{recipe.name}: {trainer.num_params:,} parameters, {len(dataset.train):,} training / "
                 f"{len(dataset.held_out):,} validation images, {dev}, precision {precision} ({why}){processes}, run {run.dir}")
        if recipe.data.validation == "none":
            run.echo("validation: none (every labelled image trains): best.pt is the last epoch, with the EMA weights "
                     "when train.ema_decay is set")
    else:
        inside = f", {run.in_epoch} updates into epoch {run.epoch + 1}" if run.in_epoch else ""
        run.echo(f"resuming {run.dir} after epoch {run.epoch} of {recipe.train.epochs}{inside}")
    return run


def check_batch(recipe: Recipe, n_train: int) -> None:
    if recipe.train.batch_size > n_train:
        raise KitError(f"{recipe.name}: train.batch_size {recipe.train.batch_size} is larger than the "
                       f"{n_train} training images")
