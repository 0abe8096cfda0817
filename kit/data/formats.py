"""Labelled and unlabelled images stored the ways small-image competitions ship them, decoded once into
the uint8 (N, C, S, S) tensors the engine takes:

- folder: one sub-folder per class (torchvision's ImageFolder; Tiny ImageNet); an unlabelled set is one flat folder;
- csv: a folder of images named <id>.<extension> and a CSV of ids and labels (Kaggle's CIFAR-10);
- pixels: a CSV of pixel columns, row-major (H, W, C), plus a label column (Kaggle's Digit Recognizer);
- npz: numpy arrays `images` and `labels` (or `train_images`, `test_labels`, ... as MedMNIST names them),
  optional `ids` and `classes`.

Labels are class names or indices. Every problem is one KitError naming the file and, for a CSV, the row."""

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kit.errors import KitError
from kit.recipe import DataSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DECODE_THREADS = 8  # PIL releases the GIL while decoding


INTEGER = r"-?\d+"  # an id or a label that is a whole number (pandas' str.fullmatch takes it too)


def is_integer(text: str) -> bool:
    """Whether `text` is a whole number that int() reads: one rule for ids, labels and templates."""
    return re.fullmatch(INTEGER, text) is not None


def id_key(value) -> str:
    """An id as text, integers without leading zeros, so `7`, `07` and numpy's 7 match."""
    text = str(value).strip()
    return str(int(text)) if is_integer(text) else text


DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a decimal number as a CSV, a template or a float array spells it
LARGEST_LABEL = 2**31 - 1


def label_text(value) -> str:
    """A label as text: a number that is whole (`3.0`, numpy's 3.0) becomes the integer `3`, so that float labels are
    indices, never names sorted as text (0, 1, 10, 2, ...)."""
    text = str(value).strip()
    if not is_integer(text) and DECIMAL.fullmatch(text):
        number = float(text)
        if number.is_integer() and abs(number) <= LARGEST_LABEL:
            return str(int(number))
    return text


def class_indices(path: Path, values, key) -> np.ndarray:
    """Labels stored as numbers (a CIFAR pickle's, a probability file's) as int64 class indices: whole numbers >= 0
    (a float 3.0 is 3; 2.5, -1 or NaN is refused, naming the file, the array and the image)."""
    try:
        labels = np.asarray(values)
    except (ValueError, TypeError):
        labels = np.asarray([None])
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.isfinite(labels).all()):
        raise KitError(f"{path}: {key!r} must be a list of class indices; got {labels.dtype} {labels.shape}")
    whole = labels == np.round(labels) if labels.dtype.kind == "f" else np.ones(len(labels), bool)
    bad = ~whole | (labels < 0) | (labels > LARGEST_LABEL)
    if bad.any():
        raise KitError(f"{path}: {key!r}: label {labels[bad][0]} (image {int(np.argmax(bad))}) is not a class index")
    return labels.astype(np.int64)


LARGEST_FLOAT_ID = 2**53  # a float id beyond this is no longer one whole number


def clean_ids(path: Path, ids, key: str = "ids") -> np.ndarray:
    """Ids as the competition wrote them, checked where they enter: integers (whole-number floats such as 1.0 become
    the integer 1, never `1.0` in a submission), or text (bytes decoded as UTF-8, so b'img_0' is `img_0`, the name the
    files use); lists, NaN, 1.5, booleans and bytes that are not UTF-8 are refused, naming the file and the image."""
    try:
        array = np.asarray(ids)
    except (ValueError, TypeError):
        array = np.asarray([None], dtype=object)[:0].reshape(0, 0)
    if array.ndim != 1:
        raise KitError(f"{path}: {key} must be one id per image (numbers or text); got shape {array.shape}")
    if array.dtype.kind in "iu":
        return array
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array)) & (np.abs(array) <= LARGEST_FLOAT_ID)
        if not whole.all():
            i = int(np.argmin(whole))
            raise KitError(f"{path}: {key}: id {array[i]} (image {i}) is not a whole number; ids are whole numbers or text")
        return array.astype(np.int64)
    if array.dtype.kind not in "SUO":
        raise KitError(f"{path}: {key} has dtype {array.dtype}; ids are whole numbers or text")
    return np.array([_id_text(path, key, i, value) for i, value in enumerate(array)], dtype=object)


def _id_text(path: Path, key: str, i: int, value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise KitError(f"{path}: {key}: id {bytes(value)!r} (image {i}) is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer() and abs(value) <= LARGEST_FLOAT_ID:
        return str(int(value))
    raise KitError(f"{path}: {key}: id {value!r} (image {i}) is a {type(value).__name__}; ids are whole numbers or text")


def class_names(path: Path | str, values, count: int | None = None, key: str = "classes") -> list[str]:
    """Class names as they enter (a probability file's, an .npz's, a checkpoint's): one list of distinct, non-empty
    names (`count` of them when given); bytes are decoded as UTF-8. Two columns under one name would blend or
    submit as one class, so a repeated name is refused."""
    try:
        items = list(np.asarray(values, dtype=object).reshape(-1)) if not isinstance(values, (list, tuple)) else list(values)
    except (ValueError, TypeError):
        items = [None]
    names = []
    for i, value in enumerate(items):
        if isinstance(value, (bytes, np.bytes_)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                value = None
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            value = str(int(value))
        if not isinstance(value, str) or not value.strip():
            raise KitError(f"{path}: {key}: entry {i} ({value!r}) is not a class name")
        names.append(str(value))
    if count is not None and len(names) != count:
        raise KitError(f"{path}: {len(names)} class names in {key}, but {count} classes (probability columns, model outputs)")
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise KitError(f"{path}: {key}: the class {twice!r} is named twice; each class needs its own name")
    return names


def csv_row(index: int) -> int:
    """The line number of a data row in its CSV file (the header is line 1)."""
    return index + 2


def read_csv(path: Path) -> pd.DataFrame:
    """Every cell as text, with one-line errors for a missing or unreadable file."""
    if not path.is_file():
        raise KitError(f"{path}: not found")
    try:
        with warnings.catch_warnings():  # a row longer than the header: pandas would take its first cells as an index
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning:
        raise KitError(f"{path}: not a readable CSV (a row has more fields than the header)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise KitError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None


def ids_from_text(texts: list[str]) -> np.ndarray:
    """Ids kept as written (a file named `007.png` has the id `007` in the submission); matching goes through
    kit.inference.submission.id_key, where `7` and `007` are one id."""
    return np.array(texts, dtype=object)


def row_ids(n: int) -> np.ndarray:
    """The ids of a file that has none: the row numbers counted from 1 (Digit Recognizer's ImageId)."""
    return np.arange(1, n + 1, dtype=np.int64)


def table_ids(table: pd.DataFrame, id_column: str) -> np.ndarray:
    """A CSV's id column, or its row numbers from 1 when it has none."""
    return ids_from_text(table[id_column].str.strip().tolist()) if id_column in table.columns else row_ids(len(table))


def id_order(ids: np.ndarray) -> np.ndarray:
    """The order of ids as numbers when every one is an integer, else as text."""
    texts = [str(i) for i in ids]
    if all(map(is_integer, texts)):
        return np.argsort([int(t) for t in texts], kind="stable")
    return np.argsort(texts, kind="stable")


def label_indices(labels: list, classes: list[str] | None, path: Path, rows: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class indices for labels given as names or indices; `classes` None: learned from these labels (every label
    an integer: indices 0..max; else the sorted names). `rows[i]` says where label i is, for the error."""
    texts = [label_text(v) for v in labels]
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise KitError(f"{path}: {rows[empty[0]]}: the label is empty ({len(empty)} empty label{'s' if len(empty) > 1 else ''})")
    if classes is None:
        numbers = [i for i, text in enumerate(texts) if DECIMAL.fullmatch(text)]
        if texts and len(numbers) == len(texts) and not all(map(is_integer, texts)):
            bad = next(i for i in numbers if not is_integer(texts[i]))
            raise KitError(f"{path}: {rows[bad]}: label {texts[bad]!r} is not a whole number: labels are class indices or names")
        if texts and all(map(is_integer, texts)):
            values = np.array([int(t) for t in texts], dtype=np.int64)
            if values.max() > LARGEST_LABEL:
                bad = int(np.argmax(values))
                raise KitError(f"{path}: {rows[bad]}: label {texts[bad]!r} is too large for a class index")
            if values.min() < 0:
                bad = int(np.argmin(values))
                raise KitError(f"{path}: {rows[bad]}: label {texts[bad]!r} is negative")
            return values, [str(i) for i in range(int(values.max()) + 1)]
        classes = sorted(set(texts))
    classes = class_names(path, classes, key="the class list")
    index = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text in index:
            out[i] = index[text]
        elif is_integer(text) and 0 <= int(text) < len(classes):
            out[i] = int(text)
        else:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise KitError(f"{path}: {rows[i]}: label {text!r} is not a class ({shown})")
    return out, list(classes)


def list_images(folder: Path) -> dict[str, Path]:
    """{file stem: path} of the image files directly in `folder` (other files are ignored)."""
    if not folder.is_dir():
        raise KitError(f"{folder}: image folder not found")
    found: dict[str, Path] = {}
    keys: dict[str, Path] = {}  # by id_key: `1.png` and `001.png` would be one id in a submission
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith(".") and not entry.is_file():
            what = "a link to nothing" if entry.is_symlink() and not path.exists() else "not a file"
            raise KitError(f"{path}: an image entry that cannot be read ({what}); every image of the folder is read, "
                           f"so fix or remove it")
        if entry.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith("."):
            if id_key(path.stem) in keys:
                raise KitError(f"{path}: a second image for id {path.stem!r} (also {keys[id_key(path.stem)].name}): "
                               f"ids that read as one number name one image")
            found[path.stem] = keys[id_key(path.stem)] = path
    return found


def eight_bits(image, mode: str, where: str) -> np.ndarray:
    """An image's pixels as uint8 in `mode` (L or RGB). 16-bit grayscale (PNG, TIFF) is scaled to 8 bits (65535 is
    255), never clipped (a plain convert would make every value above 255 white); 32-bit integer and float pixels
    have no one range to scale from, so they are refused."""
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # rounded
        return gray if mode == "L" else np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("I", "F") or image.mode.startswith(("I;32", "F;")):
        kind = "float" if image.mode.startswith("F") else "32-bit integer"
        raise KitError(f"{where}: {kind} pixels (mode {image.mode}) have no 0..255 scale; save it with 8 or 16 bits per channel")
    return np.asarray(image.convert(mode), dtype=np.uint8)


def decode_images(paths: list[Path], size: int, channels: int, where: list[str] | None = None) -> torch.Tensor:
    """(N, channels, size, size) uint8, decoded in threads; grayscale and colour files are converted to `channels`.
    An image that is missing, unreadable or of another size fails with its path (and `where[i]`, e.g. a CSV row)."""
    from PIL import Image, UnidentifiedImageError
    mode = "L" if channels == 1 else "RGB"

    def one(i: int) -> np.ndarray:
        path = paths[i]
        at = f" ({where[i]})" if where else ""
        try:
            with Image.open(path) as image:
                width, height = image.size
                if (width, height) != (size, size):
                    raise KitError(f"{path}{at}: {width}x{height} pixels, but every image must be {size}x{size} (data.image_size)")
                pixels = eight_bits(image, mode, f"{path}{at}")
        except FileNotFoundError:
            raise KitError(f"{path}{at}: image not found") from None
        except Image.DecompressionBombError as err:
            raise KitError(f"{path}{at}: refused: {str(err).strip()}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise KitError(f"{path}{at}: not a readable image ({type(err).__name__})") from None
        return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)

    if not paths:
        return torch.zeros((0, channels, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(min(DECODE_THREADS, len(paths))) as pool:
        return torch.from_numpy(np.stack(list(pool.map(one, range(len(paths))))))


def to_chw(path: Path, data: np.ndarray, size: int, channels: int, key: str) -> tuple[np.ndarray, str]:
    """Images stored (N, S, S, C), (N, C, S, S), (N, S, S) for one channel, or (N, C*S*S) rows, as (N, C, S, S),
    and how they were stored."""
    if data.dtype != np.uint8:
        raise KitError(f"{path}: {key} has dtype {data.dtype}; expected uint8 pixels 0..255")
    s, c = size, channels
    if data.ndim == 4 and data.shape[1:] == (s, s, c):
        return data.transpose(0, 3, 1, 2), f"(N, {s}, {s}, {c}) HWC"
    if data.ndim == 4 and data.shape[1:] == (c, s, s):
        return data, f"(N, {c}, {s}, {s}) CHW"
    if data.ndim == 3 and c == 1 and data.shape[1:] == (s, s):
        return data[:, None], f"(N, {s}, {s})"
    if data.ndim == 2 and data.shape[1] == c * s * s:
        return data.reshape(-1, c, s, s), f"(N, {c * s * s}) channel-major rows"
    raise KitError(f"{path}: {key} has shape {data.shape}; expected (N, {s}, {s}, {c}), (N, {c}, {s}, {s}) or (N, {c * s * s}) "
                   f"for {s}x{s} images with {c} channel{'s' if c > 1 else ''} (data.image_size, data.channels)")


class Read:
    """Images as read, before their labels become indices: ids, raw labels (None: unlabelled), for each image where
    it came from (a CSV row, a file) for error messages, and the class names when the file lists them (.npz)."""

    def __init__(self, path: Path, images: torch.Tensor, ids: np.ndarray, labels: list | None, where: list[str], layout: str,
                 classes: list[str] | None = None):
        if not len(images):
            raise KitError(f"{path}: holds no images")
        self.path, self.images, self.ids, self.labels, self.where, self.layout = path, images, ids, labels, where, layout
        self.classes = classes


def read_class_folders(folder: Path, size: int, channels: int) -> Read:
    """folder/<class>/<image>: the class is the sub-folder's name."""
    if not folder.is_dir():
        raise KitError(f"{folder}: folder not found; expected one sub-folder of images per class")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise KitError(f"{folder}: no class sub-folders; expected <class>/<image> files (like torchvision's ImageFolder)")
    paths, labels, empty = [], [], []
    for class_dir in class_dirs:
        images = list_images(class_dir)
        paths += images.values()
        labels += [class_dir.name] * len(images)
        empty += [class_dir.name] if not images else []
    if not paths:
        raise KitError(f"{folder}: the class sub-folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:  # a class that no image teaches: dropped, the submission's classes would shift; kept, never learned
        raise KitError(f"{folder / empty[0]}: a class folder with no images ({len(empty)} such: {', '.join(empty[:5])}); "
                       f"add its images or remove the folder")
    where = [str(p) for p in paths]
    ids = np.array([f"{p.parent.name}/{p.stem}" for p in paths], dtype=object)
    return Read(folder, decode_images(paths, size, channels), ids, labels, where, "a folder per class")


def read_flat_folder(folder: Path, size: int, channels: int) -> Read:
    """An unlabelled folder of images; the ids are the file names without extension, in numeric order when
    every one is an integer."""
    images = list_images(folder)
    if not images:
        raise KitError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    ids = ids_from_text(list(images))
    ids = ids[id_order(ids)]
    paths = [images[stem] for stem in ids]
    return Read(folder, decode_images(paths, size, channels), ids, None, [str(p) for p in paths], "a folder of images")


def read_csv_and_images(csv_path: Path, folder: Path, spec: DataSpec) -> Read:
    """A CSV of ids and labels and a folder of images named <id>.<extension>: every id has an image, every
    image an id."""
    table = read_csv(csv_path)
    for column in (spec.id_column, spec.label_column):
        if column not in table.columns:
            raise KitError(f"{csv_path}: no column {column!r} (columns: {', '.join(table.columns)}); "
                           f"set data.id_column / data.label_column")
    images = list_images(folder)
    ids = table[spec.id_column].str.strip().tolist()
    seen: set[str] = set()
    for i, image_id in enumerate(ids):
        if image_id in seen:
            raise KitError(f"{csv_path}: row {csv_row(i)}: id {image_id!r} appears twice")
        seen.add(image_id)
        if image_id not in images:
            raise KitError(f"{csv_path}: row {csv_row(i)}: id {image_id!r} has no image in {folder}")
    extra = [stem for stem in images if stem not in seen]
    if extra:
        raise KitError(f"{images[extra[0]]}: no row of {csv_path} has its id {extra[0]!r}")
    where = [f"{csv_path.name} row {csv_row(i)}" for i in range(len(ids))]
    decoded = decode_images([images[i] for i in ids], spec.image_size, spec.channels, where)
    labels = table[spec.label_column].str.strip().tolist()
    return Read(csv_path, decoded, ids_from_text(ids), labels, [f"row {csv_row(i)}" for i in range(len(ids))],
                "a CSV of ids and an image folder")


def read_pixels(path: Path, spec: DataSpec, labelled: bool = True) -> Read:
    """A CSV with one column per pixel value (row-major (H, W, C)), a label column, and an optional id column
    (without one, the ids are the row numbers counted from 1, like Digit Recognizer's ImageId)."""
    table = read_csv(path)
    if labelled and spec.label_column not in table.columns:
        raise KitError(f"{path}: no column {spec.label_column!r} (data.label_column) among {len(table.columns)} columns")
    named = [c for c in (spec.id_column, spec.label_column) if c in table.columns]
    pixel_columns = [c for c in table.columns if c not in named]
    s, c = spec.image_size, spec.channels
    if len(pixel_columns) != c * s * s:
        raise KitError(f"{path}: {len(pixel_columns)} pixel columns, but {s}x{s} images with {c} channel{'s' if c > 1 else ''} "
                       f"have {c * s * s} (data.image_size, data.channels)")
    text = table[pixel_columns].to_numpy(dtype=str)
    lengths = np.char.str_len(text)
    numeric = np.char.isdecimal(text) & (lengths >= 1) & (lengths <= 3)
    try:
        values = text.astype(np.int64) if numeric.all() else None
    except ValueError:  # a decimal digit numpy does not parse (Unicode digits other than 0-9)
        numeric = np.vectorize(lambda cell: re.fullmatch(r"[0-9]{1,3}", cell) is not None, otypes=[bool])(text)
        values = None
    if values is None:
        row, col = np.argwhere(~numeric)[0]
        raise KitError(f"{path}: row {csv_row(row)}: column {pixel_columns[col]!r} is {str(text[row, col])!r}, not a pixel value 0..255")
    if values.max(initial=0) > 255:
        row, col = np.argwhere(values > 255)[0]
        raise KitError(f"{path}: row {csv_row(row)}: column {pixel_columns[col]!r} is {values[row, col]}, not a pixel value 0..255")
    images = values.astype(np.uint8).reshape(-1, s, s, c).transpose(0, 3, 1, 2)
    ids = table_ids(table, spec.id_column)
    labels = table[spec.label_column].str.strip().tolist() if labelled else None
    return Read(path, torch.from_numpy(np.ascontiguousarray(images)), ids, labels,
                [f"row {csv_row(i)}" for i in range(len(table))], "a CSV of pixel columns")


def read_npz(path: Path, spec: DataSpec, role: str, labelled: bool = True) -> Read:
    """Arrays `images`, `labels`, optional `ids` (else row numbers from 1) and `classes`; or the same with the
    role as prefix (`train_images`, `test_labels`), as MedMNIST's files hold every split."""
    found = read_arrays(path, npz_names(role, "images", "ids", "labels") | {"classes"})
    images_key = npz_key(found, path, role, "images", True)
    images, _ = to_chw(path, found[images_key], spec.image_size, spec.channels, images_key)
    n = len(images)
    if not n:
        raise KitError(f"{path}: holds no images ({images_key} has shape {found[images_key].shape})")
    ids_key, labels_key = npz_key(found, path, role, "ids", False), npz_key(found, path, role, "labels", labelled)
    for name, key in (("ids", ids_key), ("labels", labels_key)):
        if key and (found[key].ndim == 0 or len(found[key]) != n):
            raise KitError(f"{path}: {n} images but {len(found[key]) if found[key].ndim else 0} {name}")
    if ids_key and found[ids_key].size != n:
        raise KitError(f"{path}: {ids_key} has shape {found[ids_key].shape}; expected one id per image")
    ids = clean_ids(path, found[ids_key].reshape(-1), ids_key) if ids_key else row_ids(n)
    labels = found[labels_key].reshape(n, -1) if labels_key else None
    if labels is not None and labels.shape[1] != 1:
        raise KitError(f"{path}: {labels_key} has shape {found[labels_key].shape}; expected one label per image")
    if labels is not None and labels.dtype.kind not in "iubfUS":
        raise KitError(f"{path}: {labels_key} has dtype {labels.dtype}; expected class indices or names")
    if labels is not None and labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise KitError(f"{path}: {labels_key}: image {int(np.argmin(np.isfinite(labels[:, 0])))} has the label "
                       f"{labels[~np.isfinite(labels)][0]}, not a class index")
    where = [f"image {i}" for i in range(n)]
    if "classes" in found and found["classes"].ndim != 1:
        raise KitError(f"{path}: classes has shape {found['classes'].shape}; expected one name per class")
    classes = class_names(path, found["classes"]) if "classes" in found else None
    return Read(path, torch.from_numpy(np.ascontiguousarray(images)), ids,
                None if labels is None else labels[:, 0].tolist(), where, "numpy arrays (.npz)", classes)


def npz_key(found: dict[str, np.ndarray], path: Path, role: str, name: str, required: bool) -> str | None:
    """The array `name`, or `<role>_name` (MedMNIST's `train_images`); None (or an error when required) without it."""
    for candidate in (name, f"{role}_{name}"):
        if candidate in found:
            return candidate
    if required:
        raise KitError(f"{path}: no array {name!r} or {role}_{name!r} (arrays: {', '.join(found.names)})")
    return None


class Arrays(dict):
    """The arrays read from an .npz, by name; `names` lists every array the file holds (read or not)."""
    names: list[str]


def npz_names(role: str, *names: str) -> set[str]:
    """The array names a reader of `role` looks for: each name and `<role>_name` (MedMNIST's)."""
    return {n for name in names for n in (name, f"{role}_{name}")}


def read_arrays(path: Path, wanted: set[str]) -> Arrays:
    """The `wanted` arrays of a .npz (no pickled objects; other members are never read), each one's declared shape
    and dtype checked against the size its archive entry states before anything is allocated. One-line errors for a
    missing or corrupt file."""
    if not path.is_file():
        raise KitError(f"{path}: not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise KitError(f"{path}: a single .npy array, not an .npz archive of named arrays")
            found = Arrays()
            found.names = list(npz.files)
            for key in (k for k in npz.files if k in wanted):
                _check_declared_size(path, npz.zip, key)
                found[key] = npz[key]
            return found
    except KitError:
        raise
    except Exception as err:  # numpy and zipfile raise many types for a corrupt archive
        raise KitError(f"{path}: not a readable .npz ({type(err).__name__})") from None


def _check_declared_size(path: Path, archive, key: str) -> None:
    """An array's header (shape, dtype) must describe exactly the bytes its archive entry holds: a header that
    declares more would make numpy allocate it before finding out."""
    info = archive.getinfo(f"{key}.npy")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        header = member.tell()
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared + header != info.file_size:
        raise KitError(f"{path}: array {key!r} declares {shape} {dtype} ({declared:,} bytes) but its entry holds "
                       f"{info.file_size - header:,} bytes: refused before reading it")


def read_split(spec: DataSpec, root: Path, role: str) -> Read:
    """The labelled training (`role` train) or test set of a recipe's non-CIFAR format."""
    path = root / (spec.train if role == "train" else spec.test)
    if spec.format == "folder":
        return read_class_folders(path, spec.image_size, spec.channels)
    if spec.format == "csv":
        return read_csv_and_images(path, root / (spec.train_images if role == "train" else spec.test_images), spec)
    if spec.format == "pixels":
        return read_pixels(path, spec)
    return read_npz(path, spec, role)


def read_unlabelled(path: Path, spec: DataSpec) -> Read:
    """An unlabelled test set at the recipe's image size and channels: a folder of images, a pixels CSV (a label
    column, if any, is ignored), or a .npz. (The CIFAR-style pickle is read by kit.data.datasets.)"""
    if path.is_dir():
        return read_flat_folder(path, spec.image_size, spec.channels)
    if path.suffix.lower() == ".csv":
        return read_pixels(path, spec, labelled=False)
    return read_npz(path, spec, "test", labelled=False)


def unlabelled_ids(path: Path, id_column: str = "id") -> np.ndarray:
    """Only the ids of an unlabelled folder, pixels CSV or .npz, by the rules the readers above use, without decoding
    a single image (so at any image size)."""
    if path.is_dir():
        return ids_from_text(list(list_images(path)))
    if path.suffix.lower() == ".csv":
        return table_ids(read_csv(path), id_column)
    found = read_arrays(path, npz_names("test", "images", "ids"))
    images_key, ids_key = npz_key(found, path, "test", "images", True), npz_key(found, path, "test", "ids", False)
    if found[images_key].ndim == 0:
        raise KitError(f"{path}: {images_key} is one number, not images")
    return clean_ids(path, found[ids_key].reshape(-1), ids_key) if ids_key else row_ids(len(found[images_key]))
