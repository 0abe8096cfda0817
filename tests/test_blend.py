"""Submissions in the competition's own format (templates, label styles) and `kit blend`: ensembles from saved
probabilities, kit's own and other software's."""

import numpy as np
import pandas as pd
import pytest

from kit.errors import KitError
from kit.inference.submission import check_submission, format_from_options, format_from_template, submission_table

CLASSES = ["cat", "dog", "frog"]
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
IDS = np.array([10, 11, 12])


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("sample, columns, style, first_row", [
    ("id,label\n12,cat\n10,cat\n11,cat\n", ["id", "label"], "name", ["12", "dog"]),
    ("ImageId,Label\n12,0\n10,0\n11,0\n", ["ImageId", "Label"], "index", ["12", "1"]),
    ("id,frog,cat,dog\n12,0.3,0.3,0.4\n10,1,0,0\n11,0,0,1\n", ["id", "frog", "cat", "dog"], "probs", ["12", "0.3", "0.2", "0.5"]),
])
def test_a_template_sets_header_order_and_label_style(tmp_path, sample, columns, style, first_row):
    fmt = format_from_template(_write(tmp_path / "sample.csv", sample), CLASSES)
    table = submission_table(fmt, IDS, PROBS, CLASSES, "test.pkl")
    assert fmt.style == style and list(table.columns) == columns
    assert table[fmt.id_column].tolist() == ["12", "10", "11"]  # the template's row order
    assert [str(v) for v in table.iloc[0]] == first_row


def test_one_probability_column_is_the_second_class_of_two(tmp_path):
    fmt = format_from_template(_write(tmp_path / "s.csv", "id,target\n1,0.5\n2,0.5\n"), ["no", "yes"])
    table = submission_table(fmt, np.array([2, 1]), np.array([[0.9, 0.1], [0.25, 0.75]]), ["no", "yes"], "t")
    assert fmt.style == "probs" and table["target"].tolist() == [0.75, 0.1]
    with pytest.raises(KitError, match="one probability column suits two classes; the model has 3"):
        format_from_template(tmp_path / "s.csv", CLASSES)


def test_ids_are_written_as_the_files_and_the_template_spell_them(tmp_path):
    from PIL import Image

    from kit.data.datasets import read_test_set
    from kit.recipe import DataSpec
    for name in ("010", "007", "9"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{name}.png")
    test = read_test_set(tmp_path, DataSpec(image_size=8))
    assert test.ids.tolist() == ["007", "9", "010"]  # numeric order, spelled as the files are
    probs = np.eye(3)
    plain = submission_table(format_from_options(), test.ids, probs, CLASSES, tmp_path)
    assert plain.ID.tolist() == ["007", "9", "010"] and plain.Labels.tolist() == [0, 1, 2]
    fmt = format_from_template(_write(tmp_path / "s.csv", "id,label\n10,x\n7,x\n09,x\n"), CLASSES)
    table = submission_table(fmt, test.ids, probs, CLASSES, tmp_path)
    assert table.id.tolist() == ["10", "7", "09"] and table.label.tolist() == ["frog", "cat", "dog"]


def test_options_without_a_template(tmp_path):
    names = submission_table(format_from_options("name", "Id", "Category"), IDS, PROBS, CLASSES, "t")
    assert list(names.columns) == ["Id", "Category"] and names.Category.tolist() == ["cat", "frog", "dog"]
    probs = submission_table(format_from_options("probs"), IDS, PROBS, CLASSES, "t")
    assert list(probs.columns) == ["ID", *CLASSES] and np.allclose(probs[CLASSES].to_numpy(), PROBS)


@pytest.mark.parametrize("sample, message", [
    ("id,label\n10,cat\n11,cat\n12,cat\n13,cat\n", "sample.csv: row 5: id '13' is not in the test set"),
    ("id,label\n10,cat\n11,cat\n", r"sample.csv: no row for the test set's id '12' \(1 missing"),
    ("id,label\n10,cat\n10,cat\n", "sample.csv: row 3: id '10' appears twice"),
    ("id,cat,dog\n10,0.5,0.5\n", "sample.csv: columns cat, dog should be the classes"),
])
def test_a_template_whose_ids_or_columns_differ_fails(tmp_path, sample, message):
    with pytest.raises(KitError, match=message):
        fmt = format_from_template(_write(tmp_path / "sample.csv", sample), CLASSES)
        submission_table(fmt, IDS, PROBS, CLASSES, "test.pkl")


@pytest.mark.parametrize("text, message", [
    ("id,label\n10,cat\n11,dog\n12,cow\n", "row 4: label 'cow' is not a class"),
    ("id,cat,dog,frog\n10,1,0,0\n11,0.5,0.6,0\n12,0,0,1\n", "row 3: the class probabilities sum to 1.1000, not 1"),
    ("id,cat,dog,frog\n10,1,0,0\n11,0,0,1\n12,1.5,0,0\n", r"row 4: cat '1.5' is not a probability in \[0, 1\]"),
    ("ID,label\n10,cat\n11,dog\n12,cat\n", "header is ID,label; expected id,label"),
])
def test_check_submission_against_a_template(tmp_path, text, message):
    style = "name" if "label" in text.splitlines()[0] else "probs"
    sample = "id,label\n10,cat\n11,cat\n12,cat\n" if style == "name" else "id,cat,dog,frog\n10,1,0,0\n11,1,0,0\n12,1,0,0\n"
    fmt = format_from_template(_write(tmp_path / "sample.csv", sample), CLASSES)
    assert check_submission(_write(tmp_path / "ok.csv", sample), fmt=fmt, classes=CLASSES) == 3
    with pytest.raises(KitError, match=message):
        check_submission(_write(tmp_path / "sub.csv", text), fmt=fmt, classes=CLASSES)


def _probs_file(path, probs, ids, labels=None, **extra):
    arrays = {"probs": np.asarray(probs, np.float32), "ids": np.asarray(ids), **extra}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(path, **arrays)
    return path


def test_blend_of_other_softwares_files_picks_the_better_model(tmp_path, run):
    """Two programs' (N, K) files: one right on every labelled image, one random; the blend is the right one's, whose
    unlabelled file lists the ids in another order than the first file's: only matching by id writes its rows right."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    good, noise = np.eye(4)[labels] * 0.9 + 0.025, rng.dirichlet(np.ones(4), 40)
    test_good, test_noise = rng.dirichlet(np.ones(4), 10), rng.dirichlet(np.ones(4), 10)
    ids = np.arange(100, 110)
    args = ["--labelled", _probs_file(tmp_path / "b_val.npz", noise, np.arange(40), labels),
            "--labelled", _probs_file(tmp_path / "a_val.npz", good, np.arange(40), labels),
            "--unlabelled", _probs_file(tmp_path / "b_test.npz", test_noise, ids),  # the first file's order is the submission's
            "--unlabelled", _probs_file(tmp_path / "a_test.npz", test_good[::-1], ids[::-1]),  # another order: aligned by id
            "--out", tmp_path / "sub.csv", "--labels", "probs"]
    code, out = run("blend", *args)
    assert code == 0, out
    assert "weights: a_val 1.000" in out and "on the other 20" in out
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub.ID.tolist() == ids.tolist() and np.allclose(sub[["0", "1", "2", "3"]].to_numpy(), test_good, atol=1e-6)


def test_bad_blend_inputs_are_one_line_and_write_nothing(tmp_path, assert_one_line_error, run):
    labelled = _probs_file(tmp_path / "v.npz", np.full((4, 2), 0.5), np.arange(4), [0, 1, 0, 1])
    unlabelled = _probs_file(tmp_path / "t.npz", np.full((3, 2), 0.5), [7, 8, 9])
    out = tmp_path / "sub.csv"
    cases = [
        (["--labelled", unlabelled, "--unlabelled", unlabelled], ("t.npz: no 'labels' array",)),
        (["--labelled", labelled, "--labelled", _probs_file(tmp_path / "w.npz", np.full((4, 2), 0.5), np.arange(1, 5), [0, 1, 0, 1]),
          "--unlabelled", unlabelled], ("w.npz: its ids differ from", "on the labelled side")),
        (["--labelled", labelled, "--unlabelled", unlabelled, "--unlabelled", unlabelled], ("1 members on the labelled side",)),
        (["--labelled", labelled, "--unlabelled", unlabelled, "--template", _write(tmp_path / "s.csv", "id,label\n7,0\n8,0\n6,0\n")],
         ("s.csv: row 4: id '6' is not in the test set",)),
        (["--labelled", labelled, "--unlabelled", unlabelled, "--template", tmp_path / "s.csv", "--labels", "name"],
         ("--labels: --template",)),
    ]
    for args, fragments in cases:
        code, output = run("blend", *args, "--out", out)
        assert_one_line_error(code, output, *fragments)
        assert not out.exists()


def test_blend_equals_predict_with_the_same_weights(trained_run, demo_data, tmp_path, monkeypatch, quiet, run, tiny_recipe):
    """kit blend from evaluate's and predict's saved probabilities writes what kit predict writes with the weights
    the selection chose (pinned here to 0.3/0.7, so that both members count)."""
    from kit.inference import blend
    from kit.training.run import train
    members = [trained_run, train(tiny_recipe(train__epochs=1), demo_data, tmp_path / "runs", "cpu", echo=quiet)]
    test = demo_data / "cifar_test_nolabel.pkl"
    assert run("evaluate", *members, "--probs-out", tmp_path / "val.npz", "--device", "cpu")[0] == 0
    saved = np.load(tmp_path / "val.npz")  # the scored images' own ids (the data carries them), not row numbers
    assert saved["ids"].tolist() == [f"test_batch/{i}" for i in range(len(saved["labels"]))]
    assert run("predict", *members, "--test", test, "--out", tmp_path / "p.csv", "--device", "cpu")[0] == 0
    monkeypatch.setattr(blend, "greedy_selection", lambda probs, labels, rounds: [0.3, 0.7])
    blend.blend([tmp_path / "val.npz"], [tmp_path / "p.probs.npz"], tmp_path / "b.csv", echo=quiet)
    code, out = run("predict", *members, "--test", test, "--out", tmp_path / "w.csv", "--device", "cpu", "--blend", "0.3,0.7")
    assert code == 0, out
    assert pd.read_csv(tmp_path / "w.csv").equals(pd.read_csv(tmp_path / "b.csv"))
    blended, predicted = np.load(tmp_path / "b.probs.npz"), np.load(tmp_path / "w.probs.npz")
    assert np.allclose(blended["probs"], predicted["probs"], atol=1e-6) and np.allclose(blended["blend"], [0.3, 0.7])
    member_probs = np.load(tmp_path / "p.probs.npz")["member_probs"]
    assert np.array_equal(blended["member_probs"], member_probs) and not np.allclose(member_probs[0], member_probs[1])
