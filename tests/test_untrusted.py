"""Files from outside are untrusted: no pickle runs code, a number is checked where it enters (a label, a weight, a
probability), a model's head is its data's classes, and every bad file is one line naming it, exit 2, nothing written."""

import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.data.formats import label_indices, read_npz, read_pixels
from kit.errors import KitError
from kit.recipe import DataSpec


class _RunsACommand:
    """What a hostile pickle holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _hostile(path: Path, marker: Path, key: bytes = b"data") -> Path:
    path.write_bytes(pickle.dumps({key: _RunsACommand(marker), b"ids": [1, 2]}, protocol=2))
    return path


# No pickle runs code.

def test_a_pickle_that_would_run_code_is_refused_everywhere_it_is_read(trained_run, demo_data, tmp_path, assert_one_line_error,
                                                                       run):
    marker = tmp_path / "ran"
    evil = _hostile(tmp_path / "test.pkl", marker)
    code, out = run("predict", trained_run, "--test", evil, "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_one_line_error(code, out, f"{evil}: refused to unpickle posix.system: a pickle may run code")
    assert not (tmp_path / "s.csv").exists()
    (tmp_path / "sub.csv").write_text("ID,Labels\n1,0\n2,0\n")
    code, out = run("check-submission", tmp_path / "sub.csv", "--test", evil)
    assert_one_line_error(code, out, "test.pkl: refused to unpickle posix.system")
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    _hostile(root / "cifar-10-batches-py" / "data_batch_3", marker)
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--data-root", root,
                    "--runs", tmp_path / "runs", "--device", "cpu")
    assert_one_line_error(code, out, "data_batch_3: refused to unpickle posix.system")
    assert not (tmp_path / "runs").exists() and not marker.exists()


def test_the_unpickler_reads_every_protocol_and_python2_batches_and_refuses_the_rest(tmp_path):
    from kit.data.datasets import read_pickle
    data = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 12), b"labels": [3, 4], b"batch_label": b"x", "f": 0.5,
            "s": {1, 2}, "n": np.float32(2.5), "o": np.array([b"a", None], dtype=object)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "p").write_bytes(pickle.dumps(data, protocol=protocol))
        got = read_pickle(tmp_path / "p", "a batch")
        assert np.array_equal(got[b"data"], data[b"data"]) and got[b"labels"] == [3, 4] and got[b"batch_label"] == b"x"
        assert got["n"] == np.float32(2.5) and got["s"] == {1, 2} and got["o"].tolist() == [b"a", None]
    # CIFAR's own batches: Python 2 strings (SHORT_BINSTRING, read as bytes) and numpy 1's module name
    (tmp_path / "py2").write_bytes(pickle.dumps({"data": np.zeros(3, np.uint8)}, protocol=2)
                                   .replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                                   .replace(b"X\x04\x00\x00\x00data", b"U\x04data"))
    assert list(read_pickle(tmp_path / "py2", "a batch")) == [b"data"]
    refused = {"builtins.eval": b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",
               "numpy.load": b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.",
               "_codecs.encode with the codec 'rot13'": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."}
    for name, raw in refused.items():
        (tmp_path / "bad").write_bytes(raw)
        with pytest.raises(KitError, match=f"bad: refused to unpickle {name}: "):
            read_pickle(tmp_path / "bad", "a batch")


# The model's head is the data's classes.

def _npz_set(root: Path, labels, classes=None, n_per_class: int = 6) -> Path:
    """A tiny .npz training set of 8x8 images and its recipe (resnet_tiny, no validation)."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.asarray(labels), n_per_class)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    arrays = {"images": images, "labels": labels, **({"classes": np.array(classes)} if classes else {})}
    np.savez(root / "train.npz", **arrays)
    np.savez(root / "test.npz", images=images[:5], ids=np.arange(5))
    (root / "recipe.yaml").write_text(f"model: {{name: resnet_tiny}}\ndata: {{format: npz, root: {root}, train: train.npz, "
                                      f"image_size: 8, validation: none}}\ntrain: {{epochs: 1, batch_size: 4}}\n")
    return root / "recipe.yaml"


def test_the_head_is_the_datas_classes_and_another_number_is_one_line(tmp_path, assert_one_line_error, run):
    recipe = _npz_set(tmp_path / "data", [0, 1, 2], classes=["ant", "bee", "cow"])
    code, out = run("train", recipe, "--runs", tmp_path / "wrong", "--device", "cpu", "--set", "model.num_classes=10")
    assert_one_line_error(code, out, "model.num_classes is 10 but the data has 3 classes")
    assert not (tmp_path / "wrong").exists()
    code, out = run("train", recipe, "--runs", tmp_path / "runs", "--device", "cpu")
    assert code == 0, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "num_classes: 3" in (run_dir / "recipe.yaml").read_text()
    template = tmp_path / "sample.csv"
    template.write_text("id,ant,bee,cow\n" + "".join(f"{i},0.3,0.3,0.4\n" for i in range(5)))
    for args in (("--labels", "index"), ("--template", template)):
        code, out = run("predict", run_dir, "--test", tmp_path / "data" / "test.npz", "--out", tmp_path / "s.csv",
                        "--device", "cpu", *args)
        assert code == 0, out
        sub = pd.read_csv(tmp_path / "s.csv")
        assert sub.Labels.between(0, 2).all() if "Labels" in sub else np.allclose(sub[["ant", "bee", "cow"]].sum(axis=1), 1, atol=1e-5)


def test_a_checkpoint_whose_head_and_classes_disagree_is_refused(trained_run, demo_data, tmp_path, assert_one_line_error, run):
    """What kit 0.4 wrote for data of fewer classes than the recipe's 10: a 10-way head naming 3 classes."""
    payload = torch.load(trained_run / "best.pt", weights_only=True)
    payload["classes"] = ["a", "b", "c"]
    torch.save(payload, tmp_path / "old.pt")
    code, out = run("predict", tmp_path / "old.pt", "--test", demo_data / "cifar_test_nolabel.pkl", "--out", tmp_path / "s.csv",
                    "--device", "cpu")
    assert_one_line_error(code, out, "old.pt: its model has 10 outputs but it names 3 classes (a, b, c)")
    assert not (tmp_path / "s.csv").exists()


# Numbers are checked where they enter.

@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "1,-1", "0,0"])
def test_blend_weights_must_be_finite_and_non_negative(weights, trained_run, demo_data, tmp_path, assert_one_line_error, run):
    code, out = run("predict", trained_run, trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", f"--blend={weights}",
                    "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_one_line_error(code, out, f"--blend {weights}: need 2 non-negative weights (finite numbers)")
    assert not (tmp_path / "s.csv").exists()


def _probs(path: Path, probs, labels=None, ids=None, **extra) -> Path:
    probs = np.asarray(probs, np.float32)
    arrays = {"probs": probs, "ids": np.arange(len(probs)) if ids is None else ids, **extra}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(path, **arrays)
    return path


GOOD = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.7 + 0.1


@pytest.mark.parametrize("labelled, fragment", [
    (dict(probs=np.log(GOOD)), "these look like log-probabilities"),
    (dict(probs=GOOD * 5 - 2), "values from -1.5 to 2 are not probabilities in [0, 1] (logits? save their softmax)"),
    (dict(probs=GOOD / 2), "row 0: the class probabilities sum to 0.5000, not 1"),
    (dict(probs=np.where(GOOD > 0.5, np.nan, GOOD)), "row 0 holds nan, not a probability"),
    (dict(labels=[0, 1, 2, 0, 1, 7]), "label 7 (row 5) is outside its 3 classes 0..2"),
    (dict(labels=[0, 1, 2, 0, 1, 2.5]), "'labels': label 2.5 (image 5) is not a class index"),
    (dict(labels=[0, 0, 1, 1, 2, 1]), "the class '2' has one labelled image, too few to split"),
])
def test_probability_files_are_checked_where_they_enter(labelled, fragment, tmp_path, assert_one_line_error, run):
    arrays = {"probs": GOOD, "labels": [0, 1, 2, 0, 1, 2], **labelled}
    args = ["--labelled", _probs(tmp_path / "val.npz", arrays["probs"], arrays["labels"]),
            "--unlabelled", _probs(tmp_path / "test.npz", GOOD[:4]), "--out", tmp_path / "sub.csv"]
    code, out = run("blend", *args)
    assert_one_line_error(code, out, "val.npz", fragment)
    assert not (tmp_path / "sub.csv").exists()


def test_a_names_template_needs_the_class_names(tmp_path, assert_one_line_error, run):
    template = tmp_path / "sample.csv"
    template.write_text("id,label\n0,cat\n1,cat\n2,cat\n3,cat\n")
    args = ["--labelled", _probs(tmp_path / "val.npz", GOOD, [0, 1, 2, 0, 1, 2]), "--unlabelled", _probs(tmp_path / "t.npz", GOOD[:4]),
            "--out", tmp_path / "sub.csv", "--template", template, "--select-on", "1"]
    code, out = run("blend", *args)
    assert_one_line_error(code, out, "val.npz: the probability files carry no class names", "--classes")
    assert not (tmp_path / "sub.csv").exists()
    code, out = run("blend", *args, "--classes", "ant,bee,cow")
    assert code == 0, out
    assert pd.read_csv(tmp_path / "sub.csv").label.tolist() == ["ant", "bee", "cow", "ant"]


def test_float_labels_that_are_whole_are_indices_and_others_are_refused(tmp_path):
    rows = [f"row {i + 2}" for i in range(12)]
    floats = [f"{k}.0" for k in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)]
    labels, classes = label_indices(floats, None, Path("t.csv"), rows)
    assert classes == [str(k) for k in range(12)] and labels.tolist() == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(KitError, match=r"^t.csv: row 3: label '2.5' is not a whole number"):
        label_indices(["1.0", "2.5"], None, Path("t.csv"), rows)
    spec = DataSpec(format="npz", train="a.npz", image_size=8)
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([2.0, 0.0, 10.0]))
    read = read_npz(tmp_path / "a.npz", spec, "train")
    assert label_indices(read.labels, None, read.path, read.where)[0].tolist() == [2, 0, 10]
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([2.0, np.nan, 1.0]))
    with pytest.raises(KitError, match="a.npz: labels: image 1 has the label nan, not a class index"):
        read_npz(tmp_path / "a.npz", spec, "train")


def test_ids_that_read_as_one_id_are_refused_naming_both(tmp_path):
    from PIL import Image

    from kit.data.datasets import read_test_set
    (tmp_path / "test").mkdir()
    for name in ("1.png", "001.png", "2.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "test" / name)
    with pytest.raises(KitError, match=r"test/1.png: a second image for id '1' \(also 001.png\)"):
        read_test_set(tmp_path / "test")
    (tmp_path / "p.csv").write_text("id," + ",".join(f"p{i}" for i in range(64)) + "\n" +
                                    "".join(f"{i}," + ",".join(["0"] * 64) + "\n" for i in ("7", "2", "007")))
    with pytest.raises(KitError, match=r"p.csv: the ids have duplicates \(7 and 007 name one image id\)"):
        read_test_set(tmp_path / "p.csv", DataSpec(format="pixels", train="p.csv", image_size=8, channels=1))


def test_empty_label_cells_and_empty_class_folders_are_refused(tmp_path):
    from PIL import Image

    from kit.data.formats import read_class_folders
    with pytest.raises(KitError, match=r"^t.csv: row 3: the label is empty \(1 empty label\)$"):
        label_indices(["cat", " ", "dog"], None, Path("t.csv"), ["row 2", "row 3", "row 4"])
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "a.png")
    with pytest.raises(KitError, match=r"train/dog: a class folder with no images \(1 such: dog\)"):
        read_class_folders(tmp_path / "train", 8, 3)


def test_check_submission_checks_names_against_the_classes_or_says_it_could_not(trained_run, tmp_path, assert_one_line_error,
                                                                                run):
    template = tmp_path / "sample.csv"
    template.write_text("id,label\n1,cat\n2,cat\n")
    (tmp_path / "sub.csv").write_text("id,label\n1,3\n2,banana\n")
    code, out = run("check-submission", tmp_path / "sub.csv", "--template", template)
    assert code == 0 and "note: the class names were not checked against the classes" in out, out
    code, out = run("check-submission", tmp_path / "sub.csv", "--template", template, "--checkpoint", trained_run)
    assert_one_line_error(code, out, "sub.csv: row 3: label 'banana' is not a class")
    code, out = run("check-submission", tmp_path / "sub.csv", "--template", template, "--classes", "3,banana")
    assert code == 0 and "note" not in out, out


# What raised a traceback is one line.

def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (a decompression bomb: Pillow refuses it at open)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_inputs_that_raised_a_traceback_are_one_line(trained_run, tmp_path, assert_one_line_error, run):
    (tmp_path / "test").mkdir()
    _png_header(tmp_path / "test" / "1.png", 20000, 20000)
    code, out = run("predict", trained_run, "--test", tmp_path / "test", "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_one_line_error(code, out, "1.png: refused: Image size (400000000 pixels) exceeds limit")
    (tmp_path / "r.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, out = run("train", tmp_path / "r.yaml", "--device", "cpu")
    assert_one_line_error(code, out, "r.yaml: not a UTF-8 text file (byte 9)")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("cell", ["²", "1" + "0" * 23, "", "12.5"])
def test_a_pixel_cell_that_is_not_0_to_255_is_named(cell, tmp_path):
    (tmp_path / "p.csv").write_text("label," + ",".join(f"p{i}" for i in range(4)) + "\n1,0,0,0," + cell + "\n")
    with pytest.raises(KitError, match=f"p.csv: row 2: column 'p3' is '{cell}', not a pixel value 0..255"):
        read_pixels(tmp_path / "p.csv", DataSpec(format="pixels", train="p.csv", image_size=2, channels=1))


def test_a_set_of_no_images_is_one_line(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0))
    with pytest.raises(KitError, match="a.npz: holds no images"):
        read_npz(tmp_path / "a.npz", DataSpec(format="npz", train="a.npz", image_size=8), "train")
    (tmp_path / "p.csv").write_text("label,p0,p1,p2,p3\n")
    with pytest.raises(KitError, match="p.csv: holds no images"):
        read_pixels(tmp_path / "p.csv", DataSpec(format="pixels", train="p.csv", image_size=2, channels=1))
