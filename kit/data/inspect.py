"""`kit data inspect DIR`, and `kit train` on a folder with no data keys: the folder says what it is. It recognizes the
layouts kit reads (the CIFAR python pickles, class folders, a labels CSV beside an image folder, a pixels CSV, an
.npz), the image size and channels, whether a labelled test set exists, and the unlabelled test set, and gives the
recipe's data keys; what fits two layouts, or none, is one line saying so."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kit.data.datasets import CIFAR10_DIR, CIFAR100_DIR
from kit.data.formats import IMAGE_EXTENSIONS, list_images, read_arrays, read_csv
from kit.errors import KitError
from kit.recipe import DataSpec

VALIDATION_FOLDERS = ("val", "valid", "validation", "test")  # a labelled test set of class folders, in this order
LABEL_NAMES = ("label", "labels", "class", "target", "y")  # a CSV's label column, case aside


@dataclass(frozen=True)
class Found:
    keys: dict  # the data keys of the layout found (format, train, test, ...)
    what: list[str]  # lines saying what was found

    def spec(self, base: DataSpec, root: Path) -> DataSpec:
        return dataclasses.replace(base, root=str(root), **self.keys)

    def overrides(self) -> list[str]:
        return [f"data.{k}={v}" for k, v in self.keys.items()]

    def describe(self) -> str:
        """The line kit train prints when it takes the folder's keys."""
        return f"data: {self.what[0]}; recipe keys from the folder: {' '.join(self.overrides())}"


def inspect(root: str | Path) -> Found:
    """What the folder `root` holds, as recipe data keys (one KitError line when it is none or several layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise KitError(f"{root}: not a folder")
    for folder, dataset in ((CIFAR10_DIR, "cifar10"), (CIFAR100_DIR, "cifar100")):
        if (root / folder).is_dir():
            return Found({"format": "cifar", "dataset": dataset, "validation": "test"},
                         [f"{root}: the {dataset} python pickles ({folder}/): 32x32 RGB, the labelled test set is its "
                          f"test batch"])
    tables = {csv: read_csv(csv) for csv in sorted(root.glob("*.csv")) if csv.is_file()}  # each CSV read once
    layouts = (_class_folders(root), _labels_csv(root, tables), _pixels_csv(root, tables), _npz(root))
    found = [f for f in layouts if f is not None]
    if not found:
        raise KitError(f"{root}: no layout kit reads (class folders, a labels CSV beside an image folder, a pixels CSV "
                       f"with a label column, an .npz with images and labels, or the CIFAR pickles)")
    if len(found) > 1:
        kinds = ", ".join(f"{f.keys['format']} ({f.keys['train']})" for f in found)
        raise KitError(f"{root}: holds more than one training set ({kinds}): set data.format and data.train")
    return found[0]


def _image_shape(path: Path) -> tuple[int, int]:
    """(size, channels) of an image file, which must be square."""
    from PIL import Image
    with Image.open(path) as image:
        width, height = image.size
        channels = 1 if image.mode in ("L", "1") or image.mode.startswith("I;16") else 3
    if width != height:
        raise KitError(f"{path}: {width}x{height} pixels: kit trains on square images of one size (resize them first)")
    return width, channels


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and list_images(p))


def _flat_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root: Path) -> Found | None:
    train = root / "train" if (root / "train").is_dir() and _class_dirs(root / "train") else root if _class_dirs(root) else None
    if train is None or (train == root and any((root / v).is_dir() for v in VALIDATION_FOLDERS + ("train",))):
        return None
    classes = _class_dirs(train)
    size, channels = _image_shape(next(iter(list_images(classes[0]).values())))
    keys = {"format": "folder", "train": "." if train == root else "train", "image_size": size, "channels": channels}
    what = [f"{root}: class folders ({keys['train']}/): {sum(len(list_images(c)) for c in classes):,} images in "
            f"{len(classes)} classes, {size}x{size} {'gray' if channels == 1 else 'RGB'}"]
    labelled = next((v for v in VALIDATION_FOLDERS if (root / v).is_dir() and _class_dirs(root / v)), None)
    keys.update(test=labelled, validation="test") if labelled else keys.update(validation="split")
    what.append(f"labelled test set: {labelled}/" if labelled else "no labelled test set: validation is a stratified split")
    what += [f"unlabelled test set: {v}/ ({_flat_images(root / v):,} images)" for v in ("test", "unlabelled")
             if (root / v).is_dir() and _flat_images(root / v)]
    return Found({k: v for k, v in keys.items() if v is not None}, what)


def _label_column(columns: list[str]) -> str | None:
    return next((c for c in columns if c.strip().lower() in LABEL_NAMES), None)


def _labels_csv(root: Path, tables: dict) -> Found | None:
    """A CSV of (id, label) whose ids are the images of a folder beside it named train*."""
    for csv, table in tables.items():
        header = table.columns.tolist()
        label = _label_column(header)
        if len(header) != 2 or label is None:
            continue
        ids = {str(i) for i in table[header[0]]}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("train")):
            files = list_images(folder)
            if files and ids == {Path(name).stem for name in files}:  # every id an image and every image an id
                size, channels = _image_shape(next(iter(files.values())))
                keys = {"format": "csv", "train": csv.name, "train_images": folder.name, "id_column": header[0],
                        "label_column": label, "image_size": size, "channels": channels, "validation": "split"}
                what = [f"{root}: a labels CSV ({csv.name}: {len(ids):,} rows, columns {header[0]}, {label}) beside its "
                        f"images ({folder.name}/), {size}x{size} {'gray' if channels == 1 else 'RGB'}",
                        "no labelled test set: validation is a stratified split"]
                what += [f"unlabelled test set: {v}/ ({_flat_images(root / v):,} images)" for v in ("test",)
                         if (root / v).is_dir() and _flat_images(root / v)]
                return Found(keys, what)
    return None


def _pixels_csv(root: Path, tables: dict) -> Found | None:
    """A CSV with a label column and S*S (gray) or S*S*3 (RGB) pixel columns."""
    for csv, table in tables.items():
        label = _label_column(table.columns.tolist())
        if label is None or len(table.columns) < 10:
            continue
        pixels = len([c for c in table.columns if c != label and c.lower() not in ("id", "imageid")])
        shape = _square(pixels)
        if shape is None:
            continue
        size, channels = shape
        keys = {"format": "pixels", "train": csv.name, "label_column": label, "image_size": size, "channels": channels,
                "validation": "split"}
        what = [f"{root}: a pixels CSV ({csv.name}: {len(table):,} images, {size}x{size} {'gray' if channels == 1 else 'RGB'}, "
                f"labels in {label})", "no labelled test set: validation is a stratified split"]
        what += [f"unlabelled test set: {other.name}" for other, other_table in tables.items()
                 if other != csv and _label_column(other_table.columns.tolist()) is None and len(other_table.columns) >= 10]
        return Found(keys, what)
    return None


def _square(pixels: int) -> tuple[int, int] | None:
    for channels in (1, 3):
        side = int(round((pixels / channels) ** 0.5))
        if pixels % channels == 0 and side * side * channels == pixels and side >= 8:
            return side, channels
    return None


def _npz(root: Path) -> Found | None:
    """An .npz with images and labels (or train_images and train_labels; test_* is a labelled test set)."""
    for path in sorted(root.glob("*.npz")):
        found = read_arrays(path, {"images", "labels", "train_images", "train_labels", "test_images", "test_labels"})
        prefix = "train_" if "train_images" in found and "train_labels" in found else "" if "labels" in found else None
        if prefix is None or f"{prefix}images" not in found:
            continue
        images = found[f"{prefix}images"]
        if images.ndim == 4 and images.shape[-1] in (1, 3):
            size, channels = images.shape[1], images.shape[-1]
        elif images.ndim == 4:
            size, channels = images.shape[2], images.shape[1]
        else:
            size, channels = images.shape[1], 1
        keys = {"format": "npz", "train": path.name, "image_size": int(size), "channels": int(channels)}
        labelled = "test_images" in found and "test_labels" in found
        keys.update(test=path.name, validation="test") if labelled else keys.update(validation="split")
        what = [f"{root}: an .npz ({path.name}: {len(images):,} images, {size}x{size} {'gray' if channels == 1 else 'RGB'})",
                f"labelled test set: {path.name} (test_images)" if labelled else
                "no labelled test set: validation is a stratified split"]
        what += [f"unlabelled test set: {p.name}" for p in sorted(root.glob("*.npz"))
                 if p != path and "labels" not in read_arrays(p, set()).names]
        return Found(keys, what)
    return None


def recognized(spec: DataSpec, root: str | Path | None) -> tuple[DataSpec, Found | None]:
    """`kit train RECIPE --data-root DIR` where the recipe sets no data keys (all defaults) and DIR is not the CIFAR
    layout: the data keys the folder says (and what was found), else the spec as it is."""
    if root is None or dataclasses.replace(spec, root=DataSpec().root) != DataSpec():
        return spec, None
    root = Path(root)
    if not root.is_dir() or (root / CIFAR10_DIR).is_dir():
        return spec, None
    found = inspect(root)
    return found.spec(spec, root), found
