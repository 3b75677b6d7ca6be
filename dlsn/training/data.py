"""The data of a training run: training and validation sets for ``--data``, and the order patches come in."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset

from dlsn.cli import format_failures
from dlsn.data import prepare, samples
from dlsn.data.datasets import HRImageDataset, PairedFolderDataset
from dlsn.errors import UserInputError, one_line
from dlsn.images import IMAGE_EXTENSIONS, decode_image, list_images

from .processes import Processes
from .settings import Settings, TrainError


@dataclass
class Data:
    train: Dataset
    val: Dataset  # periodic validation (centre crops)
    val_full: Dataset  # the final score (whole images)
    description: str
    conversions: list[tuple[str, str]] = field(default_factory=list)  # (file, what reading it changed)
    # (file, why): unreadable images left out; the run trains on the rest, lists them and exits with 1
    failed: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0  # image files found, readable or not (for the failure line)


def read_images(paths: Sequence[Path], conversions: list[tuple[str, str]],
                failed: list[tuple[str, str]]) -> dict[str, Any]:
    """``{stem: [H, W, 3] uint8}`` of every readable file. Like eval and upscale, training goes on with
    the readable images: each unreadable one goes to ``failed`` (file name, reason), conversions to
    8-bit RGB go to ``conversions``. No readable image at all is an error."""
    images = {}
    for path in paths:
        try:
            images[path.stem], conversion = decode_image(path)
        except UserInputError as error:
            failed.append((path.name, one_line(error)))
            continue
        if conversion is not None:
            conversions.append((path.name, conversion))
    if paths and not images:
        raise TrainError(f"no readable image: {format_failures(failed, len(paths))}")
    return images


def _is_div2k(folder: Path) -> bool:
    return (folder / "DIV2K_train_HR").is_dir()


def _with_crops(images: dict, crop: int) -> dict:
    return {name: samples.center_crop(image, crop) for name, image in images.items()} if crop else images


def _hr_split_datasets(train_images: dict, val_images: dict, s: Settings) -> tuple[Dataset, Dataset, Dataset]:
    common = {"degradation": s.degradation, "noise_sigma": s.noise_sigma, "seed": s.seed}
    train = HRImageDataset(train_images, s.scale, train=True, patch_size=s.patch_size, pyramid=s.pyramid,
                           **common)
    val_full = HRImageDataset(val_images, s.scale, train=False, **common)
    val = HRImageDataset(_with_crops(val_images, s.val_crop), s.scale, train=False, **common) \
        if s.val_crop else val_full
    return train, val, val_full


def _pyramid_note(s: Settings) -> str:
    if not s.pyramid:
        return ""
    return f" (plus copies downscaled by {', '.join(f'{f:g}' for f in s.pyramid)})"


def build_data(s: Settings) -> Data:
    """Training set and validation sets for the settings (``python -m dlsn.train --help``, Data)."""
    if s.data is None:
        train_images, val_images = samples.train_val_split()
        try:
            train, val, val_full = _hr_split_datasets(train_images, val_images, s)
        except ValueError as error:  # settings that do not fit the photos, e.g. a patch larger than one
            raise TrainError(f"the embedded photos: {one_line(error)}") from error
        desc = (f"embedded photos: {len(train_images)} for training{_pyramid_note(s)}, "
                f"held out {', '.join(val_images)}")
        return Data(train, val, val_full, desc)

    root = s.data
    if not root.exists():
        raise TrainError(f"--data folder not found: {root}")
    if not root.is_dir():
        raise TrainError(f"--data must be a folder (DIV2K root or a folder of images), got file {root}")
    if prepare.is_prepared(root):
        return _prepared_data(root, s)
    if _is_div2k(root):
        return _div2k_data(root, s)

    paths = list_images(root)
    if not paths:
        raise TrainError(f"--data {root}: no images found directly inside it (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}), it is not a DIV2K root (no DIV2K_train_HR/ and "
                         f"DIV2K_train_LR_bicubic/X<s>/) and not a folder from python -m dlsn.data.prepare "
                         f"(no {prepare.MANIFEST})")
    conversions: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    try:
        images = read_images(paths, conversions, failed)
    except TrainError as error:
        raise TrainError(f"--data {root}: {one_line(error)}") from error
    n_val = s.val_images or (2 if len(images) >= 4 else 1)
    if len(images) <= n_val:
        unreadable = f" readable (of {len(paths)})" if failed else ""
        raise TrainError(f"--data {root}: {len(images)} image(s){unreadable}; need more than the {n_val} held "
                         f"out for validation (lower --val-images or add images)")
    try:
        names = list(images)
        train_images = {n: images[n] for n in names[:-n_val]}
        val_images = {n: images[n] for n in names[-n_val:]}
        train, val, val_full = _hr_split_datasets(train_images, val_images, s)
    except ValueError as error:
        raise TrainError(f"--data {root}: {one_line(error)}") from error
    desc = (f"{root}: {len(train_images)} HR images for training{_pyramid_note(s)}, "
            f"held out {', '.join(val_images)}")
    return Data(train, val, val_full, desc, conversions, failed, len(paths))


def _prepared_data(root: Path, s: Settings) -> Data:
    """A folder written by ``python -m dlsn.data.prepare``: patches read from memory-mapped pixels."""
    try:
        train, val, val_full, desc = prepare.training_sets(
            root, s.scale, patch_size=s.patch_size, degradation=s.degradation, noise_sigma=s.noise_sigma,
            seed=s.seed, n_val=s.val_images or 10, val_crop=s.val_crop, pyramid=s.pyramid)
    except (ValueError, FileNotFoundError) as error:
        raise TrainError(f"--data {root} (prepared): {one_line(error)}") from error
    return Data(train, val, val_full, desc)


def _div2k_data(root: Path, s: Settings) -> Data:
    try:
        return _div2k_datasets(root, s)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise TrainError(f"--data {root} (DIV2K layout): {one_line(error)}") from error


def _div2k_datasets(root: Path, s: Settings) -> Data:
    n_val = s.val_images or 10
    conversions: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    train_hr = list_images(root / "DIV2K_train_HR")
    if s.degradation == "BI":
        paired = PairedFolderDataset.from_div2k(root, s.scale, "train", train=True, patch_size=s.patch_size,
                                                skip_unreadable=True)
        conversions += list(paired.conversions.items())
        failed += paired.failed
        train: Dataset = paired
    else:
        train = HRImageDataset(read_images(train_hr, conversions, failed), s.scale, train=True,
                               patch_size=s.patch_size, degradation=s.degradation,
                               noise_sigma=s.noise_sigma, seed=s.seed, pyramid=s.pyramid)
    desc = f"DIV2K at {root}: {len(train)} training images"
    valid_hr = root / "DIV2K_valid_HR"
    if valid_hr.is_dir():
        paths = list_images(valid_hr)[:n_val]
        images = read_images(paths, conversions, failed)
        if s.degradation == "BI" and (root / "DIV2K_valid_LR_bicubic" / f"X{s.scale}").is_dir():
            full = PairedFolderDataset.from_div2k(root, s.scale, "valid", train=False, cache=False,
                                                  skip_unreadable=True)
            failed += [item for item in full.failed if item not in failed]
            val_full: Dataset = Subset(full, range(min(n_val, len(full))))
        else:
            val_full = HRImageDataset(images, s.scale, train=False, degradation=s.degradation,
                                      noise_sigma=s.noise_sigma, seed=s.seed)
        val = HRImageDataset(_with_crops(images, s.val_crop), s.scale, train=False,
                             degradation=s.degradation, noise_sigma=s.noise_sigma, seed=s.seed) \
            if s.val_crop else val_full
        return Data(train, val, val_full, desc + f", validation on {len(val_full)} of DIV2K_valid",
                    conversions, failed, len(train_hr) + len(paths))
    # No validation split: hold nothing out, validate on a few training images (said so in the log).
    images = read_images(train_hr[:n_val], conversions, [])  # their failures are listed already
    val = HRImageDataset(_with_crops(images, s.val_crop), s.scale, train=False, degradation=s.degradation,
                         noise_sigma=s.noise_sigma, seed=s.seed)
    return Data(train, val, val, desc + " (no DIV2K_valid_HR: validating on training images)",
                list(dict.fromkeys(conversions)), list(dict.fromkeys(failed)), len(train_hr))


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one process: a permutation seeded by (seed, epoch), padded to a
    multiple of the process count and dealt out round-robin; ``skip`` drops the first indices
    (resuming mid-epoch without loading the batches already seen)."""

    def __init__(self, size: int, seed: int, procs: Processes) -> None:
        self.size, self.seed, self.procs = size, seed, procs
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_process(self) -> int:
        return math.ceil(self.size / self.procs.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        total = self.per_process() * self.procs.world
        order += order[: total - len(order)]
        return iter(order[self.procs.rank::self.procs.world][self.skip:])

    def __len__(self) -> int:
        return max(0, self.per_process() - self.skip)


class DetailedPatches(Dataset):
    """Training patches with some detail: a patch whose HR mean absolute gradient (0-255 scale) is
    below ``min_detail`` is drawn again, up to ``tries`` draws (then the most detailed draw is kept).

    Flat patches (sky, black backgrounds: most of ``retina``, half of ``rocket`` in the embedded
    photos) teach a short run almost nothing. Wraps a training data set with random patches.
    """

    def __init__(self, dataset: Dataset, min_detail: float, tries: int = 8) -> None:
        self.dataset, self.min_detail, self.tries = dataset, float(min_detail), tries

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def detail(hr: Tensor) -> float:
        """Mean absolute difference of neighbouring pixels of ``hr [3, H, W]`` (in [0, 1]), 0-255 scale."""
        vertical = (hr[:, 1:, :] - hr[:, :-1, :]).abs().mean()
        horizontal = (hr[:, :, 1:] - hr[:, :, :-1]).abs().mean()
        return 127.5 * float(vertical + horizontal)

    def __getitem__(self, index: int) -> dict[str, Any]:
        best, best_detail = None, -1.0
        for _ in range(self.tries):
            item = self.dataset[index]
            value = self.detail(item["hr"])
            if value >= self.min_detail:
                return item
            if value > best_detail:
                best, best_detail = item, value
        return best


def quiet_worker(_: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process saves and stops,
    # so the workers must not die first with a KeyboardInterrupt of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
