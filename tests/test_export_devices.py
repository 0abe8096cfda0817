"""Export round trips (safetensors back into predict, ONNX against onnxruntime, TorchScript), TensorBoard
events, CUDA -> CPU resume on a faithful stand-in, the determinism switch, and the pinned timm internal."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from kit.errors import KitError
from kit.inference.checkpoint import load_checkpoint, read_payload
from kit.inference.export import ONNX_MIN_TORCH, export, torch_version
from kit.inference.predict import predict
from kit.training.ema import CachedModelEma
from kit.training.run import resume, train

CPU = torch.device("cpu")


def _probs(csv_path) -> np.ndarray:
    return np.load(csv_path.with_suffix(".probs.npz"))["probs"]


def test_safetensors_export_predicts_like_its_checkpoint(trained_run, demo_data, tmp_path, quiet):
    out, = export(str(trained_run), "safetensors", weights_from="ema", out=str(tmp_path / "m.safetensors"), echo=quiet)
    pkl = str(demo_data / "cifar_test_nolabel.pkl")
    a = predict([str(trained_run / "best.pt")], pkl, tta="flip", weights_from="ema", out=str(tmp_path / "a.csv"), device="cpu", echo=quiet)
    b = predict([str(out)], pkl, tta="flip", out=str(tmp_path / "b.csv"), device="cpu", echo=quiet)
    assert np.array_equal(_probs(a), _probs(b)) and pd.read_csv(a).equals(pd.read_csv(b))
    loaded = load_checkpoint(out, "better", CPU)
    assert loaded.weights_from == "ema" and loaded.num_params == 78_042 and loaded.recipe.name == "demo"
    with pytest.raises(KitError, match=r"m\.safetensors: holds only the ema weights"):
        load_checkpoint(out, "raw", CPU)


def test_safetensors_without_kit_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(KitError, match=r"plain\.safetensors: a safetensors file without kit's metadata"):
        read_payload(tmp_path / "plain.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=pytest.mark.skipif(
    torch_version() < ONNX_MIN_TORCH, reason="kit's ONNX export needs a newer torch (it says so in one line)")), "torchscript"])
def test_onnx_and_torchscript_match_torch(trained_run, tmp_path, fmt):
    lines = []
    out, = export(str(trained_run), fmt, out=str(tmp_path / f"m.{fmt}"), echo=lines.append)
    difference = float(lines[0].rsplit(": ", 1)[1])
    assert out.is_file() and difference < 1e-4
    checkpoint = load_checkpoint(trained_run, "better", CPU)
    images = torch.rand(3, 3, 32, 32)
    expected = checkpoint.model((images - checkpoint.mean.view(1, 3, 1, 1)) / checkpoint.std.view(1, 3, 1, 1))
    if fmt == "onnx":
        import onnxruntime
        got = onnxruntime.InferenceSession(str(out)).run(None, {"images": images.numpy()})[0]
    else:
        got = torch.jit.load(str(out))(images).detach().numpy()
    assert np.abs(got - expected.detach().numpy()).max() < 1e-4


def test_export_without_onnxruntime_fails_in_one_line(trained_run, tmp_path, monkeypatch, assert_one_line_error, run):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python does for a package that is not installed
    code, out = run("export", trained_run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert_one_line_error(code, out, "needs the onnxruntime package", "kit[export]")
    assert not (tmp_path / "m.onnx").exists()


def test_tensorboard_events_are_readable(demo_data, tmp_path, quiet, tiny_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = train(tiny_recipe(train__log="tensorboard"), data_root=demo_data, out_root=tmp_path, device="cpu", echo=quiet)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "accuracy/val_ema", "lr", "images_per_s"} <= tags
    metrics = pd.read_csv(run_dir / "metrics.csv")
    val = events.Scalars("accuracy/val")
    assert [e.step for e in val] == [1, 2, 3]
    assert [e.value for e in val] == pytest.approx(metrics.val_acc.tolist(), rel=1e-6)


def test_resume_on_the_cpu_of_a_run_saved_from_cuda(demo_data, tmp_path, quiet, tiny_recipe):
    """Stand-in for a run saved elsewhere: other optimizer device flags and a CUDA (Philox) data-stream state in
    last.pt (tensors torch.load(map_location='cpu') maps anyway). The resumed run steps with its own flags."""
    run_dir = train(tiny_recipe(train__epochs=1), data_root=demo_data, out_root=tmp_path, device="cpu", echo=quiet)
    payload = torch.load(run_dir / "last.pt", weights_only=True)
    for group in payload["optimizer"]["param_groups"]:
        group["fused"], group["foreach"], group["capturable"] = False, True, False
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # CUDA's generator state: seed and offset
    payload["rng"].update(order=cuda_state, augment=[cuda_state], generator_device="cuda")
    torch.save(payload, run_dir / "last.pt")
    lines = []
    resume(run_dir, overrides=("train.epochs=2",), device="cpu", echo=lines.append)
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2]
    assert any("data streams were saved on cuda with 1 process(es) and cannot continue on cpu" in line for line in lines)
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert all(g["fused"] and g["capturable"] and not g["foreach"] for g in saved["optimizer"]["param_groups"])


def test_deterministic_switch_is_on_during_the_run_only(demo_data, tmp_path, quiet, tiny_recipe):
    seen = []
    train(tiny_recipe(train__epochs=1, train__deterministic=True), data_root=demo_data, out_root=tmp_path, device="cpu",
          on_epoch_end=lambda _: seen.append(torch.are_deterministic_algorithms_enabled()), echo=quiet)
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()


def test_cached_ema_equals_timm_model_ema_v3():
    """The pinned timm internal: CachedModelEma must update exactly as timm's ModelEmaV3 does."""
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours, theirs = CachedModelEma(model, 0.9), ModelEmaV3(model, decay=0.9)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # moves the BatchNorm buffers and its batch counter
        ours.update(model, step=step)
        theirs.update(model, step=step)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_optimizer_state_keeps_the_engines_lr_tensors():
    """On CUDA the engine writes every update's LR into the param groups' LR tensors: a resume must keep them."""
    from kit.training.optim import load_optimizer_state
    params = [torch.nn.Parameter(torch.zeros(2))]
    saved = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    params[0].grad = torch.ones(2)
    saved.step()
    fresh = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    lr = torch.tensor(0.1)
    fresh.param_groups[0]["lr"] = lr
    load_optimizer_state(fresh, saved.state_dict())
    assert fresh.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)
    assert "momentum_buffer" in fresh.state[params[0]]


def test_onnx_export_on_an_older_torch_fails_in_one_line(trained_run, tmp_path, monkeypatch, assert_one_line_error, run):
    import kit.inference.export
    monkeypatch.setattr(kit.inference.export, "torch_version", lambda: (2, 5))
    code, out = run("export", trained_run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert_one_line_error(code, out, "--format onnx needs torch >= 2.11", "safetensors and torchscript work here")
    assert not (tmp_path / "m.onnx").exists()
