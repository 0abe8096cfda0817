"""Evaluation tables, greedy ensemble selection, per-class reports and submission checks."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import classification_report

from kit.errors import KitError
from kit.inference.blend import greedy_selection, selection_halves
from kit.inference.evaluate import evaluate
from kit.inference.interpret import Interpretation
from kit.inference.report import per_class_table, report
from kit.inference.scores import topk
from kit.inference.submission import check_submission


def test_topk():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 2])
    assert topk(probs, labels, 1) == 0.5 and topk(probs, labels, 2) == 1.0


def test_greedy_selection_prefers_the_member_that_helps():
    labels = torch.tensor([0, 1, 2, 0])
    good = torch.eye(3)[[0, 1, 2, 1]] * 0.9 + 0.05  # 3/4 right
    bad = torch.eye(3)[[1, 2, 0, 1]] * 0.9 + 0.05  # all wrong
    weights = greedy_selection([bad, good], labels, rounds=5)
    assert weights[1] == 1.0 and weights[0] == 0.0


def test_evaluate_table_and_selection_file(trained_run, tmp_path, quiet):
    csv, sel = tmp_path / "t.csv", tmp_path / "sel.json"
    table = evaluate([str(trained_run), str(trained_run)], tta="shift", select=True, csv_out=str(csv),
                     select_out=str(sel), device="cpu", echo=quiet)
    assert list(table.checkpoint)[-2:] == ["ensemble (mean)", "ensemble (selected)"]
    assert table.top1.iloc[0] == pytest.approx(table.top1.iloc[2])  # two copies = one member
    assert pd.read_csv(csv).shape == table.shape and sel.is_file()


def test_evaluate_refuses_members_scored_on_different_images(trained_run, demo_data, tmp_path, quiet, tiny_recipe):
    import dataclasses

    from kit.recipe import load_recipe
    from kit.training.run import train
    recipe = tiny_recipe(train__epochs=1)
    split = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, validation="split"))
    other = train(split, data_root=demo_data, out_root=tmp_path, device="cpu", echo=quiet)
    with pytest.raises(KitError, match="validates on other images than .*use --held-out test"):
        evaluate([str(trained_run), str(other)], tta="none", device="cpu", echo=quiet)
    table = evaluate([str(trained_run), str(other)], held_out="test", tta="none", device="cpu", echo=quiet)
    assert len(table) == 3 and load_recipe(other / "recipe.yaml").data.validation == "split"


def test_per_class_numbers_equal_scikit_learn_on_a_known_confusion():
    # true:      0 0 0 0 1 1 1 2 2 2
    # predicted: 0 0 1 2 1 1 0 2 2 2   -> class 0: P 2/3, R 2/4; class 1: P 2/3, R 2/3; class 2: P 3/4, R 3/3
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 2])
    table = per_class_table(labels, predicted, ["a", "b", "c"])
    assert table.precision[:3].tolist() == pytest.approx([2 / 3, 2 / 3, 3 / 4])
    assert table.recall[:3].tolist() == pytest.approx([0.5, 2 / 3, 1.0])
    reference = classification_report(labels, predicted, output_dict=True)
    for i, name in enumerate("abc"):
        assert table.f1[i] == pytest.approx(reference[str(i)]["f1-score"])
        assert table.support[i] == reference[str(i)]["support"]
    assert table.f1[3] == pytest.approx(reference["macro avg"]["f1-score"])


def _interpretation(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> Interpretation:
    import torch

    from kit.data.datasets import Labelled
    n = len(labels)
    data = Labelled(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.from_numpy(labels), np.arange(n))
    return Interpretation("t", data, probs, classes)


def test_most_confused_pairs_are_ordered_by_count():
    labels = np.array([0] * 8 + [1] * 7 + [2] * 6)
    predicted = np.array([0] * 5 + [1] * 3 + [0] + [1] * 6 + [1] * 4 + [2] * 2)  # the matrix [[5, 3, 0], [1, 6, 0], [0, 4, 2]]
    interp = _interpretation(np.eye(3)[predicted], labels, ["a", "b", "c"])
    pairs = interp.most_confused()
    assert pairs[["true", "predicted", "count"]].values.tolist() == [["c", "b", 4], ["a", "b", 3], ["b", "a", 1]]
    assert interp.most_confused(min_count=3)["count"].tolist() == [4, 3]


def test_report_writes_every_part(trained_run, tmp_path, quiet):
    (out,) = report([str(trained_run)], report_dir=str(tmp_path), tta="flip", device="cpu", echo=quiet)
    assert {"per_class.csv", "confusion.csv", "confusion.png", "confused_pairs.csv", "curves.png", "REPORT.md"} <= {
        p.name for p in out.iterdir()}
    text = (out / "REPORT.md").read_text()
    assert "78,042 parameters" in text and "accuracy: raw" in text and "EMA" in text and "| class |" in text
    confusion = pd.read_csv(out / "confusion.csv", index_col=0)
    assert confusion.values.sum() == 300 and list(confusion.columns) == [str(d) for d in range(10)]


def test_the_report_reads_each_checkpoint_once_and_scores_raw_ema_and_the_better(trained_run, monkeypatch):
    from kit.inference import checkpoint, report
    reads = []
    read = checkpoint.read_payload
    monkeypatch.setattr(report, "read_payload", lambda path: (reads.append(path), read(path))[1])
    monkeypatch.setattr(checkpoint, "read_payload", lambda path: (reads.append(path), read(path))[1])
    best, data, scores = report.score_run(str(trained_run), None, "val", "none", "cpu")
    assert reads == [str(trained_run)]
    payload = read(trained_run)
    assert best.weights_from == checkpoint.checkpoint_weights(payload, "better")
    assert scores.tta_acc == (scores.ema_acc if best.weights_from == "ema" else scores.raw_acc)  # --tta none: the same model


@pytest.fixture
def pkl(demo_data):
    return demo_data / "cifar_test_nolabel.pkl"


def _csv(tmp_path, text):
    path = tmp_path / "s.csv"
    path.write_text(text)
    return path


def _valid_rows(n=300):
    return "".join(f"{i},{i % 10}\n" for i in range(n))


def test_check_submission_accepts_a_valid_csv(tmp_path, pkl):
    assert check_submission(_csv(tmp_path, "ID,Labels\n" + _valid_rows()), pkl) == 300


@pytest.mark.parametrize("text, message", [
    ("Id,Label\n" + _valid_rows(), "header is Id,Label; expected ID,Labels"),
    ("ID,Labels\n" + _valid_rows() + "5,1\n", "ID 5 appears more than once"),
    ("ID,Labels\n" + _valid_rows(299), "1 ids of .* have no row \\(e.g. 299\\)"),
    ("ID,Labels\n" + _valid_rows() + "999,1\n", "ID 999 is not in"),
    ("ID,Labels\n" + _valid_rows(299) + "299,10\n", "label 10 \\(ID 299\\) is outside 0..9"),
    ("ID,Labels\n" + _valid_rows(299) + "299,cat\n", "row 301: Labels 'cat' is not an integer"),
    ("", "not a readable CSV"),
])
def test_check_submission_catches_each_defect(tmp_path, pkl, text, message):
    with pytest.raises(KitError, match=message):
        check_submission(_csv(tmp_path, text), pkl)


def test_selection_on_half_reports_on_the_other_half(trained_run, tmp_path):
    labels = torch.arange(300) % 10
    choose, report = selection_halves(labels, 0.5)
    assert len(choose) == len(report) == 150 and not set(choose.tolist()) & set(report.tolist())
    assert torch.bincount(labels[choose]).tolist() == [15] * 10  # stratified
    lines = []
    sel = tmp_path / "sel.json"
    table = evaluate([str(trained_run), str(trained_run)], tta="none", select=True, select_on=0.5, select_out=str(sel),
                     device="cpu", echo=lines.append)
    assert "blend chosen on 150 images; every figure below is on the other 150" in lines
    import json
    assert json.loads(sel.read_text())["scored_on"] == 150
    from kit.data.datasets import load_dataset
    from kit.device import Precision
    from kit.inference.checkpoint import load_checkpoint
    from kit.inference.tta import tta_views
    checkpoint = load_checkpoint(trained_run, "better", torch.device("cpu"))
    data = load_dataset(checkpoint.recipe.data)
    predicted = checkpoint.probs(data.held_out.images, tta_views("none"), 1000, Precision(torch.device("cpu"))).argmax(1)
    _, report = selection_halves(data.held_out.labels, 0.5)
    assert table.top1.iloc[0] == pytest.approx((predicted[report] == data.held_out.labels[report]).float().mean().item())


def test_the_worst_mistakes_are_the_highest_losses_and_pairs_their_most_confident_examples(monkeypatch):
    from kit.inference import interpret as interpret_module
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55], [0.05, 0.95]])
    labels = np.array([0, 0, 0, 0, 1])
    interp = _interpretation(probs, labels, ["a", "b"])
    assert interp.top_losses(5, mistakes_only=True).index.tolist() == [1, 3]  # wrong ones only, -log p(true) 1.61, 0.80
    assert interp.top_losses(1).index.tolist() == [1] and interp.top_losses().index.tolist() == [1, 3, 2, 0, 4]
    assert interp.top_losses(2).loss.tolist() == pytest.approx([-np.log(0.2), -np.log(0.45)])
    grids = []
    monkeypatch.setattr(interpret_module, "plot_image_grid", lambda images, captions, *a, **k: grids.append(captions))
    interp.plot_confused_examples(examples=5)
    assert [c.split("\n")[0] for c in grids[0] if c] == ["a -> b", "a -> b"]  # the most confident mistake first
    assert grids[0][0].endswith("p 0.80") and grids[0][1].endswith("p 0.55")


def test_the_report_shows_the_mistakes_as_the_images_were_read(trained_run, tmp_path, monkeypatch, quiet):
    """The grids hold the held-out images as read (uint8, not normalized), the worst mistakes first."""
    from kit.inference import interpret as interpret_module
    from kit.inference import report as report_module
    grids = {}
    plot = interpret_module.plot_image_grid
    monkeypatch.setattr(interpret_module, "plot_image_grid",
                        lambda images, captions, path, *a, **k: (grids.__setitem__(path.name, (images, captions)),
                                                                 plot(images, captions, path, *a, **k))[1])
    (out,) = report([str(trained_run)], report_dir=str(tmp_path), tta="none", mistakes=5, device="cpu", echo=quiet)
    _, data, scores = report_module.score_run(str(trained_run), None, "val", "none", "cpu")
    worst = Interpretation("t", data, scores.probs, [str(c) for c in range(10)]).top_losses(5, mistakes_only=True).index
    images, captions = grids["worst_mistakes.png"]
    assert len(images) == len(worst) > 0 and all(np.array_equal(a, data.images[i].numpy()) for a, i in zip(images, worst))
    assert all(a.dtype == np.uint8 for a in images) and captions[0].startswith(f"{data.labels[worst[0]].item()} -> ")
    text = (out / "REPORT.md").read_text()
    assert "![the worst mistakes](worst_mistakes.png)" in text and "(confused_examples.png)" in text
    assert (out / "worst_mistakes.png").read_bytes()[:4] == b"\x89PNG"


def test_the_ensembles_disagreement_needs_no_labels(trained_run, demo_data, tmp_path, run, tiny_recipe, quiet):
    from kit.training.run import train
    other = train(tiny_recipe(train__epochs=1, train__seed=3), demo_data, tmp_path / "runs", "cpu", echo=quiet)
    code, out = run("report", trained_run, other, "--report-dir", tmp_path / "r", "--test", demo_data / "cifar_test_nolabel.pkl",
                    "--mistakes", 6, "--device", "cpu")
    assert code == 0, out
    table = pd.read_csv(tmp_path / "r" / "ensemble" / "disagreement.csv")
    assert len(table) == 300 and table.agreement.is_monotonic_increasing  # least agreement first
    agree = (table.member_0 == table.ensemble).astype(float) + (table.member_1 == table.ensemble)
    np.testing.assert_allclose(table.agreement, agree / 2)
    assert (tmp_path / "r" / "ensemble" / "disagreement.png").is_file()
    code, out = run("report", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--device", "cpu")
    assert code == 2 and "needs an ensemble: give two or more checkpoints" in out
