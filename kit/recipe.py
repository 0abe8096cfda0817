"""One typed, frozen recipe per model: read from YAML, validated strictly, overridable with
`--set a.b=value`, written back as YAML beside every run."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kit.errors import KitError
from kit.io import write_text
from kit.typed import build, describe_range, fraction, in_range, non_negative, positive, safe_yaml, to_plain

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the repository's recipes/ (editable install)
KIT_VERSION = "0.7.0"  # kit.__version__, written into every checkpoint (pyproject.toml's version)
DEFAULT_MAX_PARAMS = 5_000_000  # the competition's limit: "best ResNet under 5 million parameters"
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad", "rmsprop", "nadam", "radam", "lamb", "lars",
              "lookahead_momentum", "lookahead_sgd", "lookahead_adamw")  # timm's names; lookahead_* wraps the base
SCHEDULES = ("constant", "cosine", "step", "multistep", "plateau", "poly", "onecycle")
TTA_MODES = ("none", "flip", "shift", "flip-shift")  # test-time augmentation views (kit.inference.tta)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision and --precision (kit.device.choose_precision)
WEIGHTS_FROM = ("better", "ema", "raw")  # which weights of a checkpoint: the better of raw and EMA at its epoch, EMA, raw
OLD_WEIGHTS_FROM = {"best": "better"}  # the choice's name before 0.5 ("best" is now only best.pt's: the best epoch)


@dataclass(frozen=True)
class PaperSpec:
    source: str = ""  # e.g. "paper 001 (Garg et al.), final model"
    reported_accuracy: float | None = field(default=None, metadata={"min": 0, "max": 100})  # percent
    metric: str = "top-1 validation accuracy"


DATA_FORMATS = ("cifar", "folder", "csv", "pixels", "npz")  # how the labelled images are stored (kit.data.formats)
STACKERS = ("logistic",)  # kit blend --stacker: scikit-learn's LogisticRegression on the members' probabilities
HELD_OUT = ("val", "test")  # what is scored: the recipe's validation images, or the labelled test set (--held-out)
LABEL_STYLES = ("index", "name", "probs")  # a submission's labels (kit.inference.submission, --labels)
REPORT_MISTAKES = 24  # kit report --mistakes: the worst mistakes (and most-disagreed test images) shown
LR_FIND_RULES = ("minimum", "steep")  # kit lr-find --rule: the LR of the lowest smoothed loss / 10, or the steepest fall
SWEEP_HEARTBEAT_S = 10  # kit sweep --heartbeat: a trial's heartbeat in a database (seconds); 3 missed: its worker is dead
SWEEP_GRACE_BEATS = 3
SWEEP_MAX_RETRIES = 3  # a planned trial runs at most 1 + this many times (each failure by heartbeat queues it again)
SWEEP_DB_WAIT_S = 120  # kit sweep --db-wait: how long a worker waits for a database that stopped answering
LR_FIND_UPDATES = 800  # kit lr-find --updates: ~100 a decade from 1e-7 to 10 (README: why not fastai's 100)
VALIDATION = ("test", "split", "fold", "none")  # the labelled test set, a stratified split of the training set, one
# of k stratified folds (kit train --folds: the other folds train), or no validation


@dataclass(frozen=True)
class DataSpec:
    format: Literal[DATA_FORMATS] = "cifar"  # cifar: the python pickles; the others read data.train / data.test
    dataset: Literal["cifar10", "cifar100"] = "cifar10"  # format: cifar
    root: str = "data"  # cifar: the folder holding cifar-10-batches-py/ or cifar-100-python/; else where paths start
    train: str = ""  # folder: a folder of class folders; csv: the CSV of ids and labels; pixels: the CSV; npz: the file
    test: str = ""  # the labelled test set, in the same format ("" when there is none)
    train_images: str = ""  # csv: the folder of the training images, each named <id>.<extension>
    test_images: str = ""  # csv: the folder of the labelled test images
    id_column: str = "id"  # csv, pixels: the CSV's id column (pixels without one: ids are row numbers from 1)
    label_column: str = "label"  # csv, pixels: the CSV's label column (class names or indices)
    classes: tuple[str, ...] = ()  # class names in label order; empty: from the data (sorted names, or 0..K-1)
    image_size: int = field(default=32, metadata={"min": 8})  # pixels per side; every image must have it
    channels: Literal[1, 3] = 3  # 1: grayscale (images are converted on reading), 3: RGB
    validation: Literal[VALIDATION] = "test"
    val_fraction: float = fraction(0.2)  # only for validation: split (stratified)
    split_seed: int = 0  # validation: split and fold
    folds: int = field(default=5, metadata={"min": 2})  # only for validation: fold (kit train --folds K sets it)
    fold: int = field(default=0, metadata={"min": 0})  # validation: fold: the fold validated on, 0..folds-1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, size, size): one image as the model takes it."""
        return self.channels, self.image_size, self.image_size


@dataclass(frozen=True)
class ModelSpec:
    name: str = "resnet"  # a registered preset, or timm:NAME / torchvision:NAME
    args: dict = field(default_factory=dict)
    num_classes: int | None = positive(None)  # null: the data's classes (set, it must equal their number)
    pretrained_path: str | None = None  # local weights only: nothing is downloaded at run time


@dataclass(frozen=True)
class BudgetSpec:
    max_params: int | None = positive(DEFAULT_MAX_PARAMS)  # null turns the budget off...
    reason: str = ""  # ...and then the recipe must say why


@dataclass(frozen=True)
class OptimSpec:
    name: Literal[OPTIMIZERS] = "momentum"  # timm names: "momentum" is torch SGD, timm's "sgd" is Nesterov SGD
    lr: float = positive(0.1)
    momentum: float = field(default=0.9, metadata={"min": 0, "lt": 1})
    weight_decay: float = non_negative(0.0)
    betas: tuple[float, float] | None = None
    decay_norm_and_bias: bool = True  # torch's default; timm's would exempt BN and bias from weight decay
    norm_lr_scale: float = positive(1.0)  # LR multiplier for BatchNorm weights and biases (airbench: 64 on BN biases)
    grad_clip: float | None = positive(None)
    grad_clip_mode: Literal["norm", "value"] = "norm"


@dataclass(frozen=True)
class ScheduleSpec:
    name: Literal[SCHEDULES] = "cosine"
    warmup_epochs: int = non_negative(0)
    warmup_lr: float = non_negative(1e-5)
    min_lr: float = non_negative(0.0)
    decay_epochs: float = positive(30.0)  # step: decay every this many epochs
    milestones: tuple[int, ...] = ()  # multistep: epochs (0-based, as torch's MultiStepLR) at which the lr drops
    decay_rate: float = positive(0.1)  # step/multistep/plateau factor; poly power
    per_update: bool = True  # step the schedule after every update, not once an epoch
    onecycle_pct_start: float = fraction(0.3)
    plateau_patience: int = positive(10)


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = positive(30)
    batch_size: int = positive(128)
    seed: int = 0
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    ema_decay: float | None = fraction(None)  # per update; null: no EMA
    early_stopping_patience: int | None = positive(None)  # epochs without a new best validation accuracy
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16 if native, fp16 on 7.x, else fp32 (CPU: fp32)
    channels_last: bool = True
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"  # torch.compile of model + loss (CUDA)
    cuda_graph: bool = True  # CUDA: capture the whole update once and replay it (falls back to eager, saying why)
    deterministic: bool = False  # deterministic kernels only (repeatable GPU runs, slower); the CPU is always repeatable
    log: Literal["none", "tensorboard"] = "none"  # tensorboard: event files in the run directory (pip install kit[tensorboard])


@dataclass(frozen=True)
class AugmentSpec:
    crop_padding: int = non_negative(4)  # random crop back to the input size after padding; 0: off
    crop_padding_mode: Literal["zeros", "reflect"] = "zeros"
    flip: bool = True
    alternate_flip: bool = False  # airbench: each image flipped in every other epoch, not by a fresh coin each epoch
    policy: Literal["none", "trivialaugment", "randaugment", "augmix"] = "none"  # per-sample op and magnitude
    randaugment_ops: int = positive(2)  # N
    randaugment_magnitude: int = field(default=9, metadata={"min": 0, "max": 30})  # M: a bin of 31
    augmix_magnitude: int = field(default=9, metadata={"min": 0, "max": 30})  # a bin of 31 (RandAugment's table)
    augmix_width: int = positive(3)  # chains mixed per image
    augmix_depth: int = positive(3)  # each chain draws 1..depth ops
    sharpness_factor: float = non_negative(0.0)  # torchvision's RandomAdjustSharpness; 0: off
    sharpness_prob: float = field(default=0.0, metadata={"min": 0, "max": 1})
    rotation_degrees: float = field(default=0.0, metadata={"min": 0, "max": 180})
    color_jitter: float = field(default=0.0, metadata={"min": 0, "max": 1})  # brightness/contrast/saturation
    cutout_size: int = non_negative(0)
    erasing_prob: float = field(default=0.0, metadata={"min": 0, "max": 1})  # timm's RandomErasing, per sample
    erasing_area: tuple[float, float] = field(default=(0.02, 1 / 3), metadata={"gt": 0, "max": 1})  # of the image
    erasing_mode: Literal["const", "rand", "pixel"] = "pixel"  # zeros, a random colour, or random pixels (normalized)
    mixup_alpha: float = non_negative(0.0)
    cutmix_alpha: float = non_negative(0.0)
    mix_prob: float = field(default=1.0, metadata={"min": 0, "max": 1})


@dataclass(frozen=True)
class PredictSpec:
    tta: Literal[TTA_MODES] = "flip"
    batch_size: int = positive(1000)  # images per inference batch: validation, predict, evaluate, report (--batch-size)


@dataclass(frozen=True)
class DistillSpec:
    teachers: tuple[str, ...] = ()  # run directories or checkpoint files (any architecture); empty: no distillation
    temperature: float = positive(4.0)
    alpha: float = field(default=0.5, metadata={"min": 0, "max": 1})  # weight of the soft term against the label loss
    weights_from: Literal[WEIGHTS_FROM] = "better"  # which weights of each teacher checkpoint
    teacher_sha256: tuple[str, ...] = ()  # filled in by kit when the run starts: the teachers it was taught by


@dataclass(frozen=True)
class PseudoSpec:
    """Pseudo-labels (kit train --pseudo): unlabelled test images added to the training images (never to validation)
    with the class a probability file gives them, where its probability passes `threshold`."""
    probs: str = ""  # a probability file of the unlabelled test set (kit predict's SUBMISSION.probs.npz); "": none
    test: str = ""  # the unlabelled images; "": the test file the probability file names
    threshold: float = field(default=0.9, metadata={"min": 0, "max": 1})  # of the predicted class's probability
    soft: bool = False  # train on the probabilities themselves, not on the predicted class


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    description: str = ""
    paper: PaperSpec = field(default_factory=PaperSpec)
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    predict: PredictSpec = field(default_factory=PredictSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    pseudo: PseudoSpec = field(default_factory=PseudoSpec)


def recipe_from_dict(raw: dict, source: str, overrides: tuple[str, ...] = ()) -> Recipe:
    """Validate a raw mapping (plus `a.b=value` overrides) into a Recipe."""
    raw = dict(raw or {})
    for item in overrides:
        apply_override(raw, item)
    if isinstance(raw.get("data"), dict) and raw["data"].get("validation") == "test_batch":  # its name before 0.4
        raw["data"] = {**raw["data"], "validation": "test"}
    if isinstance(raw.get("distill"), dict) and raw["distill"].get("weights_from") in OLD_WEIGHTS_FROM:
        raw["distill"] = {**raw["distill"], "weights_from": OLD_WEIGHTS_FROM[raw["distill"]["weights_from"]]}
    if isinstance(raw.get("train"), dict) and "eval_batch_size" in raw["train"]:  # before 0.5: validation's own batch size
        train = dict(raw["train"])
        predict = dict(raw.get("predict") or {})
        predict.setdefault("batch_size", train.pop("eval_batch_size"))
        raw["train"], raw["predict"] = train, predict
    try:
        recipe = build(Recipe, raw, source)
    except KitError as err:
        raise KitError(f"{err}{_blame(str(err), overrides)}") from None
    _check_consistency(recipe, source)
    return recipe


def _blame(message: str, overrides: tuple[str, ...]) -> str:
    """' (from --set KEY=VALUE)' when the failing key was overridden on the command line."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if any(f"{before}{key}{after}" in message for before, after in ((" ", ":"), ("'", "'"), (" ", "["), (" ", "."))):
            return f" (from --set {item})"
    return ""


def load_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe; its name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path}: recipe file not found")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise KitError(f"{path}: not a UTF-8 text file (byte {err.start}); a recipe is YAML text") from None
    except OSError as err:
        raise KitError(f"{path}: could not be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line, whatever the parser wrote
        raise KitError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is not None and not isinstance(raw, dict):
        raise KitError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw or {})
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, str(path), overrides)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw recipe mapping."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise KitError(f"--set {item}: expected KEY=VALUE, e.g. --set optim.lr=0.05")
    value = parse_value(text, f"--set {item}")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise KitError(f"--set {item}: '{part}' is not a section")
        else:
            child = node[part] = dict(child)
        node = child
    node[parts[-1]] = value


def parse_value(text: str, where: str):
    """A command-line value read as YAML, with YAML 1.1's gap closed: `1e-9` (no dot) is a float, not a string."""
    try:
        value = safe_yaml(text, where)
    except yaml.YAMLError:
        raise KitError(f"{where}: the value is not valid YAML") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _check_consistency(recipe: Recipe, source: str) -> None:
    if recipe.budget.max_params is None and not recipe.budget.reason.strip():
        raise KitError(f"{source}: budget.max_params is null: budget.reason must say why the budget is off")
    if recipe.schedule.name == "multistep" and not recipe.schedule.milestones:
        raise KitError(f"{source}: schedule.milestones: a multistep schedule needs at least one milestone epoch")
    if list(recipe.schedule.milestones) != sorted(recipe.schedule.milestones):
        raise KitError(f"{source}: schedule.milestones: {list(recipe.schedule.milestones)} must be increasing")
    low, high = recipe.augment.erasing_area
    if low > high:
        raise KitError(f"{source}: augment.erasing_area: [{low}, {high}] must be [smallest, largest] fractions of the image")
    _check_data(recipe, source)
    if (recipe.augment.mixup_alpha or recipe.augment.cutmix_alpha) and recipe.train.batch_size % 2:
        raise KitError(f"{source}: train.batch_size: mixup/cutmix need an even batch size, got {recipe.train.batch_size}")


def _check_data(recipe: Recipe, source: str) -> None:
    data = recipe.data
    if data.format != "cifar" and not data.train:
        raise KitError(f"{source}: data.train: format {data.format} reads the training set from data.train (a path under data.root)")
    if data.format == "csv" and not data.train_images:
        raise KitError(f"{source}: data.train_images: format csv needs the folder of the training images")
    if data.format == "csv" and data.test and not data.test_images:
        raise KitError(f"{source}: data.test_images: format csv needs the folder of the labelled test images")
    if data.validation == "test" and data.format != "cifar" and not data.test:
        raise KitError(f"{source}: data.validation: test needs data.test (a labelled test set); or use split, or none")
    if data.validation == "fold" and data.fold >= data.folds:
        raise KitError(f"{source}: data.fold {data.fold} is not one of the {data.folds} folds 0..{data.folds - 1}")
    if data.classes and recipe.model.num_classes is not None and len(data.classes) != recipe.model.num_classes:
        raise KitError(f"{source}: data.classes names {len(data.classes)} classes but model.num_classes is {recipe.model.num_classes}")
    if data.validation == "none":
        needs = [key for key, on in (("train.early_stopping_patience", recipe.train.early_stopping_patience is not None),
                                     ("schedule.name: plateau", recipe.schedule.name == "plateau")) if on]
        if needs:
            raise KitError(f"{source}: data.validation: none leaves nothing to score, but {needs[0]} needs validation accuracy")


CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def known_num_classes(recipe: Recipe) -> int | None:
    """How many classes a recipe fixes before its data is read: model.num_classes, else data.classes, else its CIFAR
    dataset's; None: only the data can say."""
    if recipe.model.num_classes is not None:
        return recipe.model.num_classes
    if recipe.data.classes:
        return len(recipe.data.classes)
    return CIFAR_NUM_CLASSES[recipe.data.dataset] if recipe.data.format == "cifar" else None


def with_num_classes(recipe: Recipe, num_classes: int, source: str) -> Recipe:
    """The recipe with the model's head sized to the data's `num_classes`. A recipe that sets model.num_classes to
    another number would train a head whose extra outputs name no class (or too few outputs): one KitError."""
    if recipe.model.num_classes not in (None, num_classes):
        raise KitError(f"{source}: model.num_classes is {recipe.model.num_classes} but the data has {num_classes} classes; "
                       f"leave model.num_classes out (the head takes the data's classes)")
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, num_classes=num_classes))


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every field, defaults included)."""
    return yaml.safe_dump(to_plain(recipe), sort_keys=False)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe atomically."""
    write_text(path, recipe_to_yaml(recipe))


def recipe_as_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-dict form, stored in checkpoints."""
    return to_plain(recipe)


# The command-line flags' and the Python API's arguments: their choices and ranges, owned once (kit.cli and kit.api
# read them), so a value one refuses the other refuses in the same one line. Numbers must be finite (kit.typed.in_range).

DEVICES = ("auto", "cpu", "cuda")  # --device (kit.device.resolve_device)


@dataclass(frozen=True)
class Argument:
    flag: str  # how the command line spells it
    choices: tuple = ()  # the allowed values, or () for a number
    kind: type | None = None  # int or float, for a number
    limits: dict = field(default_factory=dict)  # min, max, gt, lt (kit.typed's names)

    def describe(self) -> str:
        return f"one of {', '.join(map(str, self.choices))}" if self.choices else describe_range(self.limits)


ARGUMENTS = {
    "held_out": Argument("--held-out", HELD_OUT),
    "tta": Argument("--tta", TTA_MODES),
    "weights_from": Argument("--weights-from", WEIGHTS_FROM + tuple(OLD_WEIGHTS_FROM)),
    "precision": Argument("--precision", PRECISIONS),
    "device": Argument("--device", DEVICES),
    "rule": Argument("--rule", LR_FIND_RULES),
    "labels": Argument("--labels", LABEL_STYLES),
    "select_on": Argument("--select-on", kind=float, limits={"gt": 0, "max": 1}),
    "adapt_prior": Argument("--adapt-prior", kind=float, limits={"min": 0}),
    "batch_size": Argument("--batch-size", kind=int, limits={"min": 1}),
    "rounds": Argument("--rounds", kind=int, limits={"min": 1}),
    "mistakes": Argument("--mistakes", kind=int, limits={"min": 1}),
    "updates": Argument("--updates", kind=int, limits={"min": 10}),
    "start_lr": Argument("--start-lr", kind=float, limits={"gt": 0}),
    "end_lr": Argument("--end-lr", kind=float, limits={"gt": 0}),
    "diverge": Argument("--diverge", kind=float, limits={"gt": 1}),
    "folds": Argument("--folds", kind=int, limits={"min": 2}),
    "stacker": Argument("--stacker", STACKERS),
    "heartbeat": Argument("--heartbeat", kind=int, limits={"min": 1}),
    "db_wait": Argument("--db-wait", kind=float, limits={"min": 0}),
}


def check_argument(name: str, value: Any, spelled: str | None = None) -> Any:
    """`value` if ARGUMENTS[name] allows it (None always: the default), else one KitError naming it as `spelled`
    (the flag, or `name=` from Python)."""
    arg, spelled = ARGUMENTS[name], spelled or f"{name}="
    if value is None:
        return value
    if arg.choices:
        if not isinstance(value, str) or value not in arg.choices:
            raise KitError(f"{spelled} {value!r}: not allowed; choose {arg.describe()}")
        return value
    number = value
    if arg.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise KitError(f"{spelled} {value!r}: expected a whole number ({arg.describe()})")
    if arg.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KitError(f"{spelled} {value!r}: expected a number ({arg.describe()})")
        number = float(value)
    if not in_range(number, arg.limits):
        raise KitError(f"{spelled} {value!r}: out of range; allowed: {arg.describe()}")
    return number


def check_arguments(values: dict[str, Any]) -> None:
    """Every value whose name ARGUMENTS owns, checked as from Python (`select_on=`)."""
    for name, value in values.items():
        if name in ARGUMENTS:
            check_argument(name, value)
