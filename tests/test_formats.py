"""Any small-image competition: the demo in every layout (folder 64x64, Kaggle CSV, Digit Recognizer pixels 28x28x1,
MedMNIST-style .npz) loads the same digits, trains, predicts into the competition's own submission format and blends
from saved probabilities; models and augmentation at 28x28x1 and 64x64x3; validation none."""

import collections
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kit.data.datasets import _digits_rgb, demo_split, load_dataset, read_test_set
from kit.data.demo import DIGIT_NAMES, make_demo_format
from kit.inference import interpret as interpret_module
from kit.recipe import load_recipe

FORMATS = {  # format: (unlabelled test set, sample submission, (channels, size), answers' columns)
    "folder": ("test", "sample_submission.csv", (3, 64), ("id", "label")),
    "csv": ("test", "sampleSubmission.csv", (3, 32), ("id", "label")),
    "pixels": ("test.csv", "sample_submission.csv", (1, 28), ("ImageId", "Label")),
    "npz": ("unlabelled.npz", "sample_submission.csv", (3, 32), ("id", "label")),
}
FAST = ("train.epochs=1", "model.args.width=0.125", "train.batch_size=32")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = make_demo_format(tmp_path_factory.mktemp(f"demo-{fmt}"), fmt)
        return made[fmt]
    return get


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_holds_the_same_digits(fmt, demo_dir):
    """Each layout decodes into the same labelled digits (the class counts by name) at its own size and channels,
    and its unlabelled set has the answers' ids."""
    out = demo_dir(fmt)
    recipe = load_recipe(out / "recipe.yaml")
    data = load_dataset(recipe.data)
    channels, size = FORMATS[fmt][2]
    assert data.train.images.shape[1:] == (channels, size, size) and data.train.images.dtype == torch.uint8
    assert len(data.mean) == channels
    _, labels = _digits_rgb(0)
    test, hidden, train = demo_split()
    labelled = train if recipe.data.validation == "test" else np.concatenate([test, train])
    names = [data.classes[k] for k in torch.cat([data.train.labels, data.held_out.labels if recipe.data.validation == "split"
                                                  else data.train.labels[:0]])]
    as_names = (lambda k: DIGIT_NAMES[k]) if data.classes[0] in DIGIT_NAMES else str
    assert collections.Counter(names) == collections.Counter(as_names(k) for k in labels[labelled])
    unlabelled = read_test_set(out / FORMATS[fmt][0], recipe.data)
    answers = pd.read_csv(out / "test_labels.csv")
    assert unlabelled.images.shape == (len(hidden), channels, size, size)
    assert sorted(map(str, unlabelled.ids)) == sorted(map(str, answers[FORMATS[fmt][3][0]]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_predict_and_blend_on_every_format(fmt, demo_dir, tmp_path, trained_run, run, monkeypatch):
    """kit data demo, train, predict into the sample submission's format, check it, and blend the saved probabilities:
    one member blended equals its own prediction."""
    data = demo_dir(fmt)
    test, template = data / FORMATS[fmt][0], data / FORMATS[fmt][1]
    args = [a for o in FAST for a in ("--set", o)]
    code, out = run("train", data / "recipe.yaml", *args, "--runs", tmp_path / "runs", "--device", "cpu")
    assert code == 0, out
    run_dir = next((tmp_path / "runs").iterdir())
    code, out = run("predict", run_dir, "--test", test, "--template", template, "--out", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0, out
    written, sample = pd.read_csv(tmp_path / "s.csv", dtype=str), pd.read_csv(template, dtype=str)
    assert list(written.columns) == list(sample.columns) and written.iloc[:, 0].tolist() == sample.iloc[:, 0].tolist()
    code, out = run("check-submission", tmp_path / "s.csv", "--test", test, "--template", template)
    assert code == 0 and out.startswith("ok:"), out
    code, out = run("evaluate", run_dir, "--probs-out", tmp_path / "val.npz", "--device", "cpu")
    assert code == 0, out
    code, out = run("blend", "--labelled", tmp_path / "val.npz", "--unlabelled", tmp_path / "s.probs.npz",
                    "--template", template, "--out", tmp_path / "b.csv")
    assert code == 0, out
    assert pd.read_csv(tmp_path / "b.csv", dtype=str).equals(written)
    grids = []
    monkeypatch.setattr(interpret_module, "plot_image_grid", lambda images, *a, **k: grids.append(images))
    code, out = run("report", run_dir, "--report-dir", tmp_path / "report", "--mistakes", 4, "--device", "cpu")
    assert code == 0, out
    channels, size = FORMATS[fmt][2]
    assert grids and all(image.shape == (channels, size, size) and image.dtype == np.uint8
                         for grid in grids for image in grid if image is not None)  # the images as read, in every format
    code, out = run("lr-find", data / "recipe.yaml", *args, "--updates", 12, "--out", tmp_path / "lr.png", "--device", "cpu")
    assert code == 0 and "use: --set optim.lr=" in out and (tmp_path / "lr.png").is_file(), out
    if fmt == "pixels":  # a 28x28x1 model and a 32x32x3 one do not ensemble
        code, out = run("predict", run_dir, trained_run, "--test", test, "--device", "cpu")
        assert code == 2 and "takes 32x32 images with 3 channel(s)" in out and "cannot be ensembled" in out, out


def test_data_demo_writes_each_layout_with_its_recipe(tmp_path, run):
    code, out = run("data", "demo", tmp_path / "d", "--format", "npz")
    assert code == 0 and f"kit train {tmp_path / 'd' / 'recipe.yaml'}" in out, out
    recipe = load_recipe(tmp_path / "d" / "recipe.yaml")
    assert recipe.name == "demo-npz" and recipe.data.format == "npz" and recipe.data.root == str(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["digits.npz", "recipe.yaml", "sample_submission.csv",
                                                                  "test_labels.csv", "unlabelled.npz"]


def test_models_and_augmentation_at_28x28x1_and_64x64x3(demo_dir):
    """The stem takes the recipe's channels, a fixed pool sizes itself by image_size, whitening works on one channel,
    and every augmentation op keeps the shape and stays finite at both sizes."""
    from kit.data.augment import BatchAugment
    from kit.models import build_model
    from kit.models.resnet import init_whitening, whiten_stem
    for fmt, (channels, size) in (("pixels", (1, 28)), ("folder", (3, 64))):
        recipe = load_recipe(demo_dir(fmt) / "recipe.yaml", ("model.name=resnet", "model.args.stem=whiten", "model.args.pool=fixed",
                                                            "model.args.channels=[8,16]", "model.args.blocks=[1,1]",
                                                            "model.num_classes=10"))  # built without its data
        model = build_model(recipe)
        images = torch.randint(0, 256, (8, channels, size, size), dtype=torch.uint8)
        init_whitening(whiten_stem(model), images.float() / 255)
        assert model(images.float() / 255).shape == (8, 10)
        for policy in ("trivialaugment", "randaugment", "augmix"):
            spec = load_recipe(demo_dir(fmt) / "recipe.yaml", (f"augment.policy={policy}", "augment.color_jitter=0.4",
                                                              "augment.rotation_degrees=20", "augment.sharpness_factor=2",
                                                              "augment.sharpness_prob=0.5", "augment.erasing_prob=0.5",
                                                              "augment.cutout_size=6")).augment
            augment = BatchAugment(spec, torch.full((channels,), 0.5), torch.full((channels,), 0.25), 10, image_size=size)
            x, _ = augment(images, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
            assert x.shape == images.shape and torch.isfinite(x).all()


def test_a_grayscale_recipe_is_capture_safe(demo_dir, quiet):
    """The one-channel update (colour ops on gray, whitening on 1 channel) has no capture hazard."""
    from kit.training.engine import EAGER_UPDATES_BEFORE_CAPTURE, build_trainer
    from kit.training.hazards import find_hazards
    recipe = load_recipe(demo_dir("pixels") / "recipe.yaml", FAST + ("augment.policy=randaugment", "augment.color_jitter=0.3",
                                                                     "model.name=resnet", "model.args.stem=whiten",
                                                                     "model.args.channels=[8,16]", "model.args.blocks=[1,1]"))
    trainer = build_trainer(recipe, load_dataset(recipe.data), torch.device("cpu"), echo=quiet)
    trainer.forward_loss.train()
    for _ in range(EAGER_UPDATES_BEFORE_CAPTURE):
        trainer.update()
    hazards = find_hazards(trainer.update)
    assert not hazards, "\n".join(map(str, hazards))


def test_validation_none_trains_on_every_image_and_keeps_the_last_epoch(demo_dir, tmp_path, run):
    lines = []
    from kit.training.run import train
    recipe = load_recipe(demo_dir("npz") / "recipe.yaml", ("train.epochs=2", "model.args.width=0.125", "data.validation=none"))
    run_dir = train(recipe, out_root=tmp_path, device="cpu", echo=lines.append)
    assert "1,197 training / 0 validation images" in lines[0] and "best.pt is the last epoch" in lines[1]
    best = torch.load(run_dir / "best.pt", weights_only=False)
    assert best["epoch"] == 2 and best["weights_from"] == "ema"
    code, out = run("evaluate", run_dir, "--device", "cpu")
    assert code == 2 and "no validation images" in out
    code, out = run("evaluate", run_dir, "--held-out", "test", "--device", "cpu")
    assert code == 0, out
    code, out = run("sweep", demo_dir("npz") / "recipe.yaml", "--set", "data.validation=none", "--grid", "optim.lr=1e-3,2e-3",
                    "--sweeps", tmp_path / "sweeps")
    assert code == 2 and "leaves nothing to compare trials on" in out, out


def _tiny_csv_set(root: Path, n: int = 6) -> Path:
    """n 8x8 PNGs in root/train and root/labels.csv (names a, b): a csv-format data root, and its recipe."""
    from PIL import Image
    (root / "train").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "train" / f"{i}.png")
    (root / "labels.csv").write_text("id,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(n)))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {{name: resnet_tiny, num_classes: 2}}\ndata: {{format: csv, root: {root}, train: labels.csv, "
                      f"train_images: train, image_size: 8, validation: none}}\ntrain: {{epochs: 1, batch_size: 2}}\n")
    return recipe


def _break(root: Path, defect: str) -> None:
    from PIL import Image
    if defect == "missing image":
        (root / "train" / "2.png").unlink()
    elif defect == "unreadable image":
        (root / "train" / "2.png").write_bytes(b"not a png")
    elif defect == "mixed sizes":
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "2.png")
    elif defect == "image without id":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "99.png")
    elif defect == "duplicate id":
        (root / "labels.csv").write_text((root / "labels.csv").read_text() + "2,a\n")
    elif defect == "label not a class":
        recipe = root / "recipe.yaml"
        recipe.write_text(recipe.read_text().replace("validation: none", "validation: none, classes: [a, c]"))


@pytest.mark.parametrize("defect, fragments", [
    ("missing image", ("labels.csv: row 4: id '2' has no image in",)),
    ("unreadable image", ("2.png (labels.csv row 4): not a readable image",)),
    ("mixed sizes", ("2.png (labels.csv row 4): 8x9 pixels, but every image must be 8x8",)),
    ("image without id", ("99.png: no row of", "has its id '99'")),
    ("duplicate id", ("labels.csv: row 8: id '2' appears twice",)),
    ("label not a class", ("labels.csv: row 3: label 'b' is not a class (a, c)",)),
])
def test_bad_data_is_one_line_naming_the_file_and_row_and_writes_nothing(tmp_path, defect, fragments, assert_one_line_error, run):
    recipe = _tiny_csv_set(tmp_path / "data")
    code, out = run("train", recipe, "--runs", tmp_path / "runs", "--device", "cpu")
    assert code == 0, out  # the intact set trains
    _break(tmp_path / "data", defect)
    code, out = run("train", recipe, "--runs", tmp_path / "runs2", "--device", "cpu")
    assert_one_line_error(code, out, *fragments)
    assert not (tmp_path / "runs2").exists()


@pytest.mark.parametrize("table, fragment", [
    ("label,pixel0,pixel1\n1,0,0\n", "2 pixel columns, but 8x8 images with 1 channel have 64"),
    ("label," + ",".join(f"pixel{i}" for i in range(64)) + "\n1," + ",".join(["0"] * 63) + ",x\n",
     "row 2: column 'pixel63' is 'x', not a pixel value 0..255"),
    ("label," + ",".join(f"pixel{i}" for i in range(64)) + "\n1," + ",".join(["0"] * 63) + ",256\n",
     "row 2: column 'pixel63' is 256, not a pixel value 0..255"),
    ("id," + ",".join(f"pixel{i}" for i in range(64)) + "\n1," + ",".join(["0"] * 64) + "\n", "no column 'label'"),
])
def test_bad_pixel_csvs(tmp_path, table, fragment):
    from kit.data.formats import read_pixels
    from kit.errors import KitError
    from kit.recipe import DataSpec
    (tmp_path / "p.csv").write_text(table)
    with pytest.raises(KitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_pixels(tmp_path / "p.csv", DataSpec(format="pixels", train="p.csv", image_size=8, channels=1))


def test_bad_npz_and_folders(tmp_path):
    from kit.data.formats import read_class_folders, read_npz
    from kit.errors import KitError
    from kit.recipe import DataSpec
    spec = DataSpec(format="npz", train="a.npz", image_size=8)
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 9, 9, 3), np.uint8), labels=np.zeros(4))
    with pytest.raises(KitError, match=r"a.npz: images has shape \(4, 9, 9, 3\); expected \(N, 8, 8, 3\)"):
        read_npz(tmp_path / "a.npz", spec, "train")
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(3))
    with pytest.raises(KitError, match="a.npz: 4 images but 3 labels"):
        read_npz(tmp_path / "a.npz", spec, "train")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(KitError, match="the class sub-folders hold no images"):
        read_class_folders(tmp_path / "empty", 8, 3)


def test_text_that_only_looks_like_an_integer_is_a_name_not_a_crash(tmp_path):
    """One integer rule (kit.data.formats.is_integer) for ids, labels and templates: `--7` or `²` pass str.isdigit() after
    stripping but not int(); they are names, and a bad one is a one-line error."""
    from kit.data.formats import id_order, label_indices
    from kit.errors import KitError
    from kit.inference.submission import format_from_template, id_key
    assert [id_key(t) for t in ("007", "-3", "--7", "²")] == ["7", "-3", "--7", "²"]
    assert id_order(np.array(["10", "9"], dtype=object)).tolist() == [1, 0]  # numbers
    assert id_order(np.array(["--7", "10", "9"], dtype=object)).tolist() == [0, 1, 2]  # text
    labels, classes = label_indices(["--1", "2", "2"], None, Path("t.csv"), ["row 2", "row 3", "row 4"])
    assert classes == ["--1", "2"] and labels.tolist() == [0, 1, 1]
    assert label_indices(["1", "zero"], ["zero", "one"], Path("t.csv"), ["row 2", "row 3"])[0].tolist() == [1, 0]
    for bad in ("²", "-1", "2"):
        with pytest.raises(KitError, match=f"t.csv: row 3: label '{bad}' is not a class"):
            label_indices(["one", bad], ["zero", "one"], Path("t.csv"), ["row 2", "row 3"])
    (tmp_path / "sample.csv").write_text("id,label\n--7,cat\n5,dog\n")
    assert format_from_template(tmp_path / "sample.csv").order == ("--7", "5")


@pytest.mark.parametrize("fmt", [*FORMATS, "cifar"])
def test_the_labelled_images_carry_the_datas_own_ids_through_every_split(fmt, demo_dir, demo_data):
    """Issue 38, part 5: ids live on the data (`Labelled.ids`), as the format names them, each image once, and a split
    keeps them (validation ids are training-set ids, disjoint from the kept ones, each still naming its image)."""
    import dataclasses

    from kit.data.formats import read_split
    path, root = ("recipes/demo.yaml", demo_data) if fmt == "cifar" else (demo_dir(fmt) / "recipe.yaml", None)
    recipe = load_recipe(path, ("data.validation=split", "data.val_fraction=0.25"))
    whole = load_dataset(dataclasses.replace(recipe.data, validation="none"), root).train
    data = load_dataset(recipe.data, root)
    assert len(whole.ids) == len(whole) and len(set(map(str, whole.ids))) == len(whole)
    kept, held = set(map(str, data.train.ids)), set(map(str, data.held_out.ids))
    assert not kept & held and kept | held == set(map(str, whole.ids))
    position = {str(i): n for n, i in enumerate(whole.ids)}
    for part in (data.train, data.held_out):
        rows = torch.tensor([position[str(i)] for i in part.ids])
        assert torch.equal(whole.images[rows], part.images) and torch.equal(whole.labels[rows], part.labels)
    if fmt == "cifar":
        assert str(whole.ids[0]) == "data_batch_1/0"
    else:
        assert list(map(str, whole.ids)) == list(map(str, read_split(recipe.data, Path(recipe.data.root), "train").ids))
