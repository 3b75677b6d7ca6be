"""SR data sets: pairs of (LR, HR) images for training (random patches) and evaluation (whole images).

Every item is a dict::

    {"lr": float32 [3, h, w] in [0, 1], "hr": float32 [3, s*h, s*w] in [0, 1], "name": str}

which ``torch.utils.data.default_collate`` batches into ``lr [B, 3, h, w]``, ``hr [B, 3, s*h, s*w]``
and a list of names. Training mode (``train=True``) returns a random ``patch_size x patch_size`` LR
patch (size in LR pixels; the HR patch is ``scale`` times larger and aligned with it), randomly
flipped / rotated by multiples of 90 degrees (the 8 symmetries of the square); ``len()`` is ``repeat``
times the number of images, so ``repeat`` sets the epoch length. Evaluation mode returns whole
images, the HR cropped to ``scale`` times the LR size.

Random choices use torch's global RNG, which ``DataLoader`` seeds per worker: ``torch.manual_seed`` in
the main process makes training data reproducible.

- ``HRImageDataset``: HR images given in memory (e.g. ``samples.train_val_split()``); LR made with a
  degradation (BI / BD / DN, ``degradations.py``) once per image at construction; DN noise is drawn
  afresh for every training patch (fixed per image, from ``seed``, in evaluation mode).
  Training sets can add a ``pyramid``: copies of every HR image downscaled by given factors, which gives
  a small set more detailed content per patch (see ``pyramid_copies``).
- ``HRFolderDataset``: the same for a folder of HR images (decoded once, kept in memory).
- ``DegradedFolderDataset``: whole HR images of a folder read one at a time, LR made on the fly, for
  evaluating on plain photos.
- ``PairedFolderDataset``: HR and stored LR folders (DIV2K, or ``<set>/HR`` + ``<set>/LR_bicubic/X{s}``),
  matched by file stem; an LR stem may carry the ``x{s}`` suffix of DIV2K (``0001x2.png``).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dlsn.data.degradations import add_noise, degrade, normalize_degradation, quantize_8bit
from dlsn.data.imresize import imresize
from dlsn.errors import UserInputError, one_line
from dlsn.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    list_images,
    read_image,
    tensor_to_uint8,
    uint8_to_tensor,
)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# Transforms shared by training and self-ensemble


def dihedral(image: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """One of the 8 symmetries of the square on the last two dims of ``image``.

    Bits of ``k``: 1 flips left-right, 2 flips top-bottom, 4 transposes (swaps H and W); the forward
    transform flips, then transposes. ``inverse=True`` undoes it, so
    ``dihedral(dihedral(x, k), k, inverse=True)`` is ``x`` for every k in 0..7.
    """
    if not 0 <= k < 8:
        raise ValueError(f"dihedral transform index must be in 0..7, got {k}")
    hflip, vflip, transpose = bool(k & 1), bool(k & 2), bool(k & 4)
    flip_dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    if inverse and transpose:
        image = image.transpose(-1, -2)
    if flip_dims:
        image = image.flip(flip_dims)
    if not inverse and transpose:
        image = image.transpose(-1, -2)
    return image


def random_patch_pair(lr: np.ndarray, hr: np.ndarray, scale: int, patch_size: int,
                      generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Aligned random crops: an LR ``patch_size`` square and the HR ``scale * patch_size`` square over it.

    ``lr`` and ``hr`` are ``[H, W, C]`` arrays with ``hr`` at least ``scale`` times ``lr``.
    """
    lr_h, lr_w = lr.shape[:2]
    if lr_h < patch_size or lr_w < patch_size:
        raise ValueError(f"LR image {lr_w}x{lr_h} is smaller than the patch size {patch_size}")
    top = int(torch.randint(0, lr_h - patch_size + 1, (1,), generator=generator))
    left = int(torch.randint(0, lr_w - patch_size + 1, (1,), generator=generator))
    lr_patch = lr[top:top + patch_size, left:left + patch_size]
    hr_size = patch_size * scale
    hr_patch = hr[top * scale:top * scale + hr_size, left * scale:left * scale + hr_size]
    return lr_patch, hr_patch


def random_dihedral_pair(lr: torch.Tensor, hr: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip/90-degree-rotation (one of 8) applied to both tensors."""
    k = int(torch.randint(0, 8, (1,), generator=generator))
    return dihedral(lr, k).contiguous(), dihedral(hr, k).contiguous()


# --------------------------------------------------------------------------------------------------
# Base: patch sampling and item building over (lr, hr) uint8 pairs


class _PairDataset(Dataset, abc.ABC):
    """Common item logic; subclasses provide ``names`` and ``_load_pair(i) -> (lr, hr)`` uint8 HWC arrays."""

    names: list[str]

    def __init__(self, scale: int, train: bool, patch_size: int, repeat: int, augment: bool) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        if train and (not isinstance(patch_size, int) or patch_size < 1):
            raise ValueError(f"patch_size must be a positive integer (LR pixels), got {patch_size!r}")
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
        self.scale = scale
        self.train = train
        self.patch_size = patch_size
        self.repeat = repeat
        self.augment = augment

    @abc.abstractmethod
    def _load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(LR, HR) uint8 arrays of image ``index``; each subclass says where they come from."""

    def _noise_sigma_for_training(self) -> float | None:
        """DN noise to add to each training LR patch (None: the stored LR is final)."""
        return None

    def _check_patch_fits(self, name: str, lr_size: tuple[int, int]) -> None:
        lr_h, lr_w = lr_size
        if self.train and (lr_h < self.patch_size or lr_w < self.patch_size):
            raise ValueError(f"image {name!r}: LR size {lr_w}x{lr_h} is smaller than the patch size "
                             f"{self.patch_size} (LR pixels); lower patch_size or drop the image")

    def __len__(self) -> int:
        return len(self.names) * (self.repeat if self.train else 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} items")
        image_index = (index % len(self)) % len(self.names)
        lr, hr = self._load_pair(image_index)
        if self.train:
            lr, hr = random_patch_pair(lr, hr, self.scale, self.patch_size)
        lr_tensor, hr_tensor = uint8_to_tensor(lr), uint8_to_tensor(hr)
        if self.train:
            noise_sigma = self._noise_sigma_for_training()
            if noise_sigma is not None:
                lr_tensor = add_noise(lr_tensor, noise_sigma)
            if self.augment:
                lr_tensor, hr_tensor = random_dihedral_pair(lr_tensor, hr_tensor)
        return {"lr": lr_tensor, "hr": hr_tensor, "name": self.names[image_index]}


# --------------------------------------------------------------------------------------------------
# HR images with LR made by a degradation


def check_pyramid(pyramid: Sequence[float]) -> tuple[float, ...]:
    """The pyramid factors as a tuple; each must lie strictly between 0 and 1."""
    factors = tuple(float(f) for f in pyramid)
    for factor in factors:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"pyramid factors must lie strictly between 0 and 1, got {factor!r}")
    return factors


def pyramid_copies(images: Mapping[str, np.ndarray], factors: Sequence[float],
                   min_size: int = 1) -> dict[str, np.ndarray]:
    """``images`` plus, for each factor, a copy of every image downscaled by it (``"name@0.5"``).

    Downscaling uses MATLAB-style antialiased bicubic and rounds to 8 bits, as the LR images are made.
    A smaller copy of a photo packs more detail into each pixel, so a short run on a few photos sees
    patches whose statistics are closer to other photos'. Copies smaller than ``min_size`` pixels on a
    side are left out.
    """
    result = dict(images)
    for factor in check_pyramid(factors):
        for name, image in images.items():
            hr = uint8_to_tensor(image, dtype=torch.float64)
            small = tensor_to_uint8(quantize_8bit(imresize(hr, factor).clamp(0.0, 1.0)))
            if min(small.shape[:2]) >= min_size:
                result[f"{name}@{factor:g}"] = small
    return result


def _crop_to_multiple(image: np.ndarray, scale: int, name: str) -> np.ndarray:
    height, width = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    if height == 0 or width == 0:
        raise ValueError(f"image {name!r} of size {image.shape[1]}x{image.shape[0]} "
                         f"is smaller than the scale {scale}")
    return image[:height, :width]


class HRImageDataset(_PairDataset):
    """HR images in memory; LR made with ``degradation`` (each HR cropped to a multiple of ``scale`` first).

    images: ``{name: [H, W, 3] uint8}`` or a sequence of such arrays (named ``image_000``, ...).
    degradation: "BI", "BD" or "DN"; DN needs ``noise_sigma`` (0-255 scale).
    train: random ``patch_size`` LR patches with flips/rotations (``augment``), ``repeat`` passes per epoch;
        otherwise whole images.
    pyramid: training only; factors in (0, 1) that add a downscaled copy of every image per factor
        (``pyramid_copies``; copies too small for a patch are left out).
    seed: seeds the DN noise of evaluation mode (image i uses seed + i), so validation is repeatable.
    """

    def __init__(
        self,
        images: Mapping[str, np.ndarray] | Sequence[np.ndarray],
        scale: int,
        *,
        degradation: str = "BI",
        noise_sigma: float | None = None,
        train: bool = True,
        patch_size: int = 48,
        repeat: int = 1,
        augment: bool = True,
        seed: int = 0,
        pyramid: Sequence[float] = (),
    ) -> None:
        super().__init__(scale, train, patch_size, repeat, augment)
        if pyramid and not train:
            raise ValueError("pyramid copies are for training sets only (train=True)")
        self.degradation = normalize_degradation(degradation)
        if self.degradation == "DN" and (noise_sigma is None or noise_sigma < 0):
            raise ValueError(f"degradation DN needs noise_sigma >= 0 (0-255 scale), got {noise_sigma!r}")
        self.noise_sigma = noise_sigma
        self.seed = seed
        if isinstance(images, Mapping):
            named = dict(images)
        else:
            named = {f"image_{i:03d}": image for i, image in enumerate(images)}
        if not named:
            raise ValueError("no images given")
        for name, image in named.items():
            self._check_image(name, image)
        if pyramid:  # the copies are made from checked images, so they need no check of their own
            named = pyramid_copies(named, pyramid, min_size=scale * patch_size)
        self.names = list(named)
        self.hr_images: list[np.ndarray] = []
        self.lr_images: list[np.ndarray] = []
        for i, (name, image) in enumerate(named.items()):
            hr = _crop_to_multiple(image, scale, name)
            self._check_patch_fits(name, (hr.shape[0] // scale, hr.shape[1] // scale))
            self.hr_images.append(hr)
            self.lr_images.append(self._make_lr(hr, i))

    @staticmethod
    def _check_image(name: str, image: object) -> None:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
                and image.ndim == 3 and image.shape[2] == 3):
            kind = getattr(image, "dtype", type(image).__name__)
            raise ValueError(f"image {name!r} must be a [H, W, 3] uint8 array, got "
                             f"{kind} {getattr(image, 'shape', '')}")

    def _make_lr(self, hr: np.ndarray, index: int) -> np.ndarray:
        hr_tensor = uint8_to_tensor(hr, dtype=torch.float32)
        if self.degradation == "DN" and self.train:
            # Keep the clean 8-bit bicubic LR; fresh noise is added to every training patch.
            lr = degrade(hr_tensor, self.scale, "BI")
        else:
            generator = torch.Generator().manual_seed(self.seed + index)
            lr = degrade(hr_tensor, self.scale, self.degradation,
                         noise_sigma=self.noise_sigma, generator=generator)
        return tensor_to_uint8(quantize_8bit(lr))

    def _noise_sigma_for_training(self) -> float | None:
        return self.noise_sigma if self.degradation == "DN" else None

    def _load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.lr_images[index], self.hr_images[index]


class HRFolderDataset(HRImageDataset):
    """``HRImageDataset`` over every image file in ``folder`` (decoded once, kept in memory).

    Names are file stems. Takes the keyword arguments of ``HRImageDataset``.
    """

    def __init__(self, folder: PathLike, scale: int, **kwargs) -> None:
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.folder = Path(folder)
        super().__init__({p.stem: read_image(p) for p in paths}, scale, **kwargs)


class DegradedFolderDataset(Dataset):
    """Whole HR images of a folder for evaluation, read one at a time, with LR made by ``degradation``.

    For test sets kept as plain photos (no stored LR). Each HR image is cropped to a multiple of
    ``scale``; DN noise is seeded per image (``seed + index``), so scores repeat. An unreadable or too
    small file raises :class:`~dlsn.errors.UserInputError` naming it when its item is read, so an
    evaluation can go on with the other images. ``conversions`` collects, per name, what reading a
    file changed (e.g. "RGBA, alpha dropped"), for the tools to report.
    """

    def __init__(self, folder: PathLike, scale: int, *, degradation: str = "BI",
                 noise_sigma: float | None = None, seed: int = 0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        self.degradation = normalize_degradation(degradation)
        if self.degradation == "DN" and (noise_sigma is None or noise_sigma < 0):
            raise ValueError(f"degradation DN needs noise_sigma >= 0 (0-255 scale), got {noise_sigma!r}")
        self.folder, self.scale, self.noise_sigma, self.seed = Path(folder), scale, noise_sigma, seed
        self.paths = list_images(self.folder)
        if not self.paths:
            raise ValueError(f"no images in {self.folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.names = [p.stem for p in self.paths]
        self.conversions: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        path = self.paths[index]
        image, conversion = decode_image(path)
        if conversion is not None:
            self.conversions[path.name] = conversion
        try:
            hr = _crop_to_multiple(image, self.scale, path.name)
        except ValueError as error:
            raise UserInputError(str(error)) from error
        hr_tensor = uint8_to_tensor(hr)
        generator = torch.Generator().manual_seed(self.seed + index)
        lr = degrade(hr_tensor, self.scale, self.degradation, noise_sigma=self.noise_sigma, generator=generator)
        return {"lr": lr, "hr": hr_tensor, "name": self.names[index]}


# --------------------------------------------------------------------------------------------------
# Stored HR / LR folders


def lr_key(stem: str, scale: int) -> str:
    """The HR stem an LR file stem belongs to: a trailing ``x{scale}`` / ``X{scale}`` is dropped."""
    for suffix in (f"x{scale}", f"X{scale}"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def match_pairs(hr_dir: PathLike, lr_dir: PathLike, scale: int) -> list[tuple[str, Path, Path]]:
    """``[(stem, hr_path, lr_path)]`` sorted by stem, LR files matched to HR files by stem.

    Raises FileNotFoundError for a missing folder and ValueError when a folder has no images, two LR files
    claim one HR image, or an HR image has no LR file. LR files without an HR image are ignored.
    """
    hr_dir, lr_dir = Path(hr_dir), Path(lr_dir)
    hr_paths = list_images(hr_dir)
    if not hr_paths:
        raise ValueError(f"no HR images in {hr_dir}")
    lr_paths = list_images(lr_dir)
    if not lr_paths:
        raise ValueError(f"no LR images in {lr_dir}")
    lr_by_key: dict[str, Path] = {}
    for path in lr_paths:
        key = lr_key(path.stem, scale)
        if key in lr_by_key:
            raise ValueError(f"LR files {lr_by_key[key].name} and {path.name} in {lr_dir} "
                             f"both match HR stem {key!r}")
        lr_by_key[key] = path
    missing = [p.name for p in hr_paths if p.stem not in lr_by_key]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} HR image(s) in {hr_dir} have no LR file in {lr_dir} "
                         f"(expected NAME.png or NAMEx{scale}.png): {shown}")
    return [(p.stem, p, lr_by_key[p.stem]) for p in hr_paths]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"cannot read image {path}: {one_line(error)}") from error
    return height, width


def hr_crop_for(lr_size: tuple[int, int], hr_size: tuple[int, int], scale: int, name: str) -> tuple[int, int]:
    """HR size to crop to (``scale`` times the LR size); ValueError when the two do not belong together.

    An HR image may exceed ``scale * LR`` by less than ``scale`` pixels (LR made from a modcropped HR).
    """
    (lr_h, lr_w), (hr_h, hr_w) = lr_size, hr_size
    target = (lr_h * scale, lr_w * scale)
    if not (target[0] <= hr_h < target[0] + scale and target[1] <= hr_w < target[1] + scale):
        raise ValueError(f"image {name!r}: HR size {hr_w}x{hr_h} does not match LR size {lr_w}x{lr_h} "
                         f"at scale x{scale} (expected HR {target[1]}x{target[0]}, "
                         f"or up to {scale - 1} pixels more)")
    return target


class PairedFolderDataset(_PairDataset):
    """HR images and their stored LR images, matched by file stem (see ``match_pairs``).

    hr_dir, lr_dir: the two folders; ``from_div2k`` and ``from_test_set`` build them from the usual layouts.
    train: random ``patch_size`` LR patches (``augment``: flips/rotations), ``repeat`` passes per epoch;
        otherwise whole images with the HR cropped to ``scale`` times the LR size.
    cache: decode every image once at construction and keep it (DIV2K x2 train: about 8 GB); with False,
        files are decoded at every access (sizes are still checked up front from the headers).
    skip_unreadable: a pair with a file that cannot be read is left out and listed in ``failed``
        (``(file name, reason)``) instead of raising :class:`~dlsn.errors.UserInputError`. Without it and
        with ``cache=False``, such a pair raises that error when its item is read (as
        ``DegradedFolderDataset`` does), so an evaluation can go on with the other images.
    """

    def __init__(
        self,
        hr_dir: PathLike,
        lr_dir: PathLike,
        scale: int,
        *,
        train: bool = True,
        patch_size: int = 48,
        repeat: int = 1,
        augment: bool = True,
        cache: bool = True,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__(scale, train, patch_size, repeat, augment)
        self.hr_dir, self.lr_dir = Path(hr_dir), Path(lr_dir)
        self.cache = cache
        self.conversions: dict[str, str] = {}  # file name -> what reading it as 8-bit RGB changed
        self.failed: list[tuple[str, str]] = []  # (file name, why it was left out), with skip_unreadable
        self._cached: list[tuple[np.ndarray, np.ndarray]] = []
        self.names, self.paths = [], []
        for name, hr_path, lr_path in match_pairs(self.hr_dir, self.lr_dir, scale):
            try:
                if cache:
                    lr, hr = self._read(lr_path), self._read(hr_path)
                    lr_size, hr_size = lr.shape[:2], hr.shape[:2]
                else:
                    lr_size, hr_size = _image_size(lr_path), _image_size(hr_path)
            except UserInputError as error:
                if skip_unreadable:
                    bad = lr_path if str(lr_path) in str(error) else hr_path
                    self.failed.append((f"{bad.parent.name}/{bad.name}", one_line(error)))
                    continue
                if cache:
                    raise
                lr_size = hr_size = None  # read (and refused) at access
            if lr_size is not None and hr_size is not None:
                crop = hr_crop_for(lr_size, hr_size, scale, name)
                self._check_patch_fits(name, lr_size)
                if cache:
                    self._cached.append((lr, hr[: crop[0], : crop[1]]))
            self.names.append(name)
            self.paths.append((hr_path, lr_path))
        if not self.names:
            raise UserInputError(f"no readable image pairs in {self.hr_dir} and {self.lr_dir}: "
                                 + "; ".join(f"{n} ({why})" for n, why in self.failed))

    def _read(self, path: Path) -> np.ndarray:
        image, conversion = decode_image(path)
        if conversion is not None:
            self.conversions[path.name] = conversion
        return image

    @classmethod
    def from_div2k(cls, root: PathLike, scale: int, split: str = "train", track: str = "bicubic",
                   **kwargs) -> PairedFolderDataset:
        """DIV2K layout: ``root/DIV2K_{split}_HR/NNNN.png``
        and ``root/DIV2K_{split}_LR_{track}/X{s}/NNNNx{s}.png``."""
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"DIV2K folder not found: {root}")
        lr_dir = root / f"DIV2K_{split}_LR_{track}" / f"X{scale}"
        return cls(root / f"DIV2K_{split}_HR", lr_dir, scale, **kwargs)

    @classmethod
    def from_test_set(cls, set_dir: PathLike, scale: int, **kwargs) -> PairedFolderDataset:
        """Test-set layout ``set_dir/HR/*.png`` + ``set_dir/LR_bicubic/X{s}/*.png`` (whole images)."""
        set_dir = Path(set_dir)
        if not set_dir.is_dir():
            raise FileNotFoundError(f"test set folder not found: {set_dir}")
        kwargs.setdefault("train", False)
        return cls(set_dir / "HR", set_dir / "LR_bicubic" / f"X{scale}", scale, **kwargs)

    def _load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache:
            return self._cached[index]
        hr_path, lr_path = self.paths[index]
        lr, hr = self._read(lr_path), self._read(hr_path)
        crop = hr_crop_for(lr.shape[:2], hr.shape[:2], self.scale, self.names[index])
        return lr, hr[: crop[0], : crop[1]]
