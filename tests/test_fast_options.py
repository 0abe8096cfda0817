"""airbench's ideas as options of the family and the engine: whitening stem, zero-init residual blocks,
alternating flip, a higher LR for norm weights and biases, Lookahead."""

import dataclasses

import pandas as pd
import torch

from kit.data.augment import alternating_flip
from kit.data.datasets import load_dataset
from kit.models.resnet import ResNet, ResNetConfig, init_whitening, whiten_stem
from kit.training.engine import build_trainer, run_updates
from kit.training.run import train

CPU = torch.device("cpu")


def _with_model_args(recipe, **args):
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, args={**recipe.model.args, **args}))


def test_whitening_stem_decorrelates_patches():
    model = ResNet(ResNetConfig(stem="whiten", blocks=(1,), channels=(16,)), 10)
    images = torch.nn.functional.interpolate(torch.randn(64, 3, 8, 8), size=32, mode="bilinear") * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    conv = whiten_stem(model)
    init_whitening(conv, images)
    with torch.no_grad():
        out = (conv(images) - conv.bias.view(1, -1, 1, 1))[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = (out - out.mean(0)).T @ (out - out.mean(0)) / len(out)
    assert (cov - torch.diag(cov.diag())).abs().max() < 1e-3  # whitened: no correlation left between directions
    assert torch.equal(conv.weight[12:], -conv.weight[:12])
    assert whiten_stem(ResNet(ResNetConfig(blocks=(1,), channels=(16,)), 10)) is None


def test_the_trainer_sets_the_whitening_filters(demo_data, quiet, tiny_recipe):
    recipe = _with_model_args(tiny_recipe(), stem="whiten")
    dataset = load_dataset(recipe.data, demo_data)
    trainer = build_trainer(recipe, dataset, CPU, echo=quiet)
    conv = whiten_stem(trainer.model)
    expected = conv.weight.clone()
    images = dataset.train.images[:5000].float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (dataset.mean, dataset.std))
    init_whitening(conv, (images - mean) / std)
    assert torch.allclose(conv.weight, expected, atol=1e-5)


def test_zero_init_residual_blocks_start_as_identity():
    for block in ("basic", "preact"):
        model = ResNet(ResNetConfig(block=block, blocks=(2,), channels=(8,), zero_init_residual=True), 10).eval()
        second = model.stage1[1]  # stride 1, identity shortcut
        x = torch.randn(2, 8, 16, 16)
        expected = torch.relu(x) if block == "basic" else x
        assert torch.allclose(second(x), expected, atol=1e-6), block


def test_alternating_flip_alternates_per_image():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 1, 64).expand(200, 3, 2, 64)
    index = torch.arange(200)
    even, odd = (alternating_flip(x, index, torch.tensor(p)) for p in (0, 1))
    flipped_even = (even != x).any(-1).any(-1).any(-1)
    flipped_odd = (odd != x).any(-1).any(-1).any(-1)
    assert torch.equal(flipped_even, ~flipped_odd)  # each image: one side in even epochs, the other in odd ones
    assert 60 < int(flipped_even.sum()) < 140
    assert torch.equal(alternating_flip(x, index, torch.tensor(2)), even)


def test_batchnorm_parameters_get_their_lr_scale(demo_data, quiet, tiny_recipe):
    recipe = tiny_recipe(optim__norm_lr_scale=8.0)
    trainer = build_trainer(recipe, load_dataset(recipe.data, demo_data), CPU, echo=quiet)
    run_updates(trainer, 2)
    groups = trainer.optimizer.param_groups
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 8.0]
    norms = {id(p) for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == norms
    assert id(trainer.model.fc.bias) in {id(p) for p in groups[0]["params"]}  # the classifier keeps the base LR
    assert groups[1]["lr"] == 8.0 * groups[0]["lr"] == 8.0 * 0.004


def test_lookahead_and_alternating_flip_train_and_resume(demo_data, tmp_path, quiet, tiny_recipe):
    recipe = tiny_recipe(optim__name="lookahead_momentum", augment__alternate_flip=True, train__epochs=1)
    run = train(recipe, data_root=demo_data, out_root=tmp_path, device="cpu", echo=quiet)
    from kit.training.run import resume
    resume(run, overrides=("train.epochs=2",), device="cpu", echo=quiet)
    assert list(pd.read_csv(run / "metrics.csv").epoch) == [1, 2]
