"""Datasets and the batch plan every peer of a cohort shares.

Peers are separate processes under Ray, yet mutual distillation compares their
outputs on the *same* images: at global step s every peer must see identical
samples with identical augmentation. ``BatchPlan`` derives the sample order and the
augmentation seed from (run.seed, epoch, step) alone, so any process rebuilds the
same batch with no coordination.

Augmentation uses torchvision's v2 transforms (for in-memory data, ``augment.CropFlip``
draws what they draw and applies it to the whole batch at once); determinism comes
from seeding a forked RNG (once per batch for in-memory data, once per sample for
image folders, whose samples are decoded in DataLoader workers).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.transforms import v2

from .augment import CropFlip
from .registry import Registry

if TYPE_CHECKING:
    from .config import DataConfig

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EVAL_BATCH = 500


class DataError(ValueError):
    """A dataset that is missing or unreadable; the message names the path and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """What models and checkpoints need to know about a dataset's inputs."""

    channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


FASHION_MNIST_INFO = DatasetInfo(1, 10, 28, (0.2860,), (0.3530,))
CIFAR10_INFO = DatasetInfo(3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_INFO = DatasetInfo(3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_INFO = DatasetInfo(3, 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def dataset_info(config: DataConfig) -> DatasetInfo:
    """Channels, classes and input size, without loading the data."""
    return DATASETS.get(config.name).info(config)


def seed_for(*parts: object) -> int:
    """A stable 60-bit seed from any parts (same in every process and Python run)."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()
    return int(digest[:15], 16)


# --------------------------------------------------------------------- batch plan


@dataclass(frozen=True)
class BatchPlan:
    """Which training samples (positions into the train split) each global step uses.

    Epoch e is a seeded permutation of the split cut into ``batch_size`` chunks; a
    last partial chunk is dropped unless it is the only one.
    """

    size: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.size // self.batch_size)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def positions(self, step: int) -> Tensor:
        epoch, within = self.locate(step)
        order = self.epoch_order(epoch)
        return order[within * self.batch_size : (within + 1) * self.batch_size]

    def augment_seed(self, step: int) -> int:
        return seed_for(self.seed, "augment", *self.locate(step))

    def epoch_order(self, epoch: int) -> Tensor:
        return _permutation(self.size, seed_for(self.seed, "order", epoch))


@lru_cache(maxsize=4)
def _permutation(size: int, seed: int) -> Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True, eq=False)
class ClassBalancedPlan(BatchPlan):
    """``data.sampler=class_balanced``: every batch is ``per_class`` images of each of
    ``batch_size / per_class`` classes, the recipe of MCL/L-MCL's official CIFAR runs
    (64 classes x 2 images), so a supervised-contrastive anchor always has positives.

    Epoch e: each class's positions in a seeded order, read as a cycle; step s draws
    its classes without replacement (seeded by e and s) and takes the next
    ``per_class`` positions of each. The epoch keeps ``size // batch_size`` steps. All
    seeds derive from the run seed, so every peer, in any process, reads the same
    batches.
    """

    labels: Tensor | None = None  # the class of each position in the train split
    per_class: int = 2
    _epochs: dict[int, Tensor] = field(default_factory=dict, repr=False)  # the last epoch's batches

    def positions(self, step: int) -> Tensor:
        epoch, within = self.locate(step)
        if epoch not in self._epochs:
            self._epochs.clear()
            self._epochs[epoch] = _balanced_epoch(self, epoch)
        return self._epochs[epoch][within]

    @property
    def classes_per_batch(self) -> int:
        return self.batch_size // self.per_class


def _balanced_epoch(plan: ClassBalancedPlan, epoch: int) -> Tensor:
    """The (steps, batch_size) positions of one class-balanced epoch."""
    assert plan.labels is not None
    classes = plan.labels.unique()
    streams = []
    for c in classes.tolist():
        members = (plan.labels == c).nonzero().flatten()
        order = torch.randperm(
            len(members), generator=torch.Generator().manual_seed(seed_for(plan.seed, "cls", epoch, c))
        )
        streams.append(members[order])
    cursor = [0] * len(classes)
    batches = []
    for step in range(plan.steps_per_epoch):
        g = torch.Generator().manual_seed(seed_for(plan.seed, "classes", epoch, step))
        chosen = torch.randperm(len(classes), generator=g)[: plan.classes_per_batch].tolist()
        batch = []
        for k in chosen:
            stream = streams[k]
            take = (cursor[k] + torch.arange(plan.per_class)) % len(stream)
            batch.append(stream[take])
            cursor[k] += plan.per_class
        batches.append(torch.cat(batch))
    return torch.stack(batches)


def make_plan(config: DataConfig, labels: Tensor, seed: int) -> BatchPlan:
    """The batch plan ``data.sampler`` names, over a train split with these labels."""
    if config.sampler == "class_balanced":
        return ClassBalancedPlan(len(labels), config.batch_size, seed, labels=labels, per_class=config.per_class)
    return BatchPlan(len(labels), config.batch_size, seed)


# ------------------------------------------------------------------------- splits


class TensorSplit:
    """An in-memory split of uint8 images (N, C, H, W) with their labels."""

    def __init__(self, images: Tensor, labels: Tensor, info: DatasetInfo, augment: CropFlip | None) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, positions: Tensor, augment_seed: int | None = None) -> tuple[Tensor, Tensor]:
        images = self.images[positions]
        if augment_seed is not None and self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(augment_seed)
                images = self.augment(images)
        x = (images.float().div_(255) - self.mean) / self.std
        return x, self.labels[positions]

    def plan_batch(self, plan: BatchPlan, step: int) -> tuple[Tensor, Tensor]:
        return self.batch(plan.positions(step), plan.augment_seed(step))

    def eval_batches(self, batch_size: int = EVAL_BATCH) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


class SeededFolder(torch.utils.data.Dataset):
    """Image-folder samples addressed as (index, seed): the seed fixes the augmentation."""

    def __init__(self, folder, indices: Tensor, transform: v2.Transform) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[Tensor, int]:
        position, seed = item
        path, label = self.folder.samples[int(self.indices[position])]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            return self.transform(image), label


class FolderSplit:
    """A split read from an ImageFolder on demand (ImageNet-size data).

    Training batches stream: one DataLoader per epoch whose batch sampler is the rest
    of the epoch's batch plan, so its ``data.workers`` decode ahead of the step that
    needs them. A step out of that order (a resumed run, precise BN's batches) starts
    a new stream at that step.
    """

    def __init__(self, folder, indices: Tensor, transform: v2.Transform, workers: int, pin_memory: bool) -> None:
        self.dataset = SeededFolder(folder, indices, transform)
        self.workers, self.pin_memory = workers, pin_memory
        self._stream: Iterator[tuple[Tensor, Tensor]] | None = None
        self._next_step, self._stream_end = -1, -1

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, batches: Sequence[list[tuple[int, int | None]]]) -> Iterator[tuple[Tensor, Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.workers, pin_memory=self.pin_memory
        )
        for x, y in loader:
            yield x, torch.as_tensor(y)

    @staticmethod
    def _items(positions: Tensor, augment_seed: int | None) -> list[tuple[int, int | None]]:
        return [(int(p), None if augment_seed is None else augment_seed + i) for i, p in enumerate(positions)]

    def batch(self, positions: Tensor, augment_seed: int | None = None) -> tuple[Tensor, Tensor]:
        return next(iter(self._load([self._items(positions, augment_seed)])))

    def plan_batch(self, plan: BatchPlan, step: int) -> tuple[Tensor, Tensor]:
        if step != self._next_step or step >= self._stream_end:
            epoch, _ = plan.locate(step)
            self._stream_end = (epoch + 1) * plan.steps_per_epoch
            steps = range(step, self._stream_end)
            self._stream = self._load([self._items(plan.positions(s), plan.augment_seed(s)) for s in steps])
        self._next_step = step + 1
        return next(self._stream)

    def eval_batches(self, batch_size: int = EVAL_BATCH) -> Iterator[tuple[Tensor, Tensor]]:
        starts = range(0, len(self), batch_size)
        yield from self._load([[(i, None) for i in range(s, min(s + batch_size, len(self)))] for s in starts])


Split = TensorSplit | FolderSplit


@dataclass
class PeerData:
    """Everything one peer reads: the splits and the shared batch plan."""

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split
    plan: BatchPlan

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The (augmented) batch of global step ``step``: identical in every peer."""
        return self.train.plan_batch(self.plan, step)

    def eval_split(self, name: str) -> Split:
        split = {"test": self.test, "val": self.val}.get(name)
        if split is None:
            raise ValueError(f"no '{name}' split (val exists only when data.val_split > 0)")
        return split


# ------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: its input facts, its loader and its fail-fast check."""

    info: Callable[[DataConfig], DatasetInfo]  # without loading the data
    load: Callable[[DataConfig, DatasetInfo, int, bool], PeerData]  # (config, info, seed, pin_memory)
    check: Callable[[DataConfig], None]  # raises DataError naming the path and the fix


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def load_data(config: DataConfig, seed: int, pin_memory: bool = False) -> PeerData:
    """Load a dataset and carve the train / val / test splits of a run."""
    spec = DATASETS.get(config.name)
    return spec.load(config, spec.info(config), seed, pin_memory)


def check_available(config: DataConfig) -> None:
    """Fail fast, before any actor starts, if the dataset cannot be read."""
    DATASETS.get(config.name).check(config)


def split_indices(train_size: int, test_size: int, config: DataConfig, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(train, val, test) indices: a seeded ``data.train_subset`` of the training set
    whose last ``data.val_split`` fraction is held out, and a seeded test subset."""
    pool = _subset(train_size, config.train_subset, seed_for(seed, "train_subset"))
    n_val = round(len(pool) * config.val_split)
    test = _subset(test_size, config.test_subset, seed_for(seed, "test_subset"))
    return pool[: len(pool) - n_val], pool[len(pool) - n_val :], test


def in_memory(
    info: Callable[[DataConfig], DatasetInfo],
    arrays: Callable[[DataConfig], tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]],
) -> DatasetSpec:
    """A dataset held in memory as uint8 tensors, read by ``arrays(config)``."""

    def load(config: DataConfig, info: DatasetInfo, seed: int, pin_memory: bool) -> PeerData:
        (train_x, train_y), (test_x, test_y) = arrays(config)
        train_idx, val_idx, test_idx = split_indices(len(train_y), len(test_y), config, seed)
        augment = train_augmentation(info) if config.augment else None
        return PeerData(
            info=info,
            train=TensorSplit(train_x[train_idx], train_y[train_idx], info, augment),
            val=TensorSplit(train_x[val_idx], train_y[val_idx], info, None) if len(val_idx) else None,
            test=TensorSplit(test_x[test_idx], test_y[test_idx], info, None),
            plan=make_plan(config, train_y[train_idx], seed),
        )

    return DatasetSpec(info=info, load=load, check=arrays)  # arrays are cached per process


def _subset(total: int, keep: int | None, seed: int) -> Tensor:
    """First ``keep`` indices of a seeded shuffle (all of them, shuffled, if None)."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order if keep is None else order[:keep]


def train_augmentation(info: DatasetInfo) -> CropFlip:
    """Light augmentation for uint8 image batches: random crop with padding + flip."""
    return CropFlip(info.image_size, padding=2 if info.image_size <= 28 else 4)


def fashion_root(config: DataConfig) -> Path:
    return FASHION_MNIST_ROOT if config.root is None else Path(config.root)


def fashion_mnist_arrays(config: DataConfig):
    return _fashion_mnist(str(fashion_root(config)), config.download)


def cifar_arrays(config: DataConfig):
    if config.root is None:
        raise DataError(
            f"data.root: {config.name} needs data.root (a folder holding the extracted "
            "python-version archive, or any folder together with data.download=true)"
        )
    return _cifar(config.name, str(config.root), config.download)


def synthetic_info(config: DataConfig) -> DatasetInfo:
    s = config.synthetic
    return DatasetInfo(s.channels, s.num_classes, s.image_size, (0.5,) * s.channels, (0.25,) * s.channels)


def synthetic_arrays(config: DataConfig):
    s = config.synthetic
    return _synthetic(s.channels, s.image_size, s.num_classes, s.train_size, s.test_size)


@lru_cache(maxsize=2)
def _fashion_mnist(root: str, download: bool):
    folder = Path(root)
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root, train=True, download=True)
        FashionMNIST(root, train=False, download=True)
        folder = folder / "FashionMNIST" / "raw"
    arrays = []
    for split in ("train", "test"):
        image_stem, label_stem = FASHION_FILES[split]
        images = read_idx(_find_idx(folder, image_stem), ndim=3)
        labels = read_idx(_find_idx(folder, label_stem), ndim=1)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        arrays.append((images.unsqueeze(1), labels.long()))
    return tuple(arrays)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"data.root: no Fashion-MNIST file {stem}(.gz) in {folder}; install it with "
        "'apt-get install -y dataset-fashion-mnist', point data.root at a folder holding "
        "the idx files, or set data.download=true"
    )


def read_idx(path: Path, ndim: int) -> Tensor:
    """Read an IDX file (the MNIST format) of unsigned bytes, gzipped or not."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: unreadable ({error}); reinstall dataset-fashion-mnist or re-download") from None
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 + 4 * ndim or magic != 0x0800 + ndim:
        raise DataError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {magic:#x}); the file is corrupt")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    expected = 1
    for d in dims:
        expected *= d
    if len(body) != expected:
        raise DataError(f"{path}: truncated or corrupt (header says {dims}, found {len(body)} of {expected} bytes)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


@lru_cache(maxsize=2)
def _cifar(name: str, root: str, download: bool):
    """CIFAR through torchvision, which verifies each file's official MD5 before
    unpickling it, so no arbitrary pickle from data.root is ever loaded."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    arrays = []
    for train in (True, False):
        try:
            dataset = dataset_class(root, train=train, download=download)
        except RuntimeError:
            raise DataError(
                f"data.root: no intact {name} under {root} (expected '{dataset_class.base_folder}' "
                "with the official files); set data.download=true to fetch it or extract the "
                "python-version archive there"
            ) from None
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        arrays.append((images, torch.tensor(dataset.targets, dtype=torch.long)))
    return tuple(arrays)


@lru_cache(maxsize=4)
def _synthetic(channels: int, size: int, classes: int, n_train: int, n_test: int):
    """Seeded random images: a per-class template plus noise (learnable, for tests)."""
    generator = torch.Generator().manual_seed(1234)
    templates = torch.randn(classes, channels, size, size, generator=generator)

    def make(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(classes, (n,), generator=generator)
        noise = torch.randn(n, channels, size, size, generator=generator)
        images = (templates[labels] + 0.8 * noise).mul(40).add(128).clamp(0, 255)
        return images.to(torch.uint8), labels

    return make(n_train), make(n_test)


def image_folder_root(config: DataConfig) -> Path:
    if config.root is None:
        raise DataError(f"data.root: {config.name} needs data.root (a folder with train/ and val/ ImageFolder trees)")
    return Path(config.root)


def image_folder_info(config: DataConfig) -> DatasetInfo:
    """ImageNet's input facts, with as many classes as the train/ folder has."""
    classes = [p for p in (image_folder_root(config) / "train").iterdir() if p.is_dir()]
    info = IMAGENET_INFO
    return DatasetInfo(info.channels, len(classes), info.image_size, info.mean, info.std)


def check_image_folders(config: DataConfig) -> None:
    for split in ("train", "val"):
        if not (image_folder_root(config) / split).is_dir():
            raise DataError(
                f"data.root: no folder '{image_folder_root(config) / split}'; {config.name} needs "
                "<root>/train/<class>/<images> and <root>/val/<class>/<images>"
            )


def load_image_folders(config: DataConfig, info: DatasetInfo, seed: int, pin_memory: bool) -> PeerData:
    from torchvision.datasets import ImageFolder

    root = image_folder_root(config)
    train_folder, test_folder = ImageFolder(root / "train"), ImageFolder(root / "val")
    size = info.image_size
    normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    test_tf = v2.Compose([v2.Resize(size * 8 // 7), v2.CenterCrop(size), *normalise])
    train_tf = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *normalise])
    if not config.augment:
        train_tf = test_tf
    train_idx, val_idx, test_idx = split_indices(len(train_folder), len(test_folder), config, seed)

    def split(folder, indices: Tensor, transform: v2.Transform) -> FolderSplit:
        return FolderSplit(folder, indices, transform, config.workers, pin_memory)

    return PeerData(
        info=info,
        train=split(train_folder, train_idx, train_tf),
        val=split(train_folder, val_idx, test_tf) if len(val_idx) else None,
        test=split(test_folder, test_idx, test_tf),
        plan=make_plan(config, torch.tensor(train_folder.targets)[train_idx], seed),
    )


DATASETS.add("fashion_mnist", in_memory(lambda config: FASHION_MNIST_INFO, fashion_mnist_arrays))
DATASETS.add("cifar10", in_memory(lambda config: CIFAR10_INFO, cifar_arrays))
DATASETS.add("cifar100", in_memory(lambda config: CIFAR100_INFO, cifar_arrays))
DATASETS.add("imagenet", DatasetSpec(image_folder_info, load_image_folders, check_image_folders))
DATASETS.add("synthetic", in_memory(synthetic_info, synthetic_arrays))
