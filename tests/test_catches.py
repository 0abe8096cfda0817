"""Tests that catch what they claim: each of these faults was once put into kit on purpose and the whole suite still
passed. Each test here fails with its fault in place (named in its docstring)."""

import ast
import random

import numpy as np
import pytest
import torch
from torch import nn

import kit
from kit.device import inference_precision


def test_kit_predict_passes_tta_on(trained_run, demo_data, tmp_path, quiet):
    """Fault: kit.predict takes tta= and does not pass it on (the recipe's flip is used whatever is asked)."""
    from kit.data.datasets import read_test_set
    from kit.inference.checkpoint import load_checkpoint
    from kit.inference.tta import tta_views
    test = demo_data / "cifar_test_nolabel.pkl"
    for tta in ("none", "flip"):
        kit.predict(trained_run, test, tmp_path / f"{tta}.csv", tta=tta, device="cpu", echo=quiet)
    none, flip = (np.load(tmp_path / f"{t}.probs.npz")["member_probs"][0] for t in ("none", "flip"))
    checkpoint = load_checkpoint(trained_run, "better", torch.device("cpu"))
    images = read_test_set(test).images
    plain = checkpoint.probs(images, tta_views("none"), 100, inference_precision(torch.device("cpu"), "auto")).numpy()
    assert np.allclose(none, plain, atol=1e-6) and not np.allclose(flip, plain, atol=1e-4)


def test_tta_averages_each_views_probabilities_not_its_logits():
    """Fault: TTA averages the views' logits and takes one softmax."""
    from kit.inference.scores import predict_probs
    from kit.inference.tta import identity, mirror
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 1 * 2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 0]]))  # class 0's logit reads the top-left pixel
    images = torch.tensor([[[[255, 0]], [[0, 0]]]], dtype=torch.uint8)  # (1, 2, 1, 2): top-left bright
    prec = inference_precision(torch.device("cpu"), "fp32")
    got = predict_probs(model, images, torch.zeros(2), torch.ones(2), [identity, mirror], 10, prec)
    x = images.float() / 255
    views = [model(x), model(x.flip(-1))]
    expected = sum(torch.softmax(v, 1) for v in views) / 2
    assert torch.allclose(got, expected) and not torch.allclose(got, torch.softmax(sum(views) / 2, 1), atol=1e-3)


@pytest.mark.parametrize("weights", ["2,-1", "1,0,-0.5"])
def test_blend_weights_with_a_negative_entry_are_refused_whatever_their_sum(weights):
    """Fault: blend weights are checked by their sum only (2,-1 sums to 1)."""
    from kit.errors import KitError
    from kit.inference.ensemble import parse_blend
    with pytest.raises(KitError, match="non-negative weights"):
        parse_blend(weights, ["a"] * len(weights.split(",")))


def test_the_adapt_prior_weighs_the_training_statistics_n_over_n_plus_the_images(trained_run, demo_data):
    """Fault: the prior's weight inverted (n/(N+n) on the training statistics); a test with N = n cannot see it."""
    from kit.data.datasets import read_test_set
    from kit.inference.adapt import adapt_batchnorm, batchnorm_layers
    from kit.inference.checkpoint import load_checkpoint
    checkpoint = load_checkpoint(trained_run, "raw", torch.device("cpu"))
    images = read_test_set(demo_data / "cifar_test_nolabel.pkl").images[:100]
    prec = inference_precision(torch.device("cpu"), "fp32")
    new = adapt_batchnorm(checkpoint.model, images, checkpoint.mean, checkpoint.std, prec, 50, prior=0)
    mixed = adapt_batchnorm(checkpoint.model, images, checkpoint.mean, checkpoint.std, prec, 50, prior=300)
    for old, fresh, both in zip(*(batchnorm_layers(m) for m in (checkpoint.model, new, mixed))):
        assert torch.allclose(both.running_mean, 0.75 * old.running_mean + 0.25 * fresh.running_mean, atol=1e-5)
        assert torch.allclose(both.running_var, 0.75 * old.running_var + 0.25 * fresh.running_var, atol=1e-5)


def test_every_random_stream_is_put_back_on_resume_torchs_global_one_too():
    """Fault: torch's global random stream is not restored on resume (the demo draws nothing from it)."""
    from kit.training.streams import restore_rng, rng_state
    order, augment = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = rng_state(order, [augment.get_state()])
    expected = torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=order), torch.rand(2, generator=augment)
    torch.manual_seed(99), np.random.seed(99), random.seed(99), order.manual_seed(99), augment.manual_seed(99)
    assert restore_rng(state, order, augment)
    got = torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=order), torch.rand(2, generator=augment)
    assert torch.equal(got[0], expected[0]) and got[1:3] == expected[1:3]
    assert torch.equal(got[3], expected[3]) and torch.equal(got[4], expected[4])


def test_greedy_selection_keeps_its_best_prefix_not_its_last_round():
    """Fault: greedy selection returns the counts of its last round. Here round 3 scores 3/4 and round 4 no better."""
    from kit.inference.blend import greedy_selection
    labels = torch.tensor([0, 1, 1, 0])
    probs = [torch.tensor(p) for p in ([[0.0, 1.0], [0.65, 0.35], [0.3, 0.7], [0.35, 0.65]],
                                       [[0.17, 0.83], [0.02, 0.98], [0.08, 0.92], [0.13, 0.87]],
                                       [[0.77, 0.23], [0.1, 0.9], [0.58, 0.42], [0.1, 0.9]])]
    assert greedy_selection(probs, labels, 4) == pytest.approx([0, 1 / 3, 2 / 3])  # the last round's would be 0, 1/4, 3/4


def test_lr_finds_per_update_loss_restarts_with_each_epoch():
    """Fault: the per-update loss taken across an epoch boundary (the Trainer's loss sum is zeroed at each epoch)."""
    from kit.training.lr_find import _per_update
    losses = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    sums = np.concatenate([np.cumsum(losses[:3]), np.cumsum(losses[3:6]), np.cumsum(losses[6:])])  # 3 updates an epoch
    assert np.array_equal(_per_update(sums, 3), losses)


def test_the_layout_tests_reader_finds_imports_inside_functions(tmp_path):
    """Fault: the layout test reads only the imports at the top of a module (an upward import in a function hides)."""
    from test_layout import _imports
    source = tmp_path / "m.py"
    source.write_text("import kit.io\n\ndef f():\n    from kit.data import formats\n    import kit.recipe\n\n"
                      "class C:\n    def g(self):\n        from kit.inference.scores import topk\n")
    modules = {name: source for name in ("kit.io", "kit.data", "kit.data.formats", "kit.recipe", "kit.inference.scores")}
    assert _imports(source, modules) == set(modules)
    assert ast.parse(source.read_text())  # the file the reader read is valid Python


def test_the_disagreement_order_breaks_ties_by_the_larger_spread():
    """Fault: images with the same agreement ordered by their position instead of the members' spread."""
    from kit.inference.interpret import disagreement_order
    member = np.array([  # 2 members, 3 images, 2 classes
        [[0.6, 0.4], [0.9, 0.1], [0.9, 0.1]],
        [[0.4, 0.6], [0.1, 0.9], [0.9, 0.1]],
    ])
    order, agreement, spread = disagreement_order(member)
    assert agreement.tolist() == [0.5, 0.5, 1.0] and spread[1] > spread[0]
    assert order.tolist() == [1, 0, 2]


def test_a_trainers_head_is_sized_by_the_datas_classes(demo_data, tiny_recipe):
    """Fault: a trainer's head sized without the data's classes (the recipe's 10 on data of 7)."""
    from kit.data.datasets import Dataset, load_dataset
    from kit.training.engine import build_trainer
    recipe = tiny_recipe()
    assert recipe.model.num_classes is None
    digits = load_dataset(recipe.data, demo_data)
    keep = digits.train.labels < 7
    seven = Dataset(digits.train.subset(keep), digits.held_out, [str(i) for i in range(7)], digits.mean, digits.std)
    trainer = build_trainer(recipe, seven, torch.device("cpu"), echo=lambda _: None)
    with torch.no_grad():
        logits = trainer.model.eval()(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 7)
