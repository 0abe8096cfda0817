"""Ensemble members: checkpoints rebuilt as models, ready for batched inference on a device."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kit.checkpoint import load_checkpoint
from kit.engine import Precision, predict_probs
from kit.errors import KitError
from kit.models import build_model
from kit.recipe import Recipe, recipe_from_dict


@dataclass
class Member:
    name: str  # the run directory's (or file's) name
    path: str  # the checkpoint file
    recipe: Recipe
    model: nn.Module
    classes: list[str]
    num_params: int
    mean: torch.Tensor
    std: torch.Tensor
    weights_used: str  # raw or ema

    def probs(self, images: torch.Tensor, views: list, batch_size: int, prec: Precision) -> torch.Tensor:
        """(N, K) softmax probabilities averaged over `views`."""
        return predict_probs(self.model, images, self.mean.to(prec.device), self.std.to(prec.device), views, batch_size, prec)


def load_member(path: str | Path, weights_from: str, device: torch.device) -> Member:
    """A run directory (its best.pt) or checkpoint, with raw, EMA or whichever scored best."""
    return member_from_checkpoint(load_checkpoint(path), path, weights_from, device)


def member_from_checkpoint(ckpt: dict, path: str | Path, weights_from: str, device: torch.device) -> Member:
    """Build the member a loaded checkpoint describes (`path` as given by the user: names the member)."""
    source = ckpt["path"]
    recipe = recipe_from_dict(ckpt["recipe"], source)
    model = build_model(recipe, source, check_budget=False)
    choice = ckpt.get("best_source", "raw") if weights_from == "best" else weights_from
    if choice == "ema" and ckpt.get("ema") is None:
        if weights_from == "ema":
            raise KitError(f"{source}: has no EMA weights (its recipe has train.ema_decay: null); use --weights-from raw")
        choice = "raw"
    state = ckpt["ema"] if choice == "ema" else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise KitError(f"{source}: weights do not fit the model its recipe builds ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    name = Path(path).name if Path(path).is_dir() else f"{Path(source).parent.name}/{Path(source).stem}"
    return Member(name, source, recipe, model, list(ckpt["classes"]), int(ckpt["num_params"]),
                  torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]), choice)


def load_members(paths: list[str], weights_from: str, device: torch.device) -> list[Member]:
    """Load several members; they must agree on the classes."""
    if not paths:
        raise KitError("give at least one run directory or checkpoint")
    members = [load_member(p, weights_from, device) for p in paths]
    first = members[0]
    for other in members[1:]:
        if other.classes != first.classes:
            raise KitError(f"{other.path}: its {len(other.classes)} classes ({', '.join(other.classes[:3])}, ...) differ from "
                           f"{first.path}'s {len(first.classes)} ({', '.join(first.classes[:3])}, ...): they cannot be ensembled")
    return members


def ensemble_probs(per_member: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Weighted mean of the members' probabilities (weights normalized to sum to 1)."""
    weights = weights or [1.0] * len(per_member)
    total = sum(weights)
    return sum(w / total * p for w, p in zip(weights, per_member))
