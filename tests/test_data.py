"""Datasets, splits and the batch plan all peers share."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys

import pytest
import torch

from cohort.config import load_config
from cohort.data import BatchPlan, DataError, load_data, read_idx
from cohort.run import main

from helpers import REPO, synthetic_config

BATCH_DIGEST_SCRIPT = """
import hashlib, sys
from cohort.config import load_config
from cohort.data import load_data
data = load_data(load_config(None, sys.argv[1:]).data, seed=int(sys.argv[1].split('=')[1]))
for step in (0, 1, 7, 40):
    x, y = data.train_batch(step)
    print(step, hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
"""


def batch_digests(overrides: list[str]) -> list[str]:
    data = load_data(load_config(None, overrides).data, seed=int(overrides[0].split("=")[1]))
    digests = []
    for step in (0, 1, 7, 40):
        x, y = data.train_batch(step)
        digests.append(f"{step} {hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()}")
    return digests


@pytest.mark.usefixtures("fashion_required")
def test_fashion_mnist_loads_full_splits():
    data = load_data(load_config(None, ["data.train_subset=null"]).data, seed=0)
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert data.info.num_classes == 10 and data.info.channels == 1
    assert set(data.test.labels.unique().tolist()) == set(range(10))
    x, y = data.train_batch(0)
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.3 and 0.6 < float(x.std()) < 1.4  # normalised


@pytest.mark.usefixtures("fashion_required")
def test_batches_are_identical_in_another_process():
    overrides = ["run.seed=5", "data.train_subset=3000", "data.batch_size=64"]
    result = subprocess.run(
        [sys.executable, "-c", BATCH_DIGEST_SCRIPT, *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=True,
    )
    assert result.stdout.split("\n")[:4] == batch_digests(overrides)


def test_batches_depend_on_seed_and_step():
    a = load_data(synthetic_config(None, "data.synthetic.train_size=256").data, seed=1)
    b = load_data(synthetic_config(None, "data.synthetic.train_size=256").data, seed=2)
    assert not torch.equal(a.train_batch(0)[0], b.train_batch(0)[0])
    assert not torch.equal(a.train_batch(0)[0], a.train_batch(1)[0])
    assert torch.equal(a.train_batch(3)[0], a.train_batch(3)[0])


def test_augmentation_differs_between_epochs_for_the_same_images():
    data = load_data(synthetic_config(None, "data.synthetic.train_size=32", "data.batch_size=32").data, seed=0)
    assert data.plan.steps_per_epoch == 1
    x0, y0 = data.train_batch(0)
    x1, y1 = data.train_batch(1)
    order0, order1 = data.plan.positions(0), data.plan.positions(1)
    same_image = {int(p): i for i, p in enumerate(order1)}
    pairs = [(i, same_image[int(p)]) for i, p in enumerate(order0)]
    assert sorted(order0.tolist()) == sorted(order1.tolist())  # same images...
    assert any(not torch.equal(x0[i], x1[j]) for i, j in pairs)  # ...augmented differently


def test_each_epoch_visits_every_sample_once():
    plan = BatchPlan(size=100, batch_size=10, seed=3)
    for epoch in range(2):
        seen = torch.cat([plan.positions(epoch * 10 + s) for s in range(plan.steps_per_epoch)])
        assert sorted(seen.tolist()) == list(range(100))


def test_subset_is_a_seeded_prefix_and_val_is_carved_from_train():
    config = synthetic_config(None, "data.synthetic.train_size=200", "data.train_subset=100", "data.val_split=0.2").data
    a, b = load_data(config, seed=0), load_data(config, seed=0)
    assert len(a.train) == 80 and len(a.val) == 20
    assert torch.equal(a.train.images, b.train.images)
    full = load_data(synthetic_config(None, "data.synthetic.train_size=200").data, seed=0)
    pool = {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in full.train.images}
    val = {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in a.val.images}
    train = {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in a.train.images}
    assert val <= pool and not (val & train)  # from the training set, disjoint from train


def test_missing_fashion_files_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist") as caught:
        load_data(load_config(None, [f"data.root={tmp_path}"]).data, seed=0)
    assert str(tmp_path) in str(caught.value)


def test_missing_dataset_exits_2_before_training(tmp_path, capsys):
    code = main([f"data.root={tmp_path}", f"run.out_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "data.root" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_corrupt_idx_files_are_clear_errors(tmp_path):
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress((0x0803).to_bytes(4, "big") + (10).to_bytes(4, "big") * 3 + b"\0" * 20))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(truncated, ndim=3)
    garbage = tmp_path / "g.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable"):
        read_idx(garbage, ndim=3)
    wrong = tmp_path / "w"
    wrong.write_bytes((0x0801).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="magic"):
        read_idx(wrong, ndim=3)


def test_cifar_without_files_says_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        load_data(load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data, seed=0)
    with pytest.raises(DataError, match="needs data.root"):
        load_data(load_config(None, ["data.name=cifar100"]).data, seed=0)


def test_synthetic_data_is_deterministic():
    config = synthetic_config().data
    assert torch.equal(load_data(config, 0).test.images, load_data(config, 0).test.images)


BALANCED = ["data.name=synthetic", "data.train_subset=null", "data.synthetic.train_size=200", "data.batch_size=16"]


@pytest.mark.parametrize("per_class", [2, 4])
def test_class_balanced_batches_hold_per_class_images_of_each_drawn_class(per_class):
    overrides = ["run.seed=3", *BALANCED, "data.sampler=class_balanced", f"data.per_class={per_class}"]
    data = load_data(load_config(None, overrides[1:]).data, seed=3)
    train_labels = data.train.labels
    seen = []
    for step in range(3 * data.plan.steps_per_epoch):
        positions = data.plan.positions(step)
        counts = torch.bincount(train_labels[positions], minlength=10)
        assert len(positions) == 16
        assert sorted(counts[counts > 0].tolist()) == [per_class] * (16 // per_class), step
        assert torch.equal(data.train_batch(step)[1], train_labels[positions])
        seen.append(positions)
    assert data.plan.steps_per_epoch == 200 // 16
    first_epoch = torch.cat(seen[: data.plan.steps_per_epoch])
    for c in range(10):  # each class is read as a cycle: no image twice before all of its class was read
        taken = first_epoch[train_labels[first_epoch] == c]
        members = int((train_labels == c).sum())
        assert len(taken[:members].unique()) == min(len(taken), members)
    assert not torch.equal(seen[0], seen[data.plan.steps_per_epoch])  # a new order every epoch


def test_class_balanced_batches_are_identical_in_another_process():
    overrides = ["run.seed=5", *BALANCED, "data.sampler=class_balanced", "data.per_class=4"]
    here = batch_digests(overrides)
    there = subprocess.run(
        [sys.executable, "-c", BATCH_DIGEST_SCRIPT, *overrides], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split("\n")[:-1]
    assert here == there
    assert here != batch_digests(["run.seed=5", *BALANCED])  # the sampler changes the batches


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.per_class=3"], "data.per_class: batch_size 128 is not a multiple of per_class 3"),
        (["data.per_class=2"], "needs 64 classes but fashion_mnist has 10; use per_class >= 13"),
    ],
)
def test_class_balanced_batches_that_cannot_be_drawn_are_config_errors(overrides, expected):
    from cohort.config import ConfigError

    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["data.sampler=class_balanced", *overrides])


@pytest.mark.parametrize(("channels", "size", "padding"), [(1, 28, 2), (3, 32, 4)])
def test_batched_crop_and_flip_equals_torchvisions_per_image_transforms_bit_for_bit(channels, size, padding):
    from cohort.augment import CropFlip

    augment = CropFlip(size, padding)
    images = torch.randint(
        0, 256, (64, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(7)
    batched, after_batched = augment(images), torch.rand(1)
    torch.manual_seed(7)
    per_image, after_per_image = torch.stack([augment.per_image()(image) for image in images]), torch.rand(1)
    assert torch.equal(batched, per_image)
    assert torch.equal(after_batched, after_per_image)  # the same draws, so whatever follows is unchanged too
    assert not torch.equal(batched, images)  # it augments at all
    flipped = CropFlip(size, 0, flip_p=1.0)(images)
    assert torch.equal(flipped, images.flip(-1))  # no padding: no crop drawn, every image flipped
