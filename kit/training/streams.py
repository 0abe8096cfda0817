"""The random streams a run draws from, owned by the Trainer: seeded once, saved in every checkpoint and put back
on resume, so that a run stopped at any moment continues bit-exactly."""

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)


def rng_state(order_gen: torch.Generator, augment_states: list[torch.Tensor]) -> dict:
    """Every random stream a run draws from, as weights_only-safe values: the shared order stream and
    each rank's augmentation stream."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "order": order_gen.get_state(), "augment": augment_states, "generator_device": order_gen.device.type,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def restore_rng(state: dict, order_gen: torch.Generator, aug_gen: torch.Generator, rank: int = 0, world_size: int = 1) -> bool:
    """Put every random stream back where `rng_state` found it. The data streams of a run saved on another
    device type (CUDA's Philox state does not fit the CPU's Mersenne Twister) or with another number of
    processes cannot continue: returns False and leaves the generators as seeded."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("generator_device") != order_gen.device.type or len(state.get("augment", [])) != world_size:
        return False
    order_gen.set_state(state["order"])
    aug_gen.set_state(state["augment"][rank])
    return True
