"""Checkpoints: self-describing (recipe, classes, normalization, parameter count), written atomically,
loadable with torch.load(weights_only=True)."""

import random
from pathlib import Path

import numpy as np
import torch

from kit import __version__
from kit.errors import KitError
from kit.io import atomic_path


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream a run draws from, as weights_only-safe values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": gen.get_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def restore_rng(state: dict, gen: torch.Generator) -> None:
    """Put every random stream back where `rng_state` found it."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["data"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])


def save_checkpoint(payload: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename."""
    payload = {**payload, "kit_version": __version__}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or a run directory (its best.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise KitError(f"{path}: checkpoint not found (give a run directory or a .pt file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise KitError(f"{path}: not a readable kit checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "recipe" not in ckpt:
        raise KitError(f"{path}: not a kit checkpoint (no model weights and recipe inside)")
    ckpt["path"] = str(path)
    return ckpt
