"""The model family and registry: every preset and recipe model runs forward and backward, finite."""

import pytest
import torch

from kit.cli import recipe_files
from kit.errors import KitError
from kit.models import ResNet, ResNetConfig, build_model, count_parameters, create_model, list_models, stage_breakdown
from kit.recipe import known_num_classes, load_recipe


def _forward_backward(model: torch.nn.Module, num_classes: int) -> None:
    model.train()
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    logits.logsumexp(1).sum().backward()
    assert torch.isfinite(logits).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_registered_preset_forward_backward(name):
    _forward_backward(create_model(name, num_classes=10), 10)


BIG = ("resnet18_cifar100_wide", "resnet18_cifar100_new_wide")  # 44M and 50M parameters


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in BIG else p for p in recipe_files()],
                         ids=lambda p: p.stem)
def test_recipe_model_forward_backward(path):
    recipe = load_recipe(path)
    _forward_backward(build_model(recipe, str(path)), known_num_classes(recipe))


@pytest.mark.parametrize("cfg", [
    ResNetConfig(block="preact", blocks=(1, 1), channels=(8, 16), activation="silu", dropout=0.2),
    ResNetConfig(blocks=(1, 2, 1), channels=(8, 16, 32), stem="imagenet", shortcut_kernel=3, activation="elu"),
    ResNetConfig(blocks=(1, 1), channels=(8, 16), pool="fixed", pool_kernel=8, width=1.5, dropout=0.5,
                 dropout_position="output"),
    ResNetConfig(blocks=(1, 1), channels=(8, 16), pool="fixed", pool_kernel=4),  # 16x16 map -> 4x4 pooled
])
def test_family_options_forward_backward(cfg):
    _forward_backward(ResNet(cfg, 7), 7)


def test_width_multiplier_scales_channels():
    narrow = ResNet(ResNetConfig(blocks=(1, 1), channels=(16, 32), width=0.5), 10)
    assert narrow.stage2[0].residual[0].out_channels == 16 and narrow.stem[0].out_channels == 8


def test_dropout_position_branch_keeps_identity_path():
    cfg = ResNetConfig(blocks=(1,), channels=(8,), dropout=0.9, dropout_position="branch")
    block = ResNet(cfg, 10).stage1[0]
    assert any(isinstance(m, torch.nn.Dropout) for m in block.residual.modules())
    assert isinstance(block.dropout, torch.nn.Identity)
    x = torch.randn(4, 8, 8, 8)
    block.eval()
    assert torch.equal(block(x), block(x))  # dropout is off in eval


def test_dropout_position_does_not_change_state_dict_keys():
    keys = [ResNet(ResNetConfig(blocks=(1, 1), channels=(8, 16), dropout=0.5, dropout_position=p), 10).state_dict().keys()
            for p in ("branch", "output")]
    assert list(keys[0]) == list(keys[1]) == list(ResNet(ResNetConfig(blocks=(1, 1), channels=(8, 16)), 10).state_dict())


def test_oversized_fixed_pool_is_an_error():
    with pytest.raises(ValueError, match="pool_kernel 8 is larger than the final 4x4"):
        ResNet(ResNetConfig(pool="fixed", pool_kernel=8), 10)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KitError, match=r"unknown model 'resnet19'; did you mean resnet18"):
        create_model("resnet19", 10)


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:resnet18"])
def test_external_models_by_name(name):
    _forward_backward(create_model(name, num_classes=10), 10)


def test_external_unknown_names():
    with pytest.raises(KitError, match="timm has no model 'resnet_nope'"):
        create_model("timm:resnet_nope", 10)
    with pytest.raises(KitError, match="torchvision has no model 'resnet_nope'"):
        create_model("torchvision:resnet_nope", 10)


def test_pretrained_path_loads_local_weights_and_skips_a_new_head(tmp_path):
    source = create_model("torchvision:resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = create_model("torchvision:resnet18", num_classes=10, pretrained_path=str(tmp_path / "w.pt"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (10, 512)
    with pytest.raises(KitError, match="pretrained weights not found"):
        create_model("resnet_tiny", 10, pretrained_path=str(tmp_path / "missing.pt"))


def test_stage_breakdown_sums_to_total():
    model = create_model("resnet18", 10)
    rows = stage_breakdown(model)
    assert [name for name, _ in rows] == ["stem", "stage1", "stage2", "stage3", "stage4", "fc"]
    assert sum(n for _, n in rows) == count_parameters(model)
