"""The checkpoint format, defined once: what a training checkpoint (`.pt`) and an exported weights file
(`.safetensors`) hold, how they are written (atomically) and read (`torch.load(weights_only=True)`), and
how one becomes a `Checkpoint`: a model rebuilt from its recipe, ready for batched inference.

Vocabulary: what predict, evaluate and report take is a *checkpoint*: a `.pt` or `.safetensors` file, or
a run directory standing for its `best.pt`. `best.pt` is the epoch whose better weights scored highest.
`weights_from` is the raw/EMA choice everywhere; `better` (before 0.5 `best`) picks whichever of the two scored higher on validation
at the epoch the checkpoint holds (so on `last.pt`, the last epoch's better weights)."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kit.data.formats import class_names
from kit.device import Precision
from kit.errors import KitError
from kit.io import atomic_path
from kit.recipe import KIT_VERSION, OLD_WEIGHTS_FROM, Recipe, recipe_from_dict, with_num_classes

SAFETENSORS_FORMAT = "kit-weights-1"  # metadata["format"] of an exported .safetensors file


def better_weights(val_acc, ema_acc):
    """The better of the raw and the EMA weights' validation accuracy, and which it was: (score, "raw" | "ema").
    Raw wins ties and a missing EMA (NaN). Works on numbers and on metrics.csv columns alike (then both are
    arrays). The one definition of "the better of raw and EMA" that checkpoints, sweeps and plots use."""
    score = np.fmax(val_acc, ema_acc)
    source = np.where(np.asarray(ema_acc, dtype=float) > np.asarray(val_acc, dtype=float), "ema", "raw")
    if np.ndim(source) == 0:
        return float(score), str(source)
    return score, source


def save_checkpoint(payload: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename."""
    payload = {**payload, "kit_version": KIT_VERSION}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def checkpoint_file(path: str | Path) -> Path:
    """The file a checkpoint argument names: itself, or a run directory's best.pt; it must exist."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise KitError(f"{path}: checkpoint not found (give a run directory, a .pt or a .safetensors file)")
    return path


def read_payload(path: str | Path) -> dict:
    """A checkpoint's contents: a `.pt` file, a `.safetensors` file from `kit export`, or a run directory
    (its best.pt). `payload['path']` is the file read."""
    path = checkpoint_file(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise KitError(f"{path}: not a readable kit checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "model" not in payload or "recipe" not in payload:
        raise KitError(f"{path}: not a kit checkpoint (no model weights and recipe inside)")
    payload.setdefault("best_weights_from", payload.get("best_source", "raw"))  # checkpoints before 0.2 said best_source
    payload["path"] = str(path)
    return checked_payload(payload, path)


CV_FILE = "cv.yaml"  # a CV directory's recipe (kit train --folds): the folder stands for its fold runs
FOLD_DIR = "fold-{}"  # a CV directory's fold runs, from fold-0
OOF_PROBS = "oof.probs.npz"  # a CV directory's out-of-fold probabilities: written once every fold has finished


def is_cv_dir(path: str | Path) -> bool:
    """Whether `path` is a CV directory (kit train --folds: it holds cv.yaml)."""
    return (Path(path) / CV_FILE).is_file()


def fold_dirs(cv_dir: str | Path) -> list[Path]:
    """A CV directory's fold runs in fold order (fold-0, fold-1, ...; not its fold-<i>.log files)."""
    runs = [p for p in Path(cv_dir).glob(FOLD_DIR.format("*")) if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(runs, key=lambda p: int(p.name.split("-")[-1]))

PAYLOAD_FIELDS = {  # what inference reads from a checkpoint: the field, what it must be, and a test of it
    "model": ("a mapping of tensor names to tensors", lambda v: _is_state(v) and bool(v)),
    "ema": ("null or a mapping of tensor names to tensors", lambda v: v is None or _is_state(v)),
    "recipe": ("a mapping (the recipe)", lambda v: isinstance(v, dict)),
    "classes": ("a list of class names", lambda v: isinstance(v, (list, tuple))),
    "mean": ("a list of numbers, one per channel", lambda v: isinstance(v, (list, tuple))),
    "std": ("a list of numbers, one per channel", lambda v: isinstance(v, (list, tuple))),
    "num_params": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "best_weights_from": ("raw or ema", lambda v: v in ("raw", "ema")),
}


def _is_state(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items())


def checked_payload(payload: dict, path: Path) -> dict:
    """A checkpoint from outside, checked where it enters: every field inference reads is present and of its type,
    the class names are distinct, and every weight (raw and EMA, buffers included) is finite. One KitError naming the
    file and the field."""
    for name, (what, ok) in PAYLOAD_FIELDS.items():
        if name not in payload and name != "ema":
            raise KitError(f"{path}: not a kit checkpoint: the field {name!r} is missing ({what})")
        if not ok(payload.get(name)):
            raise KitError(f"{path}: its field {name!r} is {type(payload.get(name)).__name__}, not {what}")
    if not isinstance(payload.get("split", ""), str):
        raise KitError(f"{path}: its field 'split' is {type(payload['split']).__name__}, not text")
    if payload.get("weights_from", "raw") not in ("raw", "ema"):
        raise KitError(f"{path}: its field 'weights_from' is {payload['weights_from']!r}, not raw or ema")
    payload["classes"] = class_names(path, payload["classes"])
    for which, state in (("raw", payload["model"]), ("EMA", payload.get("ema"))):
        for name, tensor in (state or {}).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise KitError(f"{path}: its {which} weights hold NaN or inf ({bad:,} values of {name!r}): a model with "
                               f"them predicts one class for every image; refused")
    return payload


def safetensors_metadata(payload: dict, weights_from: str) -> dict[str, str]:
    """What an exported file carries besides its tensors (safetensors metadata is str -> str)."""
    return {"format": SAFETENSORS_FORMAT, "recipe": json.dumps(payload["recipe"]), "classes": json.dumps(payload["classes"]),
            "mean": json.dumps(payload["mean"]), "std": json.dumps(payload["std"]), "num_params": str(payload["num_params"]),
            "weights_from": weights_from, "exported_from": payload["path"], "kit_version": KIT_VERSION}


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise KitError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise KitError(f"{path}: a safetensors file without kit's metadata (write it with `kit export --format safetensors`)")
    fields = {name: _metadata(path, meta, name) for name in ("recipe", "classes", "mean", "std", "num_params")}
    stored = meta.get("weights_from")
    if stored not in ("raw", "ema"):
        raise KitError(f"{path}: its metadata 'weights_from' is {stored!r}, not raw or ema")
    payload = {"model": state, "ema": None, **fields, "best_weights_from": "raw", "exported_weights_from": stored,
               "path": str(path)}
    return checked_payload(payload, path)


def _metadata(path: Path, meta: dict[str, str], name: str):
    """One JSON field of an exported file's metadata (safetensors metadata is text)."""
    if name not in meta:
        raise KitError(f"{path}: its metadata has no {name!r} (write it with `kit export --format safetensors`)")
    try:
        return json.loads(meta[name])
    except ValueError:
        raise KitError(f"{path}: its metadata {name!r} is not JSON ({meta[name][:40]!r})") from None


@dataclass
class Checkpoint:
    """A checkpoint rebuilt as a model in eval mode on a device, with what inference needs."""
    name: str  # the run directory's name, or <folder>/<file stem>
    path: str  # the file read
    recipe: Recipe
    model: nn.Module
    classes: list[str]
    num_params: int
    mean: torch.Tensor
    std: torch.Tensor
    weights_from: str  # raw or ema: the weights actually loaded
    split: str = ""  # a fold model's folds (kit.data.datasets.split_key), "" for any other

    @property
    def fold(self) -> int | None:
        """The fold this model held out (validation: fold), else None."""
        return self.recipe.data.fold if self.recipe.data.validation == "fold" else None

    def probs(self, images: torch.Tensor, views: list, batch_size: int, prec: Precision) -> torch.Tensor:
        """(N, K) softmax probabilities averaged over the TTA `views`."""
        from kit.inference.scores import predict_probs
        return predict_probs(self.model, images, self.mean.to(prec.device), self.std.to(prec.device), views, batch_size, prec)


def load_checkpoint(path: str | Path, weights_from: str, device: torch.device) -> Checkpoint:
    """A run directory (its best.pt) or a checkpoint file, with raw, EMA or the better of the two (`better`)."""
    return checkpoint_from_payload(read_payload(path), path, weights_from, device)


def checkpoint_from_payload(payload: dict, path: str | Path, weights_from: str, device: torch.device) -> Checkpoint:
    """Build the model a read payload describes (`path` as the user gave it: it names the checkpoint)."""
    from kit.models import build_model
    source = payload["path"]
    recipe = recipe_from_dict(payload["recipe"], source)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, pretrained_path=None))  # its weights are here
    classes = payload["classes"]
    if recipe.model.num_classes is None:  # kit saves the resolved recipe; another writer may leave it to the classes
        recipe = with_num_classes(recipe, len(classes), source)
    mean, std = _normalization(payload, recipe.data.channels, source)
    chosen, state = _choose_weights(payload, weights_from)
    _check_fit(build_model(recipe, source, on_meta=True), state, source)  # its budget and shapes, before any allocation
    model = build_model(recipe, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise KitError(f"{source}: weights do not fit the model its recipe builds ({str(err).splitlines()[0]})") from None
    heads = recipe.model.num_classes
    if heads != len(classes):  # kit before 0.5 trained a 10-way head on data with fewer classes
        raise KitError(f"{source}: its model has {heads} outputs but it names {len(classes)} classes "
                       f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): its predictions could name a class "
                       f"that does not exist; train it again (the head now takes the data's classes)")
    model.to(device).eval()
    name = Path(path).name if Path(path).is_dir() else f"{Path(source).parent.name}/{Path(source).stem}"
    if Path(path).is_dir() and is_cv_dir(Path(path).resolve().parent):  # a fold run: <cv dir>/fold-<i>
        name = f"{Path(path).resolve().parent.name}/{name}"
    return Checkpoint(name, source, recipe, model, classes, int(payload["num_params"]), mean, std, chosen,
                      payload.get("split", ""))


def _check_fit(skeleton: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """The model a checkpoint's recipe describes (built on the meta device: no memory) must have the shapes of the
    weights the file holds, so that no recipe makes kit allocate more than its file's weights."""
    for name, tensor in skeleton.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise KitError(f"{source}: weights do not fit the model its recipe builds ({name}: {tuple(state[name].shape)} "
                           f"in the file, {tuple(tensor.shape)} in the model)")
    missing = [name for name in skeleton.state_dict() if name not in state]
    if missing:
        raise KitError(f"{source}: weights do not fit the model its recipe builds (no {missing[0]!r}; {len(missing)} missing)")


def _normalization(payload: dict, channels: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's per-channel mean and std, checked where they enter: finite, std > 0, one per channel."""
    try:
        mean, std = (torch.as_tensor(payload[k], dtype=torch.float32).reshape(-1) for k in ("mean", "std"))
    except (TypeError, ValueError, RuntimeError):
        mean = std = torch.full((0,), float("nan"))
    if len(mean) != channels or len(std) != channels or not (mean.isfinite().all() and (std > 0).all() and std.isfinite().all()):
        raise KitError(f"{source}: its normalization (mean {payload['mean']}, std {payload['std']}) must be finite numbers, "
                       f"with a positive std, one for each of its {channels} channel(s)")
    return mean, std


def checkpoint_weights(payload: dict, weights_from: str) -> str:
    """Which weights (raw or ema) `weights_from` takes from this checkpoint."""
    return _choose_weights(payload, weights_from)[0]


def _choose_weights(payload: dict, weights_from: str) -> tuple[str, dict]:
    weights_from = OLD_WEIGHTS_FROM.get(weights_from, weights_from)
    source = payload["path"]
    if "exported_weights_from" in payload:  # an export holds one set of weights
        stored = payload["exported_weights_from"]
        if weights_from not in ("better", stored):
            raise KitError(f"{source}: holds only the {stored} weights (exported with --weights-from {stored})")
        return stored, payload["model"]
    # this checkpoint's own epoch's better weights (checkpoints before 0.3 hold only the best epoch's choice)
    chosen = payload.get("weights_from", payload["best_weights_from"]) if weights_from == "better" else weights_from
    if chosen == "ema" and payload.get("ema") is None:
        if weights_from == "ema":
            raise KitError(f"{source}: has no EMA weights (its recipe has train.ema_decay: null); use --weights-from raw")
        chosen = "raw"
    return chosen, payload["ema"] if chosen == "ema" else payload["model"]
