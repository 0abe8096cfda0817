"""`kit export`: a checkpoint's weights as safetensors (with the recipe, classes and normalization as metadata,
usable again as a predict/evaluate checkpoint), ONNX (dynamic batch axis, checked against onnxruntime) or
TorchScript (by trace). ONNX and TorchScript models take pixels scaled to [0, 1] and normalize inside."""

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kit.errors import KitError
from kit.inference.checkpoint import checkpoint_from_payload, read_payload, safetensors_metadata
from kit.inference.ensemble import expand_paths
from kit.io import atomic_path

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
CPU = torch.device("cpu")


class Normalized(nn.Module):
    """(B, 3, H, W) pixels in [0, 1] -> logits: the checkpoint's normalization, then its model."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.view(1, -1, 1, 1).float())
        self.register_buffer("std", std.view(1, -1, 1, 1).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def _require(module: str, extra: str) -> None:
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        raise KitError(f"--format {extra}: needs the {module} package: pip install \"kit[export]\"") from None


def export(path: str, fmt: str, weights_from: str = "better", out: str | None = None,
           echo: Callable[[str], None] = print) -> list[Path]:
    """Write the export of a checkpoint (or of each fold model of a CV directory: `out` is then a folder, holding
    fold-<i>.<format>, default beside each best.pt); returns the paths written."""
    if fmt not in FORMATS:
        raise KitError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    paths = expand_paths([path])
    if len(paths) == 1:
        return [export_one(path, fmt, weights_from, out, echo)]
    return [export_one(p, fmt, weights_from, None if out is None else str(Path(out) / f"{Path(p).name}{FORMATS[fmt]}"), echo)
            for p in paths]


def export_one(path: str, fmt: str, weights_from: str, out: str | None, echo: Callable[[str], None]) -> Path:
    """Write one checkpoint's export; returns its path. ONNX and TorchScript print their largest logit difference to
    eager torch."""
    payload = read_payload(path)
    checkpoint = checkpoint_from_payload(payload, path, weights_from, CPU)
    out_path = Path(out) if out else Path(payload["path"]).with_suffix(FORMATS[fmt])
    if fmt == "safetensors":
        _safetensors(checkpoint.model, safetensors_metadata(payload, checkpoint.weights_from), out_path)
    else:
        wrapped = Normalized(checkpoint.model, checkpoint.mean, checkpoint.std).eval()
        example = torch.rand(2, *checkpoint.recipe.data.image_shape, generator=torch.Generator().manual_seed(0))
        exported = _onnx(wrapped, example, out_path) if fmt == "onnx" else _torchscript(wrapped, example, out_path)
        echo(f"largest logit difference to torch (fp32, batch of 5): {exported:.2e}")
    echo(f"exported: {out_path} ({fmt}, {checkpoint.weights_from} weights of {payload['path']})")
    return out_path


def _safetensors(model: nn.Module, metadata: dict[str, str], out_path: Path) -> None:
    _require("safetensors", "safetensors")
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _check_batch(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, example: torch.Tensor) -> float:
    """Largest |logit difference| between the export and eager torch on a batch size the export never saw."""
    images = torch.rand(5, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((run(images) - model(images)).abs().max())


ONNX_MIN_TORCH = (2, 11)  # torch's dynamo ONNX exporter with today's onnxscript: works on 2.14, failed on 2.5.1


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _onnx(model: nn.Module, example: torch.Tensor, out_path: Path) -> float:
    _require("onnx", "onnx")
    _require("onnxruntime", "onnx")
    _require("onnxscript", "onnx")
    if torch_version() < ONNX_MIN_TORCH:
        raise KitError(f"--format onnx needs torch >= {'.'.join(map(str, ONNX_MIN_TORCH))} (this is {torch.__version__}); "
                       f"safetensors and torchscript work here")
    import onnxruntime
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(out_path) as tmp:
        torch.onnx.export(model, (example,), str(tmp), dynamo=True, external_data=False, verbose=False,
                          input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return _check_batch(lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model, example)


def _torchscript(model: nn.Module, example: torch.Tensor, out_path: Path) -> float:
    with warnings.catch_warnings():  # torch marks torch.jit deprecated; the format is what the user asked for
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        with atomic_path(out_path) as tmp:
            traced.save(str(tmp))
            loaded = torch.jit.load(str(tmp))
            return _check_batch(loaded, model, example)
