"""`kit data demo --format F DIR`: the digits demo in the layout a real competition ships, with its sample
submission, the answers for scoring (`test_labels.csv`) and a ready recipe (`recipe.yaml`):

- cifar: CIFAR-10's python pickles and the course competition's unlabelled pickle (32x32 RGB);
- folder: Tiny ImageNet's layout, one folder per class, at 64x64 RGB; `val/` labelled, `test/` flat;
- csv: Kaggle's CIFAR-10 ("Object Recognition in Images"): `train/<id>.png`, `trainLabels.csv` with class
  names, `test/<id>.png`, `sampleSubmission.csv` (`id,label` with names);
- pixels: Kaggle's Digit Recognizer: `train.csv` (`label,pixel0..pixel783`, 28x28 grayscale), `test.csv`,
  `sample_submission.csv` (`ImageId,Label` with ids from 1);
- npz: MedMNIST's single file of every split (`train_images`, `test_labels`, ...) and an unlabelled
  `unlabelled.npz`; its sample submission asks for one probability column per class (log-loss scoring)."""

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kit.data.datasets import _digits_rgb, demo_split, make_demo_data
from kit.io import atomic_path, write_text
from kit.recipe import RECIPES_DIR

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_RECIPE = RECIPES_DIR / "demo.yaml"


def make_demo_format(out_dir: str | Path, fmt: str = "cifar", seed: int = 0) -> Path:
    """Write the digits demo in layout `fmt` under out_dir, with `recipe.yaml` (the demo recipe reading it)."""
    out = Path(out_dir)
    if fmt == "cifar":
        make_demo_data(out, seed)
        data = {}
    else:
        data = {"folder": _folder, "csv": _csv, "pixels": _pixels, "npz": _npz}[fmt](out, seed)
    recipe = yaml.safe_load(DEMO_RECIPE.read_text()) if DEMO_RECIPE.is_file() else {}
    recipe["name"] = f"demo-{fmt}"
    recipe["data"] = {"format": fmt, "root": str(out.resolve()), **data}
    if fmt == "folder":  # 64x64: ImageNet's 7x7 stride-2 stem and max-pool bring it to 16x16, as Tiny ImageNet models do
        recipe["model"] = {**recipe.get("model", {}), "args": {"stem": "imagenet"}}
    write_text(out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    return out


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    Image.fromarray(pixels).save(path)


def _answers(out: Path, ids, labels, id_column: str, label_column: str) -> None:
    write_text(out / "test_labels.csv", pd.DataFrame({id_column: ids, label_column: labels}).to_csv(index=False))


def _folder(out: Path, seed: int) -> dict:
    images, labels = _digits_rgb(seed, 64, 3)
    test, hidden, train = demo_split(seed)
    for part, split in ((train, "train"), (test, "val")):
        for i in part:
            _save_png(out / split / DIGIT_NAMES[labels[i]] / f"{i}.png", images[i])
    for i in hidden:
        _save_png(out / "test" / f"{i}.png", images[i])
    ids = np.sort(hidden)
    _answers(out, ids, [DIGIT_NAMES[k] for k in labels[ids]], "id", "label")
    write_text(out / "sample_submission.csv", pd.DataFrame({"id": ids, "label": DIGIT_NAMES[0]}).to_csv(index=False))
    return {"train": "train", "test": "val", "image_size": 64, "validation": "test"}


def _csv(out: Path, seed: int) -> dict:
    images, labels = _digits_rgb(seed, 32, 3)
    test, hidden, train = demo_split(seed)
    train = np.concatenate([test, train])  # no labelled test set: Kaggle's CIFAR-10 gives only trainLabels.csv
    ids = {i: n + 1 for n, i in enumerate(np.sort(train))}  # ids 1..N, like Kaggle's
    for i in train:
        _save_png(out / "train" / f"{ids[i]}.png", images[i])
    table = pd.DataFrame({"id": [ids[i] for i in sorted(ids)], "label": [DIGIT_NAMES[labels[i]] for i in sorted(ids)]})
    write_text(out / "trainLabels.csv", table.to_csv(index=False))
    test_ids = np.arange(1, len(hidden) + 1)
    for image_id, i in zip(test_ids, hidden):
        _save_png(out / "test" / f"{image_id}.png", images[i])
    _answers(out, test_ids, [DIGIT_NAMES[k] for k in labels[hidden]], "id", "label")
    write_text(out / "sampleSubmission.csv", pd.DataFrame({"id": test_ids, "label": DIGIT_NAMES[0]}).to_csv(index=False))
    return {"train": "trainLabels.csv", "train_images": "train", "validation": "split"}


def _pixel_table(images: np.ndarray) -> pd.DataFrame:
    flat = images.transpose(0, 2, 3, 1).reshape(len(images), -1)  # row-major (H, W, C)
    return pd.DataFrame(flat, columns=[f"pixel{i}" for i in range(flat.shape[1])])


def _pixels(out: Path, seed: int) -> dict:
    images, labels = _digits_rgb(seed, 28, 1)
    test, hidden, train = demo_split(seed)
    train = np.sort(np.concatenate([test, train]))  # Digit Recognizer has train.csv and an unlabelled test.csv only
    table = pd.concat([pd.DataFrame({"label": labels[train]}), _pixel_table(images[train])], axis=1)
    write_text(out / "train.csv", table.to_csv(index=False))
    write_text(out / "test.csv", _pixel_table(images[hidden]).to_csv(index=False))
    image_ids = np.arange(1, len(hidden) + 1)
    _answers(out, image_ids, labels[hidden], "ImageId", "Label")
    write_text(out / "sample_submission.csv", pd.DataFrame({"ImageId": image_ids, "Label": 0}).to_csv(index=False))
    return {"train": "train.csv", "image_size": 28, "channels": 1, "validation": "split"}


def _npz(out: Path, seed: int) -> dict:
    images, labels = _digits_rgb(seed, 32, 3)
    test, hidden, train = demo_split(seed)
    hwc = images.transpose(0, 2, 3, 1)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "digits.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, train_images=hwc[train], train_labels=labels[train][:, None], test_images=hwc[test],
                            test_labels=labels[test][:, None], classes=np.array(DIGIT_NAMES))
    ids = np.arange(len(hidden)) + 1000  # ids of their own, not row numbers
    with atomic_path(out / "unlabelled.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=hwc[hidden], ids=ids)
    _answers(out, ids, labels[hidden], "id", "label")
    sample = pd.DataFrame({"id": ids, **{name: 0.1 for name in DIGIT_NAMES}})
    write_text(out / "sample_submission.csv", sample.to_csv(index=False))
    return {"train": "digits.npz", "test": "digits.npz", "validation": "test"}
