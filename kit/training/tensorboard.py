"""TensorBoard event files in the run directory: losses, accuracies, the learning rate and images/s per epoch.
Optional: `pip install "kit[tensorboard]"`."""

from pathlib import Path

from kit.errors import KitError

SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_acc", "accuracy/val": "val_acc",
           "accuracy/val_ema": "ema_val_acc", "lr": "lr", "images_per_s": "images_per_s"}


class EpochLog:
    """One SummaryWriter per run (a resumed run appends; epochs after the checkpoint are purged)."""

    def __init__(self, run_dir: Path, name: str, first_epoch: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KitError(f"{name}: train.log: tensorboard needs the tensorboard package: pip install \"kit[tensorboard]\"") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_epoch)

    def write(self, row: dict) -> None:
        for tag, column in SCALARS.items():
            value = row[column]
            if value == value:  # NaN (no EMA) is left out
                self.writer.add_scalar(tag, value, global_step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
