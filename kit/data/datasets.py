"""A recipe's labelled images in any format (the CIFAR python layouts here, the others in kit.data.formats), the
unlabelled test set, and validation splits.

Images are kept as uint8 tensors (N, C, S, S): they go to the device once and are normalized there.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kit.data import safe_pickle
from kit.data.formats import class_indices, clean_ids
from kit.errors import KitError
from kit.io import atomic_path, write_text
from kit.recipe import DataSpec

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
DEMO_TEST, DEMO_UNLABELLED = 300, 300  # images held out of scikit-learn's 1,797 digits
LAYOUT_HINT = "run `kit data demo DIR` for demo data, `kit data download cifar10 DIR` on a machine with internet, or point --data-root at the folder holding it"


@dataclass(frozen=True)
class Labelled:
    """Images with their labels and ids (a training set, a validation set, a test set). The ids are the data's own
    (a CIFAR batch's file names, else `<batch>/<index>`; a folder's `<class>/<stem>`; a CSV's or an .npz's id, else its
    row number from 1): they travel with the images through every split, so an id is never re-derived from a row."""
    images: torch.Tensor  # (N, C, S, S) uint8
    labels: torch.Tensor  # (N,) int64: the class trained on (for a soft target, its most likely class)
    ids: np.ndarray  # (N,) on the host
    soft: torch.Tensor | None = None  # (N, K) float32 class probabilities to train on (pseudo-labels), else None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Labelled":
        return Labelled(self.images.to(device), self.labels.to(device), self.ids,
                        None if self.soft is None else self.soft.to(device))

    def subset(self, index) -> "Labelled":
        """The images at `index` (a host tensor, array or slice), with their labels, ids and soft targets."""
        rows = index.numpy() if isinstance(index, torch.Tensor) else index
        return Labelled(self.images[index], self.labels[index], self.ids[rows], None if self.soft is None else self.soft[index])


@dataclass(frozen=True)
class Dataset:
    train: Labelled
    held_out: Labelled  # what load_dataset was asked to score on: the recipe's validation images (none: empty), or the test set
    classes: list[str]
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    split: str = ""  # validation: fold: which folds (split_key), so probabilities can say which models saw which images


def read_pickle(path: Path, what: str) -> dict:
    """Unpickle a CIFAR-style file without running its code (kit.data.safe_pickle), with one-line errors for a missing,
    corrupt or refused file."""
    if not path.is_file():
        raise KitError(f"{path}: missing; expected {what}")
    try:
        obj = safe_pickle.load(path)
    except KitError:
        raise
    except Exception as err:  # pickle raises many types on corrupt input
        raise KitError(f"{path}: not a readable pickle ({type(err).__name__}); expected {what}") from None
    if not isinstance(obj, dict):
        raise KitError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return obj


def as_array(path: Path, obj: dict, key: bytes) -> np.ndarray:
    """A pickle's entry as a numpy array (a ragged list is an error naming the file and the entry)."""
    try:
        return np.asarray(obj[key])
    except (ValueError, TypeError) as err:
        raise KitError(f"{path}: {key!r} is not an array ({str(err).splitlines()[0][:80]})") from None


def _batch(path: Path, label_key: bytes, what: str) -> Labelled:
    obj = read_pickle(path, what)
    for key in (b"data", label_key):
        if key not in obj:
            raise KitError(f"{path}: no {key!r} entry; expected {what}")
    data = as_array(path, obj, b"data")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise KitError(f"{path}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072) channel-major rows")
    labels = class_indices(path, obj[label_key], label_key)
    if len(labels) != len(data) or not len(data):
        raise KitError(f"{path}: {len(data)} images but {len(labels)} labels")
    return Labelled(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels), _batch_ids(path, obj, len(data)))


def _batch_ids(path: Path, obj: dict, n: int) -> np.ndarray:
    """A CIFAR batch's ids: its b'filenames' (CIFAR-10's own, e.g. `leptodactylus_pentadactylus_s_000004.png`) when it
    has one distinct name per image, else `<batch file>/<index>`."""
    if b"filenames" in obj:
        names = clean_ids(path, obj[b"filenames"], "b'filenames'")
        if len(names) == n and len(set(map(str, names))) == n:
            return names
    return np.array([f"{path.name}/{i}" for i in range(n)], dtype=object)


def concat(splits: list[Labelled], num_classes: int | None = None) -> Labelled:
    """One set of several; where any has soft targets, every image gets them (a hard label as its one-hot row)."""
    soft = None
    if any(s.soft is not None for s in splits):
        soft = torch.cat([s.soft if s.soft is not None else torch.nn.functional.one_hot(s.labels, num_classes).float()
                          for s in splits])
    return Labelled(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]),
                    np.concatenate([s.ids for s in splits]), soft)


def read_cifar10(root: Path) -> tuple[Labelled, Labelled, list[str]]:
    """(train, test_batch, class names) from root/cifar-10-batches-py."""
    base = root / CIFAR10_DIR
    what = f"the CIFAR-10 python layout ({CIFAR10_DIR}/data_batch_1..5, test_batch, batches.meta); {LAYOUT_HINT}"
    train = concat([_batch(base / f"data_batch_{i}", b"labels", what) for i in range(1, 6)])
    test = _batch(base / "test_batch", b"labels", what)
    meta = read_pickle(base / "batches.meta", what)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(b"label_names", [])]
    return train, test, classes


def read_cifar100(root: Path) -> tuple[Labelled, Labelled, list[str]]:
    """(train, test, fine class names) from root/cifar-100-python."""
    base = root / CIFAR100_DIR
    what = f"the CIFAR-100 python layout ({CIFAR100_DIR}/train, test, meta); {LAYOUT_HINT.replace('cifar10', 'cifar100')}"
    train = _batch(base / "train", b"fine_labels", what)
    test = _batch(base / "test", b"fine_labels", what)
    meta = read_pickle(base / "meta", what)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(b"fine_label_names", [])]
    return train, test, classes


def stratified_split(split: Labelled, fraction: float, seed: int) -> tuple[Labelled, Labelled]:
    """Hold out `fraction` of each class (scikit-learn's stratified split) as validation."""
    from sklearn.model_selection import train_test_split
    index = np.arange(len(split))
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=split.labels.numpy())
    return split.subset(torch.from_numpy(np.sort(keep))), split.subset(torch.from_numpy(np.sort(held)))


def folds_of(labelled: Labelled, folds: int, seed: int, where: str | Path) -> np.ndarray:
    """(N,) the fold of each image: scikit-learn's StratifiedKFold (shuffled, seeded), each fold about 1/k of every
    class. Too few images, or a class with fewer than k, is one line (scikit-learn only warns for the second)."""
    from sklearn.model_selection import StratifiedKFold
    counts = np.bincount(labelled.labels.numpy())
    if len(labelled) < folds:
        raise KitError(f"{where}: {len(labelled)} training images are too few for {folds} folds")
    if (counts[counts > 0] < folds).any():
        lonely = int(np.flatnonzero((counts > 0) & (counts < folds))[0])
        raise KitError(f"{where}: class {lonely} has {counts[lonely]} training image(s), fewer than the {folds} folds "
                       f"(each fold must hold every class): use fewer folds")
    out = np.empty(len(labelled), dtype=np.int64)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(split.split(np.zeros(len(labelled)), labelled.labels.numpy())):
        out[held] = fold
    return out


def fold_split(labelled: Labelled, folds: int, fold: int, seed: int, where: str | Path) -> tuple[Labelled, Labelled]:
    """(the other folds, fold `fold`): the training and validation images of one fold's run."""
    of = folds_of(labelled, folds, seed, where)
    keep, held = (torch.from_numpy(np.flatnonzero(where)) for where in (of != fold, of == fold))
    return labelled.subset(keep), labelled.subset(held)


def split_key(labelled: Labelled, folds: int, seed: int) -> str:
    """Names one assignment of images to folds: k, the seed and a digest of the training ids and labels (the same
    three give the same folds). Probability files carry it, so pseudo-labels can refuse a model that saw a fold."""
    import hashlib
    digest = hashlib.sha256("\n".join(f"{i}\t{c}" for i, c in zip(map(str, labelled.ids), labelled.labels.tolist())).encode())
    return f"{folds} folds, split_seed {seed}, training set {digest.hexdigest()[:12]}"


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    x = images.double().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def load_dataset(spec: DataSpec, root: str | Path | None = None, held_out: str = "val") -> Dataset:
    """The training set and the held-out images to score on: `val` (the recipe's validation: none gives an empty
    set) or `test` (the labelled test set)."""
    root = Path(root or spec.root)
    if not root.is_dir():
        raise KitError(f"{root}: data root not found; {LAYOUT_HINT}")
    train, test, classes = read_cifar(spec, root) if spec.format == "cifar" else read_other(spec, root)
    split = ""
    if spec.validation == "split":
        train, val = stratified_split(train, spec.val_fraction, spec.split_seed)
    elif spec.validation == "fold":
        split = split_key(train, spec.folds, spec.split_seed)
        train, val = fold_split(train, spec.folds, spec.fold, spec.split_seed, root)
    elif spec.validation == "none":
        val = train.subset(slice(0, 0))
    else:
        val = test
    if held_out == "test" and test is None:
        raise KitError(f"{root}: no labelled test set to score on (data.test is empty); use --held-out val")
    scored = test if held_out == "test" else val
    mean, std = channel_stats(train.images)
    return Dataset(train, scored, classes, mean, std, split)


def load_held_out(spec: DataSpec, root: str | Path | None, held_out: str, source: str) -> Labelled:
    """The labelled images a checkpoint is scored on (predict/evaluate/report); a run without validation has none."""
    scored = load_dataset(spec, root, held_out).held_out
    if not len(scored):
        raise KitError(f"{source}: no validation images to score (data.validation: none); use --held-out test "
                       f"(the labelled test set{'' if spec.format == 'cifar' or spec.test else ', data.test'})")
    return scored


def read_cifar(spec: DataSpec, root: Path) -> tuple[Labelled, Labelled, list[str]]:
    if (spec.image_size, spec.channels) != (32, 3):
        raise KitError(f"{root}: format cifar holds 32x32 RGB images, but data.image_size is {spec.image_size} and "
                       f"data.channels {spec.channels}")
    train, test, classes = (read_cifar10 if spec.dataset == "cifar10" else read_cifar100)(root)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    if spec.classes:
        if len(spec.classes) < num_classes:
            raise KitError(f"{root}: the labels reach class index {num_classes - 1} but data.classes names "
                           f"{len(spec.classes)} classes")
        return train, test, list(spec.classes)
    if len(classes) < num_classes:
        classes = [str(i) for i in range(num_classes)]
    return train, test, classes


def read_other(spec: DataSpec, root: Path) -> tuple[Labelled, Labelled | None, list[str]]:
    """Training and labelled test set (None without data.test) of the folder, csv, pixels and npz formats."""
    from kit.data.formats import label_indices, read_split
    read = read_split(spec, root, "train")
    classes = list(spec.classes) or read.classes
    labels, classes = label_indices(read.labels, classes, read.path, read.where)
    train = Labelled(read.images, torch.from_numpy(labels), read.ids)
    test = None
    if spec.test:
        read = read_split(spec, root, "test")
        labels, _ = label_indices(read.labels, classes, read.path, read.where)
        test = Labelled(read.images, torch.from_numpy(labels), read.ids)
    return train, test, classes


@dataclass(frozen=True)
class TestSet:
    ids: np.ndarray
    images: torch.Tensor  # (N, C, S, S) uint8
    layout: str  # how the file stored the images


IMAGES_ACCEPTED = ("a test file (the competition's pickle, a folder of images, a pixels CSV, a .npz) or an image file, "
                   "a list of image paths, a numpy array or torch tensor of uint8 pixels (N, H, W, C), (N, C, H, W) or "
                   "one image's (H, W, C), (C, H, W), or PIL images")


def is_image_file(path: str | Path) -> bool:
    """Whether `path` names one image (by its extension), not a test set."""
    from kit.data.formats import IMAGE_EXTENSIONS
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not Path(path).is_dir()


def images_given_in_memory(images) -> bool:
    """Whether `images` are images from memory (or image files) rather than a test file's path."""
    return is_image_file(images) if isinstance(images, (str, Path)) else True


def images_given(images, spec: DataSpec) -> tuple[TestSet, bool]:
    """Images from a notebook, at the recipe's size and channels: a test file or one image file (its path), a list of
    image paths, a uint8 numpy array or torch tensor (a batch or one image, channels last or first) or PIL images.
    Returns the set (ids: the paths, else 0..N-1) and whether one image was given. Anything else is one KitError
    saying what is accepted."""
    from kit.data.formats import decode_images, eight_bits, to_chw
    size, channels = spec.image_size, spec.channels
    if isinstance(images, (str, Path)) and is_image_file(images):
        image = decode_images([Path(images)], size, channels)
        return TestSet(np.array([str(images)], dtype=object), image, "an image file"), True
    if isinstance(images, (str, Path)):
        return read_test_set(images, spec), False
    if isinstance(images, (list, tuple)) and images and all(isinstance(p, (str, Path)) for p in images):
        paths = [Path(p) for p in images]
        ids = np.array([str(p) for p in images], dtype=object)
        return TestSet(ids, decode_images(paths, size, channels), "image files"), False
    pil = _pil_images(images)
    if pil is not None:
        mode = "L" if channels == 1 else "RGB"
        for i, image in enumerate(pil):
            if image.size != (size, size):
                raise KitError(f"PIL image {i}: {image.size[0]}x{image.size[1]} pixels, but the model takes {size}x{size}")
        arrays = np.stack([eight_bits(image, mode, f"PIL image {i}") for i, image in enumerate(pil)])
        batch = to_chw(Path("the PIL images"), arrays, size, channels, "pixels")[0]
        one = not isinstance(images, (list, tuple))
        return TestSet(np.arange(len(pil)), torch.from_numpy(np.ascontiguousarray(batch)), "PIL images"), one
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise KitError(f"{type(images).__name__}: not images kit reads; give {IMAGES_ACCEPTED}")
    one = images.ndim == 3 or (images.ndim == 2 and channels == 1)
    batch, layout = to_chw(Path("the array"), images[None] if one else images, size, channels, "the array")
    if not len(batch):
        raise KitError("the array holds no image")
    return TestSet(np.arange(len(batch)), torch.from_numpy(np.ascontiguousarray(batch)), layout), one


def _pil_images(images) -> list | None:
    """`images` as a list of PIL images, when it is one or a list of them."""
    try:
        from PIL import Image
    except ImportError:
        return None
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        return list(images)
    return None


def read_test_set(path: str | Path, spec: DataSpec | None = None) -> TestSet:
    """The unlabelled test set at the recipe's image size and channels: the competition's pickle (`.pkl`), a folder of
    images, a pixels CSV or a .npz (kit.data.formats). Ids must be unique."""
    from kit.data.formats import id_key, read_unlabelled
    path, spec = Path(path), spec or DataSpec()
    if is_image_file(path):
        raise KitError(f"{path}: one image, not a test set; predict it with kit.predict(checkpoints, {str(path)!r}) from "
                       f"Python, or put the test images in a folder and give the folder")
    if is_pickle(path):
        test = read_test_pickle(path, spec.image_size, spec.channels)
    else:
        read = read_unlabelled(path, spec)
        test = TestSet(read.ids, read.images, read.layout)
    spellings: dict[str, list[str]] = {}  # by id_key: 7 and 007 are one id in a submission
    for image_id in test.ids:
        spellings.setdefault(id_key(image_id), []).append(str(image_id))
    twice = next((seen for seen in spellings.values() if len(seen) > 1), None)
    if twice is not None:
        same = len(set(twice)) == 1
        raise KitError(f"{path}: the ids have duplicates (e.g. {twice[0]} appears {len(twice)} times)" if same else
                       f"{path}: the ids have duplicates ({twice[0]} and {twice[1]} name one image id)")
    return test


def read_test_ids(path: str | Path) -> np.ndarray:
    """Only the ids of an unlabelled test set in any format (to check a submission without knowing the image size)."""
    from kit.data.formats import unlabelled_ids
    path = Path(path)
    if not is_pickle(path):
        return unlabelled_ids(path)
    obj = read_pickle(path, "the competition test pickle {b'data', b'ids'}")
    if b"ids" not in obj:
        raise KitError(f"{path}: no b'ids' entry")
    return clean_ids(path, obj[b"ids"], "b'ids'")


def is_pickle(path: Path) -> bool:
    """An unlabelled set that is the competition's pickle, not a folder, a pixels CSV or a .npz (kit.data.formats)."""
    return not path.is_dir() and path.suffix.lower() not in (".csv", ".npz")


def read_test_pickle(path: str | Path, size: int = 32, channels: int = 3) -> TestSet:
    """The competition's unlabelled test pickle: {b'data': images, b'ids': (N,)}.

    Accepts (N, S, S, C) HWC, (N, C, S, S) CHW and (N, C*S*S) channel-major rows of uint8.
    """
    from kit.data.formats import to_chw
    path = Path(path)
    what = "the competition test pickle {b'data': (N, 32, 32, 3) uint8, b'ids': (N,)}"
    obj = read_pickle(path, what)
    for key in (b"data", b"ids"):
        if key not in obj:
            raise KitError(f"{path}: no {key!r} entry; expected {what}")
    images, layout = to_chw(path, as_array(path, obj, b"data"), size, channels, "b'data'")
    ids = clean_ids(path, obj[b"ids"], "b'ids'")
    if len(ids) != len(images) or not len(images):
        raise KitError(f"{path}: {len(images)} images but {len(ids)} ids in b'ids'; expected one id per image")
    return TestSet(ids, torch.from_numpy(np.ascontiguousarray(images)), layout)


# Writing data folders: the embedded digits demo (offline) and torchvision's download (online).

def _digits_rgb(seed: int, size: int = 32, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (N, channels, size, size) uint8: scaled up (3x at 28 and 32), padded to `size`,
    tinted per image when in colour."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    scale = max(1, round(size * 0.75 / 8))
    gray = np.kron(digits.images / 16.0, np.ones((scale, scale)))  # (N, 8*scale, 8*scale) in [0, 1]
    before = (size - gray.shape[1]) // 2
    gray = np.pad(gray, ((0, 0), (before, size - gray.shape[1] - before), (before, size - gray.shape[2] - before)))
    # random foreground/background colours make it a colour task, like CIFAR
    fg = rng.uniform(0.5, 1.0, (len(gray), 3, 1, 1))
    bg = rng.uniform(0.0, 0.4, (len(gray), 3, 1, 1))
    rgb = bg + (fg - bg) * gray[:, None]
    if channels == 1:
        rgb = rgb.mean(1, keepdims=True)
    return (rgb * 255).round().astype(np.uint8), digits.target.astype(np.int64)


def demo_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labelled test, unlabelled test, train) indices of the digits, the same in every demo layout."""
    order = np.random.default_rng(seed).permutation(1797)
    return tuple(np.split(order, [DEMO_TEST, DEMO_TEST + DEMO_UNLABELLED]))


def _dump(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_demo_data(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the digits demo in the CIFAR-10 layout, plus the competition-format unlabelled test
    pickle (`cifar_test_nolabel.pkl`) and its answers (`test_labels.csv`) for the demo's own scoring."""
    out = Path(out_dir)
    images, labels = _digits_rgb(seed)
    test, hidden, train = demo_split(seed)
    base = out / CIFAR10_DIR
    for i, part in enumerate(np.array_split(train, 5), start=1):
        _dump(base / f"data_batch_{i}", {b"data": images[part].reshape(len(part), -1), b"labels": labels[part].tolist(),
                                          b"batch_label": f"digits training batch {i} of 5".encode()})
    _dump(base / "test_batch", {b"data": images[test].reshape(len(test), -1), b"labels": labels[test].tolist(),
                                b"batch_label": b"digits test batch"})
    _dump(base / "batches.meta", {b"label_names": [str(d).encode() for d in range(10)], b"num_vis": 3072})
    ids = np.arange(len(hidden), dtype=np.int64)
    _dump(out / "cifar_test_nolabel.pkl", {b"data": images[hidden].transpose(0, 2, 3, 1).copy(), b"ids": ids})
    write_text(out / "test_labels.csv", pd.DataFrame({"ID": ids, "Labels": labels[hidden]}).to_csv(index=False))
    return out


def download_cifar(name: str, out_dir: str | Path) -> Path:
    """torchvision's download of CIFAR-10/100 into out_dir; offline, a message saying where files go."""
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        cls(root=str(out_dir), train=True, download=True)
        cls(root=str(out_dir), train=False, download=True)
    except Exception as err:  # urllib/ssl/socket errors differ by platform
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise KitError(f"{out_dir}: could not download {name} ({type(err).__name__}: {err}); offline, unpack "
                       f"{cls.url} so that {Path(out_dir) / folder}/ exists") from None
    return Path(out_dir)
