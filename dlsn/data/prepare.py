"""Decode DIV2K once into memory-mapped files, so that training reads patches without decoding PNGs.

    python -m dlsn.data.prepare DIV2K_ROOT OUT [--scales 2 3 4] [--splits train valid]

DIV2K_ROOT is the usual layout: ``DIV2K_train_HR/0001.png`` and ``DIV2K_train_LR_bicubic/X2/0001x2.png``
(and the same for ``valid``). OUT gets ``prepared.json`` and one raw file per split and image kind,
``<split>_HR.u8`` and ``<split>_LR_X<s>.u8``: every image's ``[H, W, 3]`` uint8 pixels, one after the
other. ``python -m dlsn.train --data OUT`` recognises the folder by its ``prepared.json`` and reads patches
straight from the mapped files (the operating system's page cache keeps what is used; nothing is held
twice, and worker processes share the pages).

Why not BasicSR's sub-images (``extract_subimages``: 480x480 PNG crops): they still decode a PNG for every
patch; here a patch is a slice of a mapped array. README has the loader's patches/s for the three ways
(PNG per patch, PNG crops, this cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from dlsn.data.datasets import HRImageDataset, _PairDataset, hr_crop_for, match_pairs
from dlsn.data.samples import center_crop
from dlsn.errors import UserInputError
from dlsn.images import IMAGE_EXTENSIONS, decode_image, list_images

__all__ = ["MANIFEST", "PreparedDataset", "is_prepared", "main", "prepare", "read_manifest", "training_sets"]

MANIFEST = "prepared.json"
FORMAT = "dlsn-prepared"
VERSION = 1
SPLITS = ("train", "valid")

PathLike = str | os.PathLike

DIV2K_LAYOUT = ("DIV2K_ROOT/DIV2K_train_HR/0001.png ... and DIV2K_ROOT/DIV2K_train_LR_bicubic/X<s>/0001x<s>.png "
                "(valid: the same with DIV2K_valid_*)")


class PrepareError(UserInputError, ValueError):
    """A DIV2K folder or a prepared folder that is not what it should be (one line for the user)."""


def _write_images(paths: Sequence[Path], target: Path, conversions: dict[str, str]) -> list[dict[str, Any]]:
    """Appends every image's pixels to ``target``; returns the index (name, offset in bytes, shape)."""
    index = []
    offset = 0
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as handle:
        for path in paths:
            image, conversion = decode_image(path)
            if conversion is not None:
                conversions[path.name] = conversion
            data = np.ascontiguousarray(image, dtype=np.uint8)
            handle.write(data.tobytes())
            index.append({"name": path.stem, "offset": offset, "shape": list(data.shape)})
            offset += data.nbytes
    os.replace(tmp, target)
    return index


def prepare(root: PathLike, out: PathLike, scales: Sequence[int] | None = None,
            splits: Sequence[str] = SPLITS, say: Any = print) -> Path:
    """Writes the prepared copy of the DIV2K folder ``root`` to ``out``; returns the manifest's path.

    ``scales``: the LR scales to copy (default: every ``X<s>`` folder found). A split whose HR folder is
    missing is skipped, except ``train``, which must be there.
    """
    root, out = Path(root), Path(out)
    if not (root / "DIV2K_train_HR").is_dir():
        raise PrepareError(f"{root} is not a DIV2K folder: no DIV2K_train_HR in it (expected {DIV2K_LAYOUT})")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "source": str(root.resolve()), "splits": {}}
    conversions: dict[str, str] = {}
    for split in splits:
        hr_dir = root / f"DIV2K_{split}_HR"
        if not hr_dir.is_dir():
            continue
        hr_paths = list_images(hr_dir)
        if not hr_paths:
            raise PrepareError(f"no images in {hr_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}; expected "
                               f"{DIV2K_LAYOUT})")
        lr_root = root / f"DIV2K_{split}_LR_bicubic"
        found = sorted(int(p.name[1:]) for p in lr_root.glob("X*") if p.is_dir() and p.name[1:].isdigit()) \
            if lr_root.is_dir() else []
        wanted = list(scales) if scales else found
        missing = [s for s in wanted if s not in found]
        if missing and split == "train":
            raise PrepareError(f"no {lr_root}/X{missing[0]} folder (found: {found or 'none'}; expected "
                               f"{DIV2K_LAYOUT})")
        entry: dict[str, Any] = {"hr": {"file": f"{split}_HR.u8"}, "lr": {}}
        say(f"{split}: {len(hr_paths)} HR images -> {out / entry['hr']['file']}")
        entry["hr"]["images"] = _write_images(hr_paths, out / entry["hr"]["file"], conversions)
        for scale in (s for s in wanted if s in found):
            try:
                pairs = match_pairs(hr_dir, lr_root / f"X{scale}", scale)
            except (ValueError, FileNotFoundError) as error:
                raise PrepareError(str(error)) from error
            name = f"{split}_LR_X{scale}.u8"
            say(f"{split}: {len(pairs)} LR images at x{scale} -> {out / name}")
            images = _write_images([lr for _, _, lr in pairs], out / name, conversions)
            for item, (stem, _, _) in zip(images, pairs, strict=True):
                item["name"] = stem  # the HR stem, without the x<s> suffix
            entry["lr"][str(scale)] = {"file": name, "images": images}
        manifest["splits"][split] = entry
    manifest["conversions"] = conversions
    path = out / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)  # written last: a folder with a manifest is complete
    return path


def is_prepared(folder: PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PrepareError(f"{path} is not readable ({error}); run python -m dlsn.data.prepare again") from error
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PrepareError(f"{path} is not a version {VERSION} {FORMAT} manifest")
    return manifest


class _MappedImages:
    """The images of one ``.u8`` file as ``[H, W, 3]`` views of a read-only memory map, opened on first
    use in each process (a map is not pickled into data-loader workers)."""

    def __init__(self, path: Path, index: list[dict[str, Any]]) -> None:
        self.path, self.index = path, index
        if not path.is_file():
            raise PrepareError(f"{path} is missing; run python -m dlsn.data.prepare again")
        expected = sum(int(np.prod(item["shape"])) for item in index)
        if path.stat().st_size != expected:
            raise PrepareError(f"{path} holds {path.stat().st_size} bytes, its manifest {expected}; "
                               "run python -m dlsn.data.prepare again")
        self._map: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._map is None:
            # Plain ndarray views of the map, made once: slicing an np.memmap object per patch costs more
            # than reading the patch.
            mapped = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
            self._map = [mapped[item["offset"]:item["offset"] + int(np.prod(item["shape"]))].reshape(item["shape"])
                         for item in self.index]
        return self._map[i]


class PreparedDataset(_PairDataset):
    """(LR, HR) pairs of one split of a prepared folder at one scale; items as ``PairedFolderDataset``'s."""

    def __init__(self, folder: PathLike, scale: int, split: str = "train", *, train: bool = True,
                 patch_size: int = 48, repeat: int = 1, augment: bool = True) -> None:
        super().__init__(scale, train, patch_size, repeat, augment)
        folder = Path(folder)
        manifest = read_manifest(folder)
        entry = manifest["splits"].get(split)
        if entry is None:
            raise PrepareError(f"{folder} has no {split} split (it has {', '.join(manifest['splits']) or 'none'})")
        if str(scale) not in entry["lr"]:
            have = ", ".join(f"x{s}" for s in entry["lr"]) or "none"
            raise PrepareError(f"{folder} holds no x{scale} LR images for {split} (prepared: {have}); run "
                               f"python -m dlsn.data.prepare with --scales {scale}")
        self.folder = folder
        self.hr = _MappedImages(folder / entry["hr"]["file"], entry["hr"]["images"])
        self.lr = _MappedImages(folder / entry["lr"][str(scale)]["file"], entry["lr"][str(scale)]["images"])
        hr_position = {item["name"]: i for i, item in enumerate(entry["hr"]["images"])}
        self.names = [item["name"] for item in entry["lr"][str(scale)]["images"]]
        self._hr_of = [hr_position[name] for name in self.names]
        self._crop = []
        for name, lr_item, hr_index in zip(self.names, self.lr.index, self._hr_of, strict=True):
            lr_size = tuple(lr_item["shape"][:2])
            crop = hr_crop_for(lr_size, tuple(self.hr.index[hr_index]["shape"][:2]), scale, name)
            self._check_patch_fits(name, lr_size)
            self._crop.append(crop)
        self.conversions: dict[str, str] = {}

    def _load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        height, width = self._crop[index]
        return self.lr[index], self.hr[self._hr_of[index]][:height, :width]

    def hr_images(self, count: int | None = None) -> dict[str, np.ndarray]:
        """``{name: HR [H, W, 3] uint8}`` of the first ``count`` images (copies, for in-memory data sets)."""
        indices = range(len(self.names) if count is None else min(count, len(self.names)))
        return {self.names[i]: np.array(self.hr[self._hr_of[i]]) for i in indices}


def _hr_only(folder: Path, split: str, count: int | None = None) -> dict[str, np.ndarray]:
    entry = read_manifest(folder)["splits"][split]
    images = _MappedImages(folder / entry["hr"]["file"], entry["hr"]["images"])
    indices = range(len(images) if count is None else min(count, len(images)))
    return {images.index[i]["name"]: np.array(images[i]) for i in indices}


def training_sets(folder: PathLike, scale: int, *, patch_size: int, degradation: str = "BI",
                  noise_sigma: float | None = None, seed: int = 0, n_val: int = 10, val_crop: int = 0,
                  pyramid: Sequence[float] = ()) -> tuple[Dataset, Dataset, Dataset, str]:
    """(train, val, val_full, description) of a prepared folder, as training builds them for DIV2K:
    stored pairs for BI (HR images with LR made in memory for BD / DN), validation on the first ``n_val``
    images of the ``valid`` split (else of ``train``, said so), ``val`` on ``val_crop`` HR centre crops."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    common = {"degradation": degradation, "noise_sigma": noise_sigma, "seed": seed}
    if degradation == "BI":
        train: Dataset = PreparedDataset(folder, scale, "train", train=True, patch_size=patch_size)
    else:
        train = HRImageDataset(_hr_only(folder, "train"), scale, train=True, patch_size=patch_size,
                               pyramid=pyramid, **common)
    val_split = "valid" if "valid" in manifest["splits"] else "train"
    images = _hr_only(folder, val_split, n_val)
    if degradation == "BI" and str(scale) in manifest["splits"][val_split]["lr"]:
        full = PreparedDataset(folder, scale, val_split, train=False)
        val_full: Dataset = Subset(full, range(min(n_val, len(full))))
    else:
        val_full = HRImageDataset(images, scale, train=False, **common)
    crops = {name: center_crop(image, val_crop) for name, image in images.items()} if val_crop else None
    val = HRImageDataset(crops, scale, train=False, **common) if crops else val_full
    where = f"validation on {len(val_full)} of {val_split}" + (" (training images: no valid split)"
                                                                 if val_split == "train" else "")
    description = (f"prepared DIV2K at {folder} (memory-mapped): {len(getattr(train, 'names', []))} training "
                   f"images, {where}")
    return train, val, val_full, description


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dlsn.data.prepare",
        description="Decode a DIV2K folder once into memory-mapped files that python -m dlsn.train --data OUT "
                    "reads patches from without decoding PNGs.")
    parser.add_argument("root", type=Path, metavar="DIV2K_ROOT",
                        help="folder holding DIV2K_train_HR and DIV2K_train_LR_bicubic/X<s> (and the valid ones)")
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write prepared.json and the .u8 files to")
    parser.add_argument("--scales", type=int, nargs="+", help="LR scales to copy (default: every X<s> found)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="splits to copy (default: train valid; a missing valid is skipped)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dlsn.cli import run_tool

    args = _parser().parse_args(argv)

    def body() -> int:
        path = prepare(args.root, args.out, args.scales, args.splits)
        print(f"wrote {path}; train with: python -m dlsn.train --data {args.out}")
        return 0

    return run_tool("dlsn.data.prepare", body, lambda: "stopped: OUT has no prepared.json, so nothing uses it")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
