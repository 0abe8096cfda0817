"""Where and how the math runs, in one place: the device, the autocast precision, the memory format and
the determinism switch. Training, predict, evaluate, report and bench all set up through here.

The update's code is the same on every device (fused optimizers, the LR as a device tensor, the same
augmentation and loss). What differs between the CPU and CUDA is decided here and nowhere else:
`training_precision` (autocast dtype and memory format), `compiles` (torch.compile), `captures` (one CUDA
graph per update), `side_stream` (the eager updates before capture) and `synchronize`."""

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from kit.errors import KitError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KitError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


@dataclass
class Precision:
    """Where and how the math runs: device, autocast dtype (None: fp32), memory format."""
    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        # no cast cache: a captured CUDA graph must not hold casts cached outside it (torch's CUDA-graph notes)
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def device_name(device: torch.device) -> str:
    """What the device is: the GPU's name (e.g. "Tesla T4"), else the processor's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine() or "cpu"


def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision a device runs (name, why). `auto`: bf16 where the GPU runs it natively (compute capability
    8.0 and up: A100, L4, H100), fp16 on 7.x (V100, T4: bf16 there is emulated, slow or failing), fp32 below; the
    CPU always runs fp32 (CPU autocast is slow). An explicit choice stands on CUDA."""
    if device.type != "cuda":
        return "fp32", "the CPU trains and predicts in fp32"
    if requested != "auto":
        return requested, f"as asked ({requested})"
    major, minor = torch.cuda.get_device_capability(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", f"auto: compute capability {major}.{minor} runs bf16 natively"
    if major >= 7:
        return "fp16", f"auto: compute capability {major}.{minor} has no native bf16; fp16 with loss scaling"
    return "fp32", f"auto: compute capability {major}.{minor} has neither native bf16 nor fast fp16"


def training_precision(precision: str, channels_last: bool, device: torch.device) -> Precision:
    """The autocast dtype (`choose_precision`) and channels_last on CUDA; plain fp32 NCHW on the CPU."""
    name, _ = choose_precision(precision, device)
    if device.type != "cuda":
        return Precision(device)
    return Precision(device, DTYPES[name], channels_last)


def inference_precision(device: torch.device, precision: str = "auto") -> Precision:
    """What predict, evaluate and report run in: the same rule as training (`choose_precision`)."""
    return Precision(device, DTYPES[choose_precision(precision, device)[0]])


def worker_devices(devices: tuple[str, ...], per_device: int) -> list[str | None]:
    """One entry per worker process: each device `per_device` times, round-robin (None: no device pinning)."""
    if not devices:
        return [None] * per_device
    return [devices[i % len(devices)] for i in range(len(devices) * per_device)]


def pinned_env(device: str | None) -> dict[str, str]:
    """The environment that makes `device` (a CUDA index or UUID) the only GPU a process sees, as `cuda:0`
    (empty: not pinned)."""
    return {} if device is None else {"CUDA_VISIBLE_DEVICES": device}


def pin_device(device: str | None) -> None:
    """Pin this process to `device` (`pinned_env`). Call before CUDA starts."""
    os.environ.update(pinned_env(device))


def compiles(device: torch.device) -> bool:
    """torch.compile runs where inductor's kernels pay for their compile time: CUDA (CPU tests stay fast)."""
    return device.type == "cuda"


def captures(device: torch.device) -> bool:
    """Whether the update is recorded once as a CUDA graph and replayed (when nothing in the recipe blocks it)."""
    return device.type == "cuda"


@contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """The eager updates before capture run on a side stream (torch's rule for what precedes a capture); nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs each op as it is called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Repeatable GPU runs: deterministic kernels only (an op without one raises), no cuDNN autotuning.
    The previous global settings come back afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this for repeatable matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        if before[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
