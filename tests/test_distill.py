"""Distillation on demo data: a student learns from two teachers, alpha 0 is plain training bit for bit,
the soft loss matches a hand computation, a distillation run resumes bit-exactly, bad teachers fail in one line."""

import math

import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.inference.checkpoint import read_payload
from kit.recipe import load_recipe
from kit.training.distill import soft_loss
from kit.training.run import resume, train

TIMING = ["seconds", "images_per_s"]


@pytest.fixture(scope="module")
def second_teacher(demo_data, tmp_path_factory, quiet, tiny_recipe):
    return train(tiny_recipe(train__seed=1), data_root=demo_data, out_root=tmp_path_factory.mktemp("teacher"), device="cpu", echo=quiet)


@pytest.fixture
def student_of(tiny_recipe):
    """The tiny recipe (with `overrides`) distilled from `teachers`."""
    def make(teachers, **overrides):
        import dataclasses
        recipe = tiny_recipe(**overrides)
        return dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, teachers=tuple(map(str, teachers))))
    return make


def _metrics(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=TIMING)


def test_student_of_two_teachers_learns_and_records_them(trained_run, second_teacher, demo_data, tmp_path, quiet, student_of):
    student = train(student_of([trained_run, second_teacher]), data_root=demo_data, out_root=tmp_path, device="cpu", echo=quiet)
    metrics = pd.read_csv(student / "metrics.csv")
    assert max(metrics.val_acc.iloc[-1], metrics.ema_val_acc.iloc[-1]) > 0.5  # chance is 0.1
    saved = load_recipe(student / "recipe.yaml").distill
    assert saved.teachers == (str((trained_run / "best.pt").resolve()), str((second_teacher / "best.pt").resolve()))
    from kit.training.distill import file_sha256
    assert saved.teacher_sha256 == tuple(file_sha256(t) for t in saved.teachers)


def test_alpha_zero_is_plain_training_bit_for_bit(trained_run, second_teacher, demo_data, tmp_path, quiet, student_of):
    student = train(student_of([trained_run, second_teacher], distill__alpha=0.0), data_root=demo_data, out_root=tmp_path,
                    device="cpu", echo=quiet)
    pd.testing.assert_frame_equal(_metrics(student), _metrics(trained_run))
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (student, trained_run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_soft_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        z = [v / temperature for v in s_row]
        log_norm = math.log(sum(math.exp(v) for v in z))
        expected += sum(t * (math.log(t) - (v - log_norm)) for t, v in zip(t_row, z))
    expected = expected / 2 * temperature ** 2
    assert soft_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_run_resumes_bit_exactly(trained_run, demo_data, tmp_path, quiet, student_of, stop_after_first_epoch):
    whole = train(student_of([trained_run]), data_root=demo_data, out_root=tmp_path / "whole", device="cpu", echo=quiet)

    with pytest.raises(KeyboardInterrupt):
        train(student_of([trained_run]), data_root=demo_data, out_root=tmp_path / "cut", device="cpu",
              on_epoch_end=stop_after_first_epoch, echo=quiet)
    (cut,) = (tmp_path / "cut").iterdir()
    resume(cut, device="cpu", echo=quiet)
    pd.testing.assert_frame_equal(_metrics(cut), _metrics(whole))
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (cut, whole))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_changed_teacher_stops_the_resume(trained_run, demo_data, tmp_path, assert_one_line_error, quiet, run, student_of):
    import shutil
    teacher = tmp_path / "teacher.pt"
    shutil.copy(trained_run / "best.pt", teacher)
    student = train(student_of([teacher], train__epochs=1), data_root=demo_data, out_root=tmp_path, device="cpu", echo=quiet)
    payload = read_payload(teacher)
    payload.pop("path")
    payload["best_acc"] = 0.0
    torch.save(payload, teacher)
    code, out = run("train", "--resume", student, "--set", "train.epochs=2", "--device", "cpu")
    assert_one_line_error(code, out, "teacher.pt: this teacher changed since the run started")


def _teacher_with_5_classes(trained_run, path):
    payload = read_payload(trained_run)
    payload.pop("path")
    payload["recipe"]["model"]["num_classes"] = 5
    payload["classes"] = payload["classes"][:5]
    for key in ("model", "ema"):
        payload[key]["fc.weight"] = payload[key]["fc.weight"][:5].clone()
        payload[key]["fc.bias"] = payload[key]["fc.bias"][:5].clone()
    torch.save(payload, path)
    return path


def _teacher_of_28x28_images(trained_run, path):
    payload = read_payload(trained_run)
    payload.pop("path")
    payload["recipe"]["data"]["image_size"] = 28  # the model pools adaptively: it builds at any size
    torch.save(payload, path)
    return path


def test_bad_teachers_fail_in_one_line(trained_run, demo_data, tmp_path, assert_one_line_error, run):
    demo = RECIPES_DIR / "demo.yaml"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    five = _teacher_with_5_classes(trained_run, tmp_path / "five.pt")
    cases = [
        ([five], [], ["five.pt: a teacher with 5 classes cannot teach a student with 10"]),
        ([_teacher_of_28x28_images(trained_run, tmp_path / "small.pt")], [],
         ["small.pt: a teacher of 28x28 images with 3 channel(s) cannot teach a student of 32x32 with 3"]),
        ([tmp_path / "none.pt"], [], ["none.pt: checkpoint not found"]),
        ([junk], [], ["junk.pt: not a readable kit checkpoint"]),
        ([trained_run], ["--set", "budget.max_params=1000"], ["78,042 parameters, over the budget of 1,000"]),
    ]
    for teachers, extra, fragments in cases:
        args = ["distill", demo, *[a for t in teachers for a in ("--teacher", t)], "--data-root", demo_data,
                "--runs", tmp_path / "runs", "--device", "cpu", *extra]
        assert_one_line_error(*run(*args), *fragments)
    assert not list((tmp_path / "runs").glob("*/best.pt"))
