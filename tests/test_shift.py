"""The shifted hidden set: test-time BatchNorm adaptation helps a BatchNorm model on shifted images and changes
little on unshifted ones; AugMix mixes its chains with proper weights; the corruptions are deterministic; the
robustness table and its recommendation; --adapt-bn through predict and evaluate."""

import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.data.autoaugment import OPS, augmix, augmix_weights, magnitudes
from kit.data.corrupt import CORRUPTIONS, corrupt
from kit.data.datasets import load_dataset
from kit.device import Precision
from kit.errors import KitError
from kit.inference.adapt import adapt_batchnorm, batchnorm_layers
from kit.inference.checkpoint import load_checkpoint
from kit.inference.robustness import recommendation, robustness, score_under_shift
from kit.inference.tta import tta_views
from kit.recipe import load_recipe
from kit.training.run import train

CPU = torch.device("cpu")
PREC = Precision(CPU)


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory, quiet):
    """The demo recipe trained to its end (8 epochs): BatchNorm statistics that describe its training images."""
    return train(load_recipe(RECIPES_DIR / "demo.yaml"), demo_data, tmp_path_factory.mktemp("full"), "cpu", echo=quiet)


def _held_out(checkpoint):
    return load_dataset(checkpoint.recipe.data).held_out


def _dimmed(images: torch.Tensor) -> torch.Tensor:
    """Another source: lower contrast and a brighter, grey cast (what a different camera or JPEG pipeline does)."""
    return (images.float() * 0.35 + 150).clamp(0, 255).to(torch.uint8)


def test_adaptation_helps_a_batchnorm_model_on_a_shifted_copy(trained_run):
    checkpoint = load_checkpoint(trained_run, "better", CPU)
    data = _held_out(checkpoint)
    plain, adapted = score_under_shift(checkpoint, _dimmed(data.images), data.labels, tta_views("none"), 500, PREC, prior=0.0)
    assert adapted > plain + 0.05, (plain, adapted)


def test_adaptation_changes_little_on_unshifted_images_and_leaves_the_model_alone(trained_run):
    checkpoint = load_checkpoint(trained_run, "better", CPU)
    data = _held_out(checkpoint)
    before = {k: v.clone() for k, v in checkpoint.model.state_dict().items()}
    plain, adapted = score_under_shift(checkpoint, data.images, data.labels, tta_views("none"), 500, PREC, prior=0.0)
    assert abs(adapted - plain) < 0.05, (plain, adapted)
    assert all(torch.equal(v, before[k]) for k, v in checkpoint.model.state_dict().items())  # a copy was adapted


def test_the_prior_strength_blends_training_and_new_statistics(trained_run):
    checkpoint = load_checkpoint(trained_run, "better", CPU)
    images = _dimmed(_held_out(checkpoint).images)
    first = batchnorm_layers(checkpoint.model)[0]
    fresh = batchnorm_layers(adapt_batchnorm(checkpoint.model, images, checkpoint.mean, checkpoint.std, PREC))[0]
    half = batchnorm_layers(adapt_batchnorm(checkpoint.model, images, checkpoint.mean, checkpoint.std, PREC,
                                            prior=len(images)))[0]  # N = n: half and half
    torch.testing.assert_close(half.running_mean, (first.running_mean + fresh.running_mean) / 2)
    torch.testing.assert_close(half.running_var, (first.running_var + fresh.running_var) / 2)


def test_a_model_without_batchnorm_gets_one_line():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(KitError, match="^m.pt: has no BatchNorm layer, so --adapt-bn has nothing to re-estimate$"):
        adapt_batchnorm(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3), torch.ones(3), PREC, name="m.pt")


def test_predict_and_evaluate_take_adapt_bn(trained_run, demo_data, tmp_path, quiet, run):
    code, out = run("predict", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--adapt-bn", "--adapt-prior", 16,
                    "--out", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0, out
    assert "BatchNorm statistics re-estimated on the 300 test images (prior strength 16)" in out
    assert len(pd.read_csv(tmp_path / "s.csv")) == 300
    from kit.inference.evaluate import evaluate
    plain = evaluate([str(trained_run)], tta="none", device="cpu", echo=quiet)
    adapted = evaluate([str(trained_run)], tta="none", device="cpu", adapt_bn=True, echo=quiet)
    assert abs(adapted.top1.iloc[0] - plain.top1.iloc[0]) < 0.05


def test_the_ensemble_adapts_to_the_images_it_predicts(trained_run, demo_data, tmp_path, run):
    """What predict and evaluate call (Ensemble.adapt_batchnorm): each checkpoint's first BatchNorm takes the mean of
    its input on the dimmed test images, and the probabilities predict writes change with it."""
    import numpy as np

    from kit.data.datasets import read_test_set
    from kit.inference.ensemble import load_ensemble
    test = read_test_set(demo_data / "cifar_test_nolabel.pkl")
    dimmed = _dimmed(test.images)
    ensemble = load_ensemble([str(trained_run)], device="cpu", batch_size=len(dimmed))  # one batch: the mean the adapted layer must hold
    first = batchnorm_layers(ensemble.checkpoints[0].model)[0]
    seen = []
    hook = first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].mean((0, 2, 3))))
    plain = ensemble.probs(dimmed)[0]
    hook.remove()
    ensemble.adapt_batchnorm(dimmed)
    adapted_first = batchnorm_layers(ensemble.checkpoints[0].model)[0]
    torch.testing.assert_close(adapted_first.running_mean, seen[0], rtol=1e-4, atol=1e-5)
    assert (ensemble.probs(dimmed)[0] - plain).abs().max() > 0.05
    with open(tmp_path / "dimmed.pkl", "wb") as f:
        import pickle
        pickle.dump({b"data": dimmed.permute(0, 2, 3, 1).numpy(), b"ids": test.ids}, f)
    written = {}
    for flag in ((), ("--adapt-bn",)):
        code, out = run("predict", trained_run, "--test", tmp_path / "dimmed.pkl", "--out", tmp_path / "s.csv", "--device", "cpu",
                        "--tta", "none", *flag)
        assert code == 0, out
        written[flag] = np.load(tmp_path / "s.probs.npz")["probs"]
    assert np.abs(written[("--adapt-bn",)] - written[()]).max() > 0.05


def test_augmix_weights_are_dirichlet_and_beta_draws():
    gen = torch.Generator().manual_seed(0)
    weights, keep = augmix_weights(4000, 3, gen)
    assert weights.shape == (4000, 3) and (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(4000))
    assert (keep >= 0).all() and (keep <= 1).all()
    assert weights.mean(0).sub(1 / 3).abs().max() < 0.02 and abs(keep.mean().item() - 0.5) < 0.02  # Dirichlet(1), Beta(1, 1)
    assert weights.var(0).sub(1 / 18).abs().max() < 0.01  # Dirichlet(1, 1, 1): variance (1/3)(2/3)/4 = 1/18


def test_augmix_chains_mix_back_to_the_image_when_every_op_is_identity():
    x = torch.rand(16, 3, 32, 32)
    table = magnitudes("randaugment", 32)
    identity_only = torch.tensor([OPS.index("Identity")])
    out = augmix(x, torch.Generator().manual_seed(1), table, identity_only, magnitude=9)
    torch.testing.assert_close(out, x)  # m x + (1 - m) sum_i w_i x = x


def test_augmix_is_per_sample_bounded_and_repeatable():
    x = torch.rand(32, 3, 32, 32)
    table = magnitudes("randaugment", 32)
    ops = torch.tensor([OPS.index(o) for o in ("AutoContrast", "Equalize", "Posterize", "Rotate", "Solarize")])
    a = augmix(x, torch.Generator().manual_seed(3), table, ops, magnitude=9)
    b = augmix(x, torch.Generator().manual_seed(3), table, ops, magnitude=9)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    changed = (a - x).abs().flatten(1).amax(1) > 1e-6
    assert changed.float().mean() > 0.9  # almost every image is changed, each in its own way


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_deterministic_and_grow_with_severity(name):
    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert torch.equal(corrupt(images, name, 3, seed=1), corrupt(images, name, 3, seed=1))
    distance = [(corrupt(images, name, s, seed=1).float() - images.float()).abs().mean().item() for s in (1, 5)]
    assert distance[0] > 0 and distance[1] > distance[0], (name, distance)


def test_robustness_table_plot_and_recommendation(trained_run, tmp_path):
    lines = []
    table = robustness([str(trained_run)], corruptions=("contrast", "noise"), severities=(1, 5), device="cpu",
                       csv_out=str(tmp_path / "r.csv"), plot_out=str(tmp_path / "r.png"), echo=lines.append)
    assert list(table.columns) == ["checkpoint", "corruption", "severity", "top1", "top1_adapted"]
    assert len(table) == 1 + 2 * 2 and table.top1.between(0, 1).all() and table.top1_adapted.between(0, 1).all()
    assert (tmp_path / "r.png").is_file() and len(pd.read_csv(tmp_path / "r.csv")) == 5
    assert lines[-3].startswith(f"{trained_run.name}: adaptation changes accuracy by ")
    assert lines[-3] == recommendation(table, trained_run.name)
    severe = table[(table.corruption == "contrast") & (table.severity == 5)].iloc[0]
    clean = table[table.severity == 0].iloc[0]
    assert severe.top1 < clean.top1  # the corruption hurts


def test_evaluate_corrupt_from_the_command_line(trained_run, tmp_path, run):
    code, out = run("evaluate", trained_run, "--corrupt", "--adapt-prior", 16, "--csv", tmp_path / "r.csv",
                    "--plot", tmp_path / "r.png", "--device", "cpu")
    assert code == 0, out
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == 1 + 7 * 5 and set(table.corruption) == {"clean", *CORRUPTIONS}
    assert "BatchNorm prior strength 16" in out and "use --adapt-bn on a shifted hidden set" in out
    assert (tmp_path / "r.png").is_file()
