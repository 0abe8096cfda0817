"""What breaks a CUDA-graph capture, found on any device: a torch dispatch mode that watches one update and
names each op that would read the device from the host, bring host data into the graph, or give a tensor a
shape that depends on its values.

A captured graph replays kernels with fixed arguments, so inside the update there may be no
- host read (`.item()`, `float(t)`, `bool(t)`, indexing with a 0-dim tensor: `_local_scalar_dense`), which
  synchronizes and is refused while a stream captures;
- tensor made from Python values (`torch.tensor(...)`, `t[i] = 0.5`: `lift_fresh`), or made without a device
  (it lands on the host), or copied between devices: a host-to-device copy is recorded once, with the value
  of capture time;
- data-dependent shape (`nonzero`, boolean-mask indexing, `unique`, ...), which needs the count on the host.
On the CPU the host and the device are one, so a copy to the host and a tensor made without `device=` are caught
where they are asked for, by a torch function mode that sees each call's arguments and result. The ops still run, so the update goes on and
every hazard is listed, not just the first."""

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}
FROM_PYTHON = {"lift_fresh", "lift_fresh_copy", "lift"}
DATA_DEPENDENT = {"nonzero", "masked_select", "masked_scatter", "unique", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "unique_dim_consecutive", "argwhere", "bincount", "repeat_interleave"}
COPIES = {"copy_", "_to_copy", "copy"}
BOOLEAN_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}
TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__}  # np.asarray(t) too
PACKAGE = Path(__file__).resolve().parents[1]  # kit/: the first frame inside it names the line


@dataclass(frozen=True)
class Hazard:
    op: str  # the aten op, e.g. aten._local_scalar_dense.default
    why: str
    where: str  # file:line  code of the innermost kit frame

    def __str__(self) -> str:
        return f"{self.op} ({self.why}) at {self.where}"


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if Path(f.filename).resolve() != Path(__file__).resolve()]
    ours = [f for f in frames if PACKAGE in Path(f.filename).resolve().parents]
    torch_dir = Path(torch.__file__).resolve().parent
    outside_torch = [f for f in frames if torch_dir not in Path(f.filename).resolve().parents]
    frame = (ours or outside_torch or frames)[-1]
    return f"{frame.filename}:{frame.lineno}  {(frame.line or '').strip()}"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class HazardMode(TorchDispatchMode):
    """Records every capture hazard dispatched while active; the ops still run."""

    def __init__(self, found: list[Hazard]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        why = None
        if name in HOST_READS:
            why = "a host read: synchronizes, refused during capture"
        elif name in FROM_PYTHON:
            why = "a tensor made from Python values: a host-to-device copy"
        elif name in DATA_DEPENDENT and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            why = "a data-dependent shape: its size is read on the host"
        elif name in BOOLEAN_INDEXING and any(t.dtype == torch.bool for t in _tensors(args[1] if len(args) > 1 else [])):
            why = "boolean-mask indexing: a data-dependent shape"
        elif name in COPIES:
            devices = {t.device.type for t in _tensors(list(args))}
            if kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]).type)
            if len(devices) > 1:
                why = f"a copy between devices {sorted(devices)}"
        if why:
            self.found.append(Hazard(str(func), why, _where()))
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    """Whether a Tensor method call copies to the host on CUDA: .cpu(), .numpy(), .tolist(), np.asarray(t), .to("cpu").
    Only the host spelled as text counts for .to: the update's own device, which is the CPU in these tests, comes as a
    torch.device (torch's GradScaler and clip_grad_norm_ move tensors to theirs), and on CUDA that is no copy."""
    if func in TO_HOST:
        return True
    if func is torch.Tensor.to:
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(target, str) and torch.device(target).type == "cpu"
    return False


class HostMode(TorchFunctionMode):
    """Records what the dispatcher cannot see on the CPU, where the host and the device are one: a copy to the host
    (by the Tensor method that makes it), and a tensor made without a device. A factory is found by its result: any
    torch function that takes no tensor and returns one, without device= (torch.zeros, torch.normal, torch.tril_indices,
    ...); the *_like and new_* forms take a tensor and inherit its device."""

    def __init__(self, found: list[Hazard]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _to_host(func, args, kwargs):
            self.found.append(Hazard(f"Tensor.{name}", "a device-to-host copy: synchronizes, refused during capture", _where()))
        result = func(*args, **kwargs)
        made = _tensors(result if isinstance(result, (list, tuple)) else [result])
        if made and not _tensors(list(args) + list(kwargs.values())) and kwargs.get("device") is None:
            self.found.append(Hazard(f"torch.{name}", "a tensor made without device=: a host tensor on CUDA", _where()))
        return result


def find_hazards(update: Callable[[], None]) -> list[Hazard]:
    """Run `update` once and return what would break its capture as a CUDA graph (empty: capturable)."""
    found: list[Hazard] = []
    with HostMode(found), HazardMode(found):
        update()
    return found
