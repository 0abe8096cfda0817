"""Ensembles, TTA, the submission CSV, the probabilities file and every bad test pickle."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from kit.data.datasets import read_test_pickle
from kit.device import Precision
from kit.errors import KitError
from kit.inference.checkpoint import load_checkpoint, read_payload
from kit.inference.ensemble import ensemble_probs
from kit.inference.predict import predict
from kit.inference.scores import predict_probs
from kit.inference.tta import TTA_VIEWS, mirror, translate, tta_views

CPU = torch.device("cpu")


def _pickle(path, data, ids):
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"ids": ids}, f)
    return path


@pytest.fixture
def test_pkl(tmp_path, demo_data):
    """The demo test pickle with shuffled, non-contiguous ids."""
    test = read_test_pickle(demo_data / "cifar_test_nolabel.pkl")
    ids = np.random.default_rng(0).permutation(len(test.ids)) * 7 + 1000
    return _pickle(tmp_path / "test.pkl", test.images.permute(0, 2, 3, 1).numpy(), ids), ids


def test_ensemble_of_copies_equals_the_single_checkpoint(trained_run, test_pkl, tmp_path, quiet):
    pkl, _ = test_pkl
    one = predict([str(trained_run)], str(pkl), tta="flip", out=str(tmp_path / "one.csv"), device="cpu", echo=quiet)
    three = predict([str(trained_run)] * 3, str(pkl), tta="flip", out=str(tmp_path / "three.csv"), device="cpu", echo=quiet)
    p1, p3 = np.load(one.with_suffix(".probs.npz"))["probs"], np.load(three.with_suffix(".probs.npz"))["probs"]
    assert np.allclose(p1, p3, atol=1e-6)
    assert pd.read_csv(one).equals(pd.read_csv(three))


def test_flip_tta_of_a_flip_invariant_model_changes_nothing():
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    mean, std, prec = torch.zeros(3), torch.ones(3), Precision(CPU)
    plain = predict_probs(model, images, mean, std, tta_views("none"), 4, prec)
    flipped = predict_probs(model, images, mean, std, tta_views("flip"), 4, prec)
    assert torch.allclose(plain, flipped, atol=1e-6)


def test_tta_views_are_exact_transforms():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(mirror(mirror(x)), x)
    shifted = translate(x, 1, 1)
    assert torch.equal(shifted[..., 1:, 1:], x[..., :-1, :-1])
    assert [len(v) for v in TTA_VIEWS.values()] == [1, 2, 3, 6]
    with pytest.raises(KitError, match="unknown; choose one of none, flip, shift, flip-shift"):
        tta_views("rotate")


def test_weighted_ensemble_is_a_normalized_mean():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(ensemble_probs([a, b], [3, 1]), torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(ensemble_probs([a, b]), torch.tensor([[0.5, 0.5]]))


def test_csv_format_and_order(trained_run, test_pkl, tmp_path, quiet):
    pkl, ids = test_pkl
    out = predict([str(trained_run)], str(pkl), out=str(tmp_path / "s.csv"), device="cpu", echo=quiet)
    table = pd.read_csv(out)
    assert list(table.columns) == ["ID", "Labels"] and table.ID.tolist() == ids.tolist()
    assert table.Labels.between(0, 9).all()
    probs = np.load(out.with_suffix(".probs.npz"))
    assert probs["ids"].tolist() == ids.tolist() and np.allclose(probs["probs"].sum(1), 1, atol=1e-5)
    assert probs["probs"].argmax(1).tolist() == table.Labels.tolist()


def test_every_accepted_layout_gives_the_same_predictions(trained_run, test_pkl, tmp_path, quiet):
    pkl, ids = test_pkl
    hwc = read_test_pickle(pkl).images  # (N, 3, 32, 32)
    outs = []
    for name, data in [("hwc", hwc.permute(0, 2, 3, 1).numpy()), ("chw", hwc.numpy()), ("flat", hwc.reshape(len(ids), -1).numpy())]:
        path = _pickle(tmp_path / f"{name}.pkl", data, ids)
        outs.append(pd.read_csv(predict([str(trained_run)], str(path), out=str(tmp_path / f"{name}.csv"), device="cpu", echo=quiet)))
    assert outs[0].equals(outs[1]) and outs[0].equals(outs[2])


@pytest.mark.parametrize("obj, message", [
    ({b"ids": np.arange(2)}, r"no b'data' entry"),
    ({b"data": np.zeros((2, 32, 32, 3), np.uint8)}, r"no b'ids' entry"),
    ({b"data": np.zeros((2, 32, 32), np.uint8), b"ids": np.arange(2)}, r"has shape \(2, 32, 32\)"),
    ({b"data": np.zeros((2, 32, 32, 3), np.float32), b"ids": np.arange(2)}, r"dtype float32; expected uint8"),
    ({b"data": np.zeros((3, 32, 32, 3), np.uint8), b"ids": np.arange(2)}, r"3 images but 2 ids in b'ids'"),
    ({b"data": np.zeros((3, 32, 32, 3), np.uint8), b"ids": np.array([1, 2, 1])}, r"duplicates \(e\.g\. 1 appears 2 times\)"),
    ([1, 2], r"expected a dict in the pickle"),
])
def test_bad_test_pickles_fail_before_writing(trained_run, tmp_path, obj, message, quiet):
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    out = tmp_path / "never.csv"
    with pytest.raises(KitError, match=message) as err:
        predict([str(trained_run)], str(path), out=str(out), device="cpu", echo=quiet)
    assert "bad.pkl" in str(err.value)
    assert not list(tmp_path.glob("never*"))


def test_checkpoints_with_other_classes_cannot_be_ensembled(trained_run, tmp_path, test_pkl, quiet):
    ckpt = read_payload(trained_run)
    ckpt.pop("path")
    ckpt["classes"] = [f"c{i}" for i in range(10)]
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(KitError, match=r"other\.pt: its 10 classes \(c0, c1, c2, \.\.\.\) differ from"):
        predict([str(trained_run), str(tmp_path / "other.pt")], str(test_pkl[0]), out=str(tmp_path / "x.csv"), device="cpu", echo=quiet)


def test_checkpoint_whose_weights_do_not_fit(trained_run, tmp_path):
    ckpt = read_payload(trained_run)
    ckpt.pop("path")
    ckpt["recipe"]["model"]["num_classes"] = 100
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(KitError, match=r"wrong\.pt: weights do not fit the model its recipe builds"):
        load_checkpoint(tmp_path / "wrong.pt", "better", CPU)


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(KitError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt", "better", CPU)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(KitError, match=r"junk\.pt: not a readable kit checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", "better", CPU)


def test_weights_from_raw_ema_best(trained_run):
    ckpt = read_payload(trained_run)
    assert load_checkpoint(trained_run, "raw", CPU).weights_from == "raw"
    assert load_checkpoint(trained_run, "ema", CPU).weights_from == "ema"
    assert load_checkpoint(trained_run, "better", CPU).weights_from == ckpt["best_weights_from"]


def test_blend_option_numbers_and_selection_file(trained_run, test_pkl, tmp_path, quiet):
    pkl, _ = test_pkl
    runs = [str(trained_run), str(trained_run / "last.pt")]
    with pytest.raises(KitError, match="need 2 non-negative weights"):
        predict(runs, str(pkl), blend="1", out=str(tmp_path / "a.csv"), device="cpu", echo=quiet)
    predict(runs, str(pkl), blend="0.7,0.3", out=str(tmp_path / "a.csv"), device="cpu", echo=quiet)
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"blend": {str(trained_run.resolve()): 1.0}}))
    lines = []
    predict(runs, str(pkl), blend=str(selection), out=str(tmp_path / "b.csv"), device="cpu", echo=lines.append)
    assert any("blend 1.000" in line for line in lines) and any("blend 0.000" in line for line in lines)


def test_summary_warns_over_budget(trained_run, test_pkl, tmp_path):
    lines = []
    predict([str(trained_run)] * 65, str(test_pkl[0]), tta="none", out=str(tmp_path / "c.csv"), device="cpu", echo=lines.append)
    text = "\n".join(lines)
    assert "78,042 parameters" in text and "warning: the ensemble's 5,072,730 parameters exceed" in text
    assert "tta views: identity" in text and "predicted classes: 0 " in text
