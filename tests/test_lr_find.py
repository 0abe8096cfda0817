"""kit lr-find: the LR range test runs the engine's own update at each LR of an exponential sweep, stops once the loss
diverges, and suggests a rate by a named rule; the command prints the override and writes the plot."""

import numpy as np
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.training.lr_find import lr_find, smooth, suggestions


def test_the_rules_read_a_known_curve():
    lrs = np.logspace(-5, 0, 101)
    loss = (np.log10(lrs) + 2) ** 2  # lowest at 1e-2, falling fastest at the start
    minimum, steep = suggestions(lrs, loss)
    assert minimum == pytest.approx(1e-3) and steep == pytest.approx(1e-5)
    np.testing.assert_allclose(smooth(np.ones(5)), np.ones(5))  # debiased: a constant stays itself


def test_each_update_of_the_sweep_is_the_trainers_at_its_lr(demo_data, monkeypatch, tiny_recipe, quiet):
    from kit.training.engine import Trainer
    seen = []
    update = Trainer.update

    def watched(self):
        update(self)
        seen.append(float(self.optimizer.param_groups[0]["lr"]))  # what the update just used

    monkeypatch.setattr(Trainer, "update", watched)
    found = lr_find(tiny_recipe(), demo_data, "cpu", start_lr=1e-5, end_lr=1e-1, updates=20, echo=quiet)
    assert len(seen) == len(found.lrs) == 20 and not found.diverged
    np.testing.assert_allclose(seen, found.lrs, rtol=1e-6)  # the device table's float32
    np.testing.assert_allclose(found.lrs, np.logspace(-5, -1, 20))
    assert np.isfinite(found.losses).all() and np.isfinite(found.smoothed).all()


def test_a_diverging_sweep_stops_early(demo_data, tiny_recipe, quiet):
    found = lr_find(tiny_recipe(), demo_data, "cpu", start_lr=1e-3, end_lr=1e6, updates=200, echo=quiet)
    assert found.diverged and len(found.lrs) < 200 and found.planned == 200
    assert found.minimum < found.lrs[-1]


def test_the_command_prints_the_override_and_writes_the_plot(demo_data, tmp_path, run):
    code, out = run("lr-find", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--device", "cpu", "--updates", 30,
                    "--out", tmp_path / "lr.png", "--set", "schedule.name=onecycle")
    assert code == 0, out
    lines = out.splitlines()
    override = next(line for line in lines if line.startswith("use: --set optim.lr="))
    assert float(override.split("=")[-1]) > 0
    assert any("optim.lr is the cycle's peak" in line for line in lines)
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_sweeps_are_one_line(demo_data, run, assert_one_line_error):
    code, out = run("lr-find", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--device", "cpu", "--start-lr", 1,
                    "--end-lr", 0.1)
    assert_one_line_error(code, out, "lr-find: need 0 < start_lr < end_lr (1, 0.1)")


def test_the_sweep_starts_from_the_weights_training_starts_from(demo_data, tmp_path, monkeypatch, tiny_recipe, quiet):
    from kit.training.engine import Trainer
    from kit.training.run import train
    first = []
    update = Trainer.update

    def watched(self):
        if self.num_updates == 0:
            first.append({k: v.clone() for k, v in self.model.state_dict().items()})
        update(self)

    monkeypatch.setattr(Trainer, "update", watched)
    lr_find(tiny_recipe(), demo_data, "cpu", updates=10, echo=quiet)
    train(tiny_recipe(train__epochs=1), demo_data, tmp_path, "cpu", echo=quiet)
    assert len(first) == 2 and all(torch.equal(first[0][k], first[1][k]) for k in first[0])
