"""CIFAR layouts, splits, statistics, the demo data and one-line errors for bad data."""

import pickle

import numpy as np
import pytest
import torch

from kit.data.datasets import (
    DEMO_TEST,
    DEMO_UNLABELLED,
    channel_stats,
    download_cifar,
    load_dataset,
    make_demo_data,
    read_test_pickle,
)
from kit.errors import KitError
from kit.recipe import DataSpec


def test_demo_data_is_the_cifar10_layout(demo_data):
    data = load_dataset(DataSpec(), demo_data)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert len(data.held_out) == DEMO_TEST and len(data.train) == 1797 - DEMO_TEST - DEMO_UNLABELLED
    assert data.classes == [str(d) for d in range(10)]
    test = read_test_pickle(demo_data / "cifar_test_nolabel.pkl")
    assert len(test.ids) == DEMO_UNLABELLED and test.layout.startswith("(N, 32, 32, 3)")


def test_demo_data_is_deterministic(tmp_path, demo_data):
    again = make_demo_data(tmp_path)
    for name in ("cifar-10-batches-py/data_batch_1", "cifar_test_nolabel.pkl", "test_labels.csv"):
        assert (again / name).read_bytes() == (demo_data / name).read_bytes()


def test_stratified_split_keeps_class_balance(demo_data):
    spec = DataSpec(validation="split", val_fraction=0.25, split_seed=3)
    data = load_dataset(spec, demo_data)
    full = load_dataset(DataSpec(), demo_data).train
    assert len(data.train) + len(data.held_out) == len(full)
    share = torch.bincount(data.held_out.labels, minlength=10) / torch.bincount(full.labels, minlength=10)
    assert share.min() > 0.2 and share.max() < 0.3
    assert torch.equal(load_dataset(spec, demo_data).held_out.labels, data.held_out.labels)  # same seed, same split


def test_test_split_is_the_test_batch(demo_data):
    spec = DataSpec(validation="split")
    assert torch.equal(load_dataset(spec, demo_data, held_out="test").held_out.labels, load_dataset(DataSpec(), demo_data).held_out.labels)


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.numpy().astype(np.float64) / 255
    assert np.allclose(mean, x.mean((0, 2, 3))) and np.allclose(std, x.std((0, 2, 3), ddof=1))


def test_missing_root_and_files(tmp_path, demo_data):
    with pytest.raises(KitError, match=r"nowhere: data root not found"):
        load_dataset(DataSpec(), tmp_path / "nowhere")
    with pytest.raises(KitError, match=r"cifar-10-batches-py/data_batch_1: missing; expected the CIFAR-10 python layout"):
        load_dataset(DataSpec(), tmp_path)
    with pytest.raises(KitError, match=r"cifar-100-python/train: missing"):
        load_dataset(DataSpec(dataset="cifar100"), demo_data)


def test_corrupt_and_malformed_batches(tmp_path, demo_data):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(demo_data, root)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(b"not a pickle")
    with pytest.raises(KitError, match=r"data_batch_2: not a readable pickle"):
        load_dataset(DataSpec(), root)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(KitError, match=r"data_batch_2: b'data' is uint8 \(4, 100\); expected uint8 \(N, 3072\)"):
        load_dataset(DataSpec(), root)


def test_download_offline_says_where_to_put_files(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", offline)
    with pytest.raises(KitError, match=r"could not download cifar10 .*cifar-10-batches-py/ exists"):
        download_cifar("cifar10", tmp_path)
