"""Making data folders: the embedded digits demo (offline) and torchvision's CIFAR download (online)."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from kit.data import CIFAR10_DIR
from kit.errors import KitError
from kit.io import atomic_path, write_text

DEMO_TEST, DEMO_UNLABELLED = 300, 300  # images held out of scikit-learn's 1,797 digits


def _digits_rgb(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (N, 3, 32, 32) uint8: scaled 3x, padded to 32, tinted per image."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    gray = np.kron(digits.images / 16.0, np.ones((3, 3)))  # (N, 24, 24) in [0, 1]
    gray = np.pad(gray, ((0, 0), (4, 4), (4, 4)))
    # random foreground/background colours make it a colour task, like CIFAR
    fg = rng.uniform(0.5, 1.0, (len(gray), 3, 1, 1))
    bg = rng.uniform(0.0, 0.4, (len(gray), 3, 1, 1))
    rgb = bg + (fg - bg) * gray[:, None]
    return (rgb * 255).round().astype(np.uint8), digits.target.astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_demo_data(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the digits demo in the CIFAR-10 layout, plus the competition-format unlabelled test
    pickle (`cifar_test_nolabel.pkl`) and its answers (`test_labels.csv`) for the demo's own scoring."""
    out = Path(out_dir)
    images, labels = _digits_rgb(seed)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, hidden, train = np.split(order, [DEMO_TEST, DEMO_TEST + DEMO_UNLABELLED])
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
