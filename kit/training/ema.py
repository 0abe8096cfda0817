"""timm's ModelEmaV3 with its per-update host work cut to two multi-tensor launches.

ModelEmaV3.apply_update_ rebuilds both state_dicts and launches one copy per integer buffer on every
update; with ~50 BatchNorm layers that host work, not the GPU, bounds a small-batch update. The tensor
lists never change (loading a checkpoint copies into the same tensors), so they are built once.
"""

import torch
from timm.utils import ModelEmaV3


class CachedModelEma(ModelEmaV3):
    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, decay=decay)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._floats = ([e for e, _ in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
        self._others = ([e for e, _ in pairs if not e.is_floating_point()], [m for e, m in pairs if not e.is_floating_point()])

    @torch.no_grad()
    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - decay)
        if self._others[0]:
            torch._foreach_copy_(self._others[0], self._others[1])
