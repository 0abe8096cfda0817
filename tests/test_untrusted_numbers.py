"""Untrusted files, second round: no confident wrong submission from bad numbers, classes matched by name, ids and
pixels as the competition wrote them, checkpoints checked field by field, bounded memory for bad files, and outputs
that are only ever regular files (both files of a submission or neither). One test (or more) per kind."""

import os
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.errors import KitError
from kit.recipe import DataSpec


def _payload(trained_run: Path) -> dict:
    return torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)


def _save(payload: dict, path: Path) -> Path:
    torch.save(payload, path)
    return path


def _predict(run, checkpoint, test, out):
    return run("predict", checkpoint, "--test", test, "--out", out, "--device", "cpu")


# 1. Bad numbers that passed.

@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_whose_weights_are_not_finite_is_refused(weights, value, trained_run, demo_data, tmp_path, run,
                                                              assert_one_line_error):
    payload = _payload(trained_run)
    name = next(k for k, t in payload[weights].items() if t.is_floating_point())
    payload[weights][name].view(-1)[0] = value
    bad = _save(payload, tmp_path / "bad.pt")
    out = tmp_path / "s.csv"
    code, output = _predict(run, bad, demo_data / "cifar_test_nolabel.pkl", out)
    assert_one_line_error(code, output, f"its {'raw' if weights == 'model' else 'EMA'} weights hold NaN or inf", name)
    assert not out.exists() and not out.with_suffix(".probs.npz").exists()


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "schedule.min_lr=-.inf", "train.ema_decay=nan",
                                      "optim.betas=[0.9, .nan]", "model.args={width: .nan}"])
def test_every_float_of_a_recipe_rejects_nan_and_inf_in_one_line(override, run, assert_one_line_error):
    code, output = run("params", "recipes/demo.yaml", "--set", override)
    assert_one_line_error(code, output, "is out of range; allowed: a finite number", f"(from --set {override})")


def test_probabilities_are_checked_before_any_file_is_written(trained_run, demo_data, tmp_path, monkeypatch, quiet):
    from kit.inference import checkpoint
    from kit.inference.predict import predict
    real = checkpoint.Checkpoint.probs

    def overflowing(self, *args):
        probs = real(self, *args)
        probs[7] = float("nan")  # what fp16 overflow in a model gives
        return probs
    monkeypatch.setattr(checkpoint.Checkpoint, "probs", overflowing)
    out = tmp_path / "s.csv"
    with pytest.raises(KitError, match=r"the predictions on .*: row 7 holds nan, not a probability \(1 of 300 rows"):
        predict([str(trained_run)], str(demo_data / "cifar_test_nolabel.pkl"), out=str(out), device="cpu", echo=quiet)
    assert not out.exists() and not out.with_suffix(".probs.npz").exists()


def test_a_model_that_predicts_one_class_for_every_image_says_so(trained_run, demo_data, tmp_path, run):
    payload = _payload(trained_run)
    for state in (payload["model"], payload["ema"]):
        head = next(k for k in state if k.endswith("bias") and state[k].shape == (10,))
        state[head][3] = 1e4
    code, output = _predict(run, _save(payload, tmp_path / "dead.pt"), demo_data / "cifar_test_nolabel.pkl",
                            tmp_path / "s.csv")
    assert code == 0, output
    assert "warning: every one of the 300 images is predicted as class '3'" in output
    code, output = _predict(run, trained_run, demo_data / "cifar_test_nolabel.pkl", tmp_path / "t.csv")
    assert code == 0 and "warning" not in output


# 2. Classes matched by name.

def _probs_file(path: Path, probs: np.ndarray, classes: list[str], labels=None, ids=None) -> Path:
    arrays = {"probs": probs.astype(np.float32), "classes": np.array(classes), "ids": np.arange(len(probs)) if ids is None else ids}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return path


def test_blend_matches_the_columns_of_two_files_by_class_name(tmp_path, quiet):
    from kit.inference.blend import blend
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "frog"]
    labels = np.tile(np.arange(3), 8)
    a, b = (rng.dirichlet(np.ones(3), 24) for _ in range(2))
    ta, tb = (rng.dirichlet(np.ones(3), 10) for _ in range(2))
    same = [_probs_file(tmp_path / "a.npz", a, classes, labels), _probs_file(tmp_path / "b.npz", b, classes, labels)]
    test = [_probs_file(tmp_path / "ta.npz", ta, classes), _probs_file(tmp_path / "tb.npz", tb, classes)]
    order = [2, 0, 1]  # b's columns as frog, cat, dog: the same probabilities under their own names
    moved = _probs_file(tmp_path / "b2.npz", b[:, order], [classes[i] for i in order], np.argsort(order)[labels])
    moved_test = _probs_file(tmp_path / "tb2.npz", tb[:, order], [classes[i] for i in order])
    blend([str(p) for p in same], [str(p) for p in test], str(tmp_path / "one.csv"), select_on=1, echo=quiet, fmt=None)
    blend([str(same[0]), str(moved)], [str(test[0]), str(moved_test)], str(tmp_path / "two.csv"), select_on=1, echo=quiet)
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    one, two = np.load(tmp_path / "one.probs.npz"), np.load(tmp_path / "two.probs.npz")
    assert np.allclose(one["probs"], two["probs"]) and one["classes"].tolist() == two["classes"].tolist() == classes
    other = _probs_file(tmp_path / "c.npz", b, ["cat", "dog", "bird"], labels)
    with pytest.raises(KitError, match=r"c\.npz: its classes \(cat, dog, bird\) are not cat, dog, frog \(e\.g\. 'bird'"):
        blend([str(same[0]), str(other)], [str(p) for p in test], str(tmp_path / "x.csv"), echo=quiet)
    assert not (tmp_path / "x.csv").exists()


def test_a_names_template_whose_labels_are_not_the_models_classes_is_refused(trained_run, demo_data, tmp_path, run,
                                                                            assert_one_line_error):
    template = tmp_path / "sample.csv"
    template.write_text("id,label\n" + "".join(f"{i},airplane\n" for i in range(300)))
    code, output = run("predict", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--template", template,
                       "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_one_line_error(code, output, "sample.csv: its label column holds class names the model does not have (e.g. 'airplane'")
    assert not (tmp_path / "s.csv").exists()


def test_duplicate_class_names_are_refused_in_checkpoints_and_probability_files(trained_run, tmp_path, quiet):
    from kit.inference.checkpoint import read_payload
    from kit.inference.probs import read_probs
    payload = _payload(trained_run)
    payload["classes"] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "8"]
    with pytest.raises(KitError, match=r"dup\.pt: classes: the class '8' is named twice"):
        read_payload(_save(payload, tmp_path / "dup.pt"))
    path = _probs_file(tmp_path / "p.npz", np.full((2, 2), 0.5), ["cat", "cat"])
    with pytest.raises(KitError, match=r"p\.npz: classes: the class 'cat' is named twice"):
        read_probs(path, False)


# 3. Ids and images as the competition wrote them.

@pytest.mark.parametrize("ids, written", [
    (np.array([b"img_0", b"img_1"]), ["img_0", "img_1"]),
    ([b"img_0", "img_1"], ["img_0", "img_1"]),
    (np.array([1.0, 2.0]), ["1", "2"]),
    (np.array([7, 8], dtype=np.uint16), ["7", "8"]),
])
def test_ids_are_written_as_the_files_name_them(ids, written, trained_run, tmp_path, quiet):
    from kit.inference.predict import predict
    test = tmp_path / "t.pkl"
    test.write_bytes(pickle.dumps({b"data": np.zeros((2, 32, 32, 3), np.uint8), b"ids": ids}, protocol=2))
    predict([str(trained_run)], str(test), out=str(tmp_path / "s.csv"), device="cpu", echo=quiet)
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == written


@pytest.mark.parametrize("ids, fragment", [
    (np.array([1.5, 2.0]), r"id 1\.5 \(image 0\) is not a whole number"),
    (np.array([np.nan, 2.0]), r"id nan \(image 0\) is not a whole number"),
    ([[1, 2], [3]], r"must be one id per image"),
    ([[1], [2]], r"must be one id per image \(numbers or text\); got shape \(2, 1\)"),
    ([b"\xff\xfe", b"a"], r"id b'\\xff\\xfe' \(image 0\) is not UTF-8 text"),
    (np.array([True, False]), r"has dtype bool"),
    ([{"a": 1}, "b"], r"id \{'a': 1\} \(image 0\) is a dict"),
])
def test_ids_that_are_not_numbers_or_text_are_one_line(ids, fragment, tmp_path):
    from kit.data.datasets import read_test_ids, read_test_set
    test = tmp_path / "t.pkl"
    test.write_bytes(pickle.dumps({b"data": np.zeros((2, 32, 32, 3), np.uint8), b"ids": ids}, protocol=2))
    for read in (read_test_set, read_test_ids):
        with pytest.raises(KitError, match=fragment):
            read(test)


def test_images_with_16_bits_are_scaled_never_clipped_and_float_pixels_refused(tmp_path):
    from PIL import Image

    from kit.data.formats import decode_images
    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0 .. 65520
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    gray = decode_images([tmp_path / "wide.png"], 8, 1)[0, 0].numpy()
    assert np.array_equal(gray, np.round(wide / 257).astype(np.uint8)) and gray.max() == 255 and len(np.unique(gray)) == 64
    rgb = decode_images([tmp_path / "wide.png"], 8, 3)[0].numpy()
    assert all(np.array_equal(channel, gray) for channel in rgb)
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(KitError, match=r"float\.tiff: float pixels \(mode F\) have no 0\.\.255 scale"):
        decode_images([tmp_path / "float.tiff"], 8, 1)


def test_a_test_entry_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    from PIL import Image

    from kit.data.datasets import read_test_ids, read_test_set
    folder = tmp_path / "test"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    os.symlink(tmp_path / "gone.png", folder / "3.png")
    for read in (lambda: read_test_set(folder, DataSpec(image_size=8)), lambda: read_test_ids(folder)):
        with pytest.raises(KitError, match=r"3\.png: an image entry that cannot be read \(a link to nothing\)"):
            read()


# 4. Checkpoints are untrusted too: every field, one line.

@pytest.mark.parametrize("field, value", [("model", None), ("model", {"w": [1.0]}), ("recipe", "resnet"), ("classes", None),
                                          ("classes", 7), ("mean", None), ("std", 3), ("num_params", "many"),
                                          ("num_params", -1), ("ema", [1]), ("best_weights_from", "both"),
                                          ("weights_from", "all")])
def test_a_checkpoint_field_missing_or_of_the_wrong_type_is_one_line(field, value, trained_run, tmp_path, demo_data, run,
                                                                     assert_one_line_error):
    payload = _payload(trained_run)
    payload[field] = value
    code, output = _predict(run, _save(payload, tmp_path / "odd.pt"), demo_data / "cifar_test_nolabel.pkl", tmp_path / "s.csv")
    assert_one_line_error(code, output, "odd.pt: ", repr(field).strip("'"))
    del payload[field]
    if field not in ("ema", "best_weights_from", "weights_from"):  # those three may be absent (checkpoints before 0.3)
        code, output = _predict(run, _save(payload, tmp_path / "less.pt"), demo_data / "cifar_test_nolabel.pkl", tmp_path / "s.csv")
        assert_one_line_error(code, output, "less.pt: ", field)


@pytest.mark.parametrize("key, value, fragment", [("recipe", "{not json", "its metadata 'recipe' is not JSON"),
                                                  ("classes", None, "its metadata has no 'classes'"),
                                                  ("num_params", "[1]", "its field 'num_params' is list"),
                                                  ("weights_from", "both", "its metadata 'weights_from' is 'both'")])
def test_safetensors_metadata_is_checked_field_by_field(key, value, fragment, trained_run, tmp_path, demo_data, run,
                                                        assert_one_line_error):
    from safetensors import safe_open
    from safetensors.torch import save_file
    code, output = run("export", trained_run, "--format", "safetensors", "--out", tmp_path / "w.safetensors")
    assert code == 0, output
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    code, output = _predict(run, tmp_path / "bad.safetensors", demo_data / "cifar_test_nolabel.pkl", tmp_path / "s.csv")
    assert_one_line_error(code, output, "bad.safetensors: ", fragment)


def test_a_checkpoints_model_is_checked_against_its_budget_before_any_allocation(trained_run, tmp_path, monkeypatch):
    """The recipe inside asks for a model of billions of parameters: refused while it exists only on the meta device."""
    from kit.inference.checkpoint import load_checkpoint
    from kit.models import registry
    built = []
    real = registry.create_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append(next(model.parameters()).device.type)
        return model
    monkeypatch.setattr(registry, "create_model", spy)
    payload = _payload(trained_run)
    payload["recipe"]["model"]["args"] = {**payload["recipe"]["model"]["args"], "width": 400.0}
    with pytest.raises(KitError, match=r"huge\.pt: the model has [\d,]+ parameters, over the budget of 5,000,000"):
        load_checkpoint(_save(payload, tmp_path / "huge.pt"), "better", torch.device("cpu"))
    assert built == ["meta"]
    payload["recipe"]["budget"] = {"max_params": None, "reason": "a hostile file can say anything"}
    with pytest.raises(KitError, match=r"huge\.pt: weights do not fit the model its recipe builds"):
        load_checkpoint(_save(payload, tmp_path / "huge.pt"), "better", torch.device("cpu"))
    assert built == ["meta", "meta"]


def test_check_submission_names_a_label_too_large_for_any_integer(tmp_path, run, assert_one_line_error):
    (tmp_path / "s.csv").write_text("ID,Labels\n1,99999999999999999999999999\n")
    (tmp_path / "t.csv").write_text("ID,Labels\n1,0\n")
    code, output = run("check-submission", tmp_path / "s.csv", "--template", tmp_path / "t.csv")
    assert_one_line_error(code, output, "label 99999999999999999999999999 (ID 1) is outside 0..9")


# 5. Bounded memory for bad files.

class _Calls:
    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _object_state_bomb() -> bytes:
    """An object array whose state declares 300 million elements and holds two: numpy itself would crash on it."""
    rebuild, args, _ = np.zeros(0, dtype=object).__reduce__()
    return _state_bomb(rebuild, args)


def _state_bomb(rebuild, args) -> bytes:
    class Bomb:
        def __reduce__(self):
            return rebuild, args, (1, (300_000_000,), np.dtype("O"), False, [1, 2])
    return pickle.dumps(Bomb(), protocol=2)


@pytest.mark.parametrize("name, raw, fragment", [
    ("bytearray", lambda: pickle.dumps(_Calls(bytearray, (2_500_000_000,)), protocol=2), "bytearray(2,500,000,000)"),
    ("ndarray", lambda: pickle.dumps(_Calls(np.ndarray, ((2_500_000_000,),)), protocol=2), "numpy.ndarray((2500000000,),)"),
    ("reconstruct", lambda: pickle.dumps(_Calls(np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (2_500_000_000,), b"b")),
                                         protocol=2), "2,500,000,000 elements of int8"),
    ("object state", _object_state_bomb, "300,000,000 elements of object"),
])
def test_a_small_pickle_cannot_make_kit_allocate_gigabytes(name, raw, fragment, tmp_path):
    from kit.data.datasets import read_test_set
    path = tmp_path / "bomb.pkl"
    path.write_bytes(raw())
    assert path.stat().st_size < 300
    with pytest.raises(KitError, match=r"bomb\.pkl: refused: it asks for .*more memory than its \d+ bytes can describe") as err:
        read_test_set(path)
    assert fragment in str(err.value)


def test_a_pickle_declaring_a_length_it_does_not_hold_is_one_line(tmp_path):
    from kit.data.datasets import read_test_set
    path = tmp_path / "short.pkl"
    path.write_bytes(b"\x80\x04\x8e" + (2_500_000_000).to_bytes(8, "little") + b"ab.")  # BINBYTES8 of 2.5 GB, 2 bytes held
    with pytest.raises(KitError, match=r"short\.pkl: not a readable pickle"):
        read_test_set(path)


def test_yaml_aliases_that_expand_past_the_limit_are_refused_before_building(write_recipe):
    from kit.recipe import load_recipe
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = write_recipe("model:\n  args:\n    junk:\n" + "".join(f"      {line}\n" for line in lines))
    with pytest.raises(KitError, match=r"r\.yaml: its aliases expand to over 100,000 values"):
        load_recipe(path)
    fine = write_recipe("optim: &o {lr: 0.01}\nschedule: {name: cosine}\n", "fine.yaml")
    assert load_recipe(fine).optim.lr == 0.01


def _npz_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return path


def _npy(array: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def _lying_npy(shape: tuple) -> bytes:
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 10


def test_an_npz_is_read_only_for_the_arrays_kit_needs_and_their_declared_size_first(tmp_path):
    from kit.data.formats import read_npz
    spec = DataSpec(format="npz", train="a.npz", image_size=4)
    images, labels = np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1])
    path = _npz_with(tmp_path / "a.npz", {"images": _npy(images), "labels": _npy(labels), "unused": _lying_npy((10**12,))})
    read = read_npz(path, spec, "train")  # the unused member's header claims a terabyte: never opened
    assert read.images.shape == (2, 3, 4, 4)
    path = _npz_with(tmp_path / "b.npz", {"images": _lying_npy((10**10, 4, 4, 3)), "labels": _npy(labels)})
    with pytest.raises(KitError, match=r"b\.npz: array 'images' declares \(10000000000, 4, 4, 3\) uint8 "
                                       r"\(480,000,000,000 bytes\) but its entry holds 10 bytes"):
        read_npz(path, spec, "train")


# 6. Outputs are regular files, and a submission is committed with its probabilities.

def _special(kind: str, path: Path, elsewhere: Path) -> None:
    if kind == "symlink":
        elsewhere.write_text("precious\n")
        os.symlink(elsewhere, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "device"])
def test_an_output_that_exists_and_is_not_a_regular_file_is_refused(kind, trained_run, demo_data, tmp_path, run,
                                                                    assert_one_line_error):
    out = tmp_path / "out.csv"
    try:
        _special(kind, out, tmp_path / "precious.txt")
    except PermissionError:
        pytest.skip("making a device node needs root")
    code, output = _predict(run, trained_run, demo_data / "cifar_test_nolabel.pkl", out)
    word = {"symlink": "a symlink", "fifo": "a FIFO", "folder": "a folder", "device": "a device"}[kind]
    assert_one_line_error(code, output, f"out.csv: exists and is {word}, not a regular file")
    if kind == "symlink":
        assert out.is_symlink() and (tmp_path / "precious.txt").read_text() == "precious\n"
    elif kind == "device":
        assert stat.S_ISCHR(os.lstat(out).st_mode)
    assert not out.with_suffix(".probs.npz").exists()


def test_a_submission_and_its_probabilities_are_written_both_or_neither(trained_run, demo_data, tmp_path, monkeypatch, quiet):
    from kit.inference.predict import predict
    out = tmp_path / "s.csv"
    predict([str(trained_run)], str(demo_data / "cifar_test_nolabel.pkl"), out=str(out), device="cpu", echo=quiet)
    before = out.read_bytes(), out.with_suffix(".probs.npz").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", full_disk)  # the probability file cannot be written
    with pytest.raises(KitError, match=r"s\.probs\.npz: could not be written \(No space left on device\); the previous "
                                       r"versions of it and s\.csv are kept"):
        predict([str(trained_run)], str(demo_data / "cifar_test_nolabel.pkl"), out=str(out), device="cpu", tta="none",
                echo=quiet)
    assert (out.read_bytes(), out.with_suffix(".probs.npz").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.probs.npz"]


def test_a_commit_that_fails_half_way_puts_the_first_file_back(tmp_path, monkeypatch):
    from kit import io
    from kit.io import atomic_paths
    (tmp_path / "a").write_text("old a")
    replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        replace(src, dst)
    monkeypatch.setattr(io.os, "replace", second_fails)
    with pytest.raises(KitError, match=r"b: could not be written \(I/O error\)"):
        with atomic_paths([tmp_path / "a", tmp_path / "b"]) as (a, b):
            a.write_text("new a")
            b.write_text("new b")
    assert (tmp_path / "a").read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_names_template_of_another_class_list_is_refused_and_one_placeholder_passes(tmp_path):
    from kit.inference.submission import format_from_template, submission_table
    classes, ids, probs = ["cat", "dog", "frog"], np.array([1, 2]), np.eye(3)[:2]
    other = tmp_path / "other.csv"
    other.write_text("id,label\n1,airplane\n2,ship\n")
    with pytest.raises(KitError, match=r"other\.csv: its label column holds class names the model does not have"):
        submission_table(format_from_template(other, classes), ids, probs, classes, "t")
    placeholder = tmp_path / "placeholder.csv"
    placeholder.write_text("id,label\n1,x\n2,x\n")
    table = submission_table(format_from_template(placeholder, classes), ids, probs, classes, "t")
    assert table.label.tolist() == ["cat", "dog"]
