"""Image-folder datasets (data.name=imagenet on any ImageFolder tree): streamed batches
equal on-demand ones, one loader per epoch, and a cohort trains on them under Ray."""

from __future__ import annotations

import pytest
import torch

from cohort.coordinator import train
from cohort.data import FolderSplit, load_data

from helpers import quiet, synthetic_config


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """root/{train,val}/{class_a,class_b}/*.jpg: 12 + 4 small JPEGs per class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folders")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, name in enumerate(("class_a", "class_b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 128, (40, 40, 3), generator=generator, dtype=torch.uint8) + 100 * label
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg")
    return root


def folder_overrides(root, *extra: str) -> list[str]:
    return [
        "data.name=imagenet",
        f"data.root={root}",
        "data.batch_size=4",
        "data.train_subset=null",
        "cohort.models=resnet18",
        *extra,
    ]


def test_streamed_training_batches_equal_batches_read_on_demand(image_folders):
    config = synthetic_config(None, *folder_overrides(image_folders, "data.workers=1"))
    data = load_data(config.data, seed=3)
    plan = data.plan
    assert isinstance(data.train, FolderSplit) and data.info.num_classes == 2
    steps = [0, 1, 2, 3, 4, 5, 8, 9, 7]  # in order across an epoch boundary, then a jump, then back
    for step in steps:
        streamed = data.train_batch(step)
        direct = data.train.batch(plan.positions(step), plan.augment_seed(step))
        torch.testing.assert_close(streamed[0], direct[0], rtol=0, atol=0, msg=f"step {step}")
        assert torch.equal(streamed[1], direct[1])


def test_one_loader_per_epoch_when_steps_come_in_order(image_folders, monkeypatch):
    config = synthetic_config(None, *folder_overrides(image_folders))
    data = load_data(config.data, seed=0)
    opened = []
    original = FolderSplit._load

    def counting_load(self, batches):
        opened.append(len(batches))
        return original(self, batches)

    monkeypatch.setattr(FolderSplit, "_load", counting_load)
    spe = data.plan.steps_per_epoch
    for step in range(2 * spe):
        data.train_batch(step)
    assert opened == [spe, spe]  # one loader per epoch, each planned for the whole epoch


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_cohort_trains_on_an_image_folder_through_the_ray_backend(image_folders, tmp_path):
    overrides = folder_overrides(
        image_folders, "cohort.backend=ray", "data.workers=1", "data.train_subset=8", "run.precise_bn_batches=1"
    )
    result = train(synthetic_config(tmp_path, *overrides), log=quiet)
    assert (result.run_dir / "checkpoints" / "epoch_001" / "meta.json").is_file()
    assert len(result.final_top1) == 2 and all(0 <= top1 <= 1 for top1 in result.final_top1)
    assert result.best_peer_path.is_file()
