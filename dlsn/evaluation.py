"""Scoring SR methods on test sets: Y-channel PSNR / SSIM (dlsn/metrics.py) and their tables.

The library behind ``python -m dlsn.eval`` (``dlsn/eval.py``, the command line), also used by training
(periodic validation) and ``dlsn.upscale`` (the self-ensemble). An *upscaler* (``UpscaleFn``) maps
``lr [N, 3, h, w]`` in [0, 1] to ``sr [N, 3, s*h, s*w]`` in [0, 1]: ``bicubic_upscaler`` or a network
through ``model_upscaler``. Each LR image goes through it whole; the output is rounded to 8 bits and
scored against the HR (cropped to ``scale`` times the LR size) with ``dlsn.metrics.psnr_y`` / ``ssim_y``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from dlsn.data.datasets import DegradedFolderDataset, PairedFolderDataset, dihedral
from dlsn.data.imresize import bicubic_upsample
from dlsn.errors import UserInputError, one_line
from dlsn.images import IMAGE_EXTENSIONS, list_images
from dlsn.metrics import psnr_y, quantize, ssim_y

PathLike = str | os.PathLike
UpscaleFn = Callable[[Tensor], Tensor]
"""``lr [N, 3, h, w]`` in [0, 1] -> ``sr [N, 3, s*h, s*w]`` in [0, 1]."""


class EvalError(UserInputError, RuntimeError):
    """A problem with the evaluation's inputs (checkpoint, model output) the user can act on."""


# --------------------------------------------------------------------------------------------------
# Running a model


def sr_forward(model: nn.Module | Callable[[Tensor], Tensor], lr01: Tensor,
               rgb_range: float = 255.0) -> Tensor:
    """Run a network working in ``[0, rgb_range]`` on ``lr01`` in ``[0, 1]``; the result is in ``[0, 1]``.

    Not clamped or rounded (``metrics`` rounds before scoring).
    """
    if rgb_range <= 0:
        raise ValueError(f"rgb_range must be positive, got {rgb_range}")
    return model(lr01 * rgb_range) / rgb_range


def self_ensemble(model_fn: Callable[[Tensor], Tensor], lr: Tensor) -> Tensor:
    """Mean of ``model_fn`` over the 8 flips/transposes of ``lr`` (``[..., H, W]``), each output
    transformed back first (the "+" results of SR papers)."""
    total: Tensor | None = None
    for k in range(8):
        out = dihedral(model_fn(dihedral(lr, k)), k, inverse=True)
        total = out.clone() if total is None else total.add_(out)
    assert total is not None
    return total / 8.0


def bicubic_upscaler(scale: int) -> UpscaleFn:
    """The bicubic baseline as an ``UpscaleFn`` (MATLAB-style ``imresize(lr, scale)``)."""
    return lambda lr: bicubic_upsample(lr, scale)


def model_upscaler(model: nn.Module, rgb_range: float = 255.0, ensemble: bool = False) -> UpscaleFn:
    """A network as an ``UpscaleFn``: ``sr_forward`` without gradients, optionally self-ensembled."""

    def one_pass(lr: Tensor) -> Tensor:
        return sr_forward(model, lr, rgb_range)

    def upscale(lr: Tensor) -> Tensor:
        with torch.inference_mode():
            return self_ensemble(one_pass, lr) if ensemble else one_pass(lr)

    return upscale


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float


@dataclass
class SetScore:
    """Scores of one method on one test set at one scale."""

    set_name: str
    scale: int
    method: str
    images: list[ImageScore] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image name, why it was left out)

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def psnr(self) -> float:
        return _mean([s.psnr for s in self.images])

    @property
    def ssim(self) -> float:
        return _mean([s.ssim for s in self.images])

    def to_dict(self) -> dict:
        return {"set": self.set_name, "scale": self.scale, "method": self.method,
                "n_images": self.n_images, "psnr": self.psnr, "ssim": self.ssim,
                "images": [{"name": s.name, "psnr": s.psnr, "ssim": s.ssim} for s in self.images],
                "failed": [{"name": name, "reason": reason} for name, reason in self.failed]}


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def evaluate_dataset(
    upscale: UpscaleFn,
    dataset: Dataset,
    scale: int,
    *,
    set_name: str = "",
    method: str = "",
    device: torch.device | str = "cpu",
    progress: bool = True,
    keep_going: bool = False,
) -> SetScore:
    """Score ``upscale`` on every item of ``dataset`` (``{"lr", "hr", "name"}`` in [0, 1], whole images:
    ``PairedFolderDataset``, ``DegradedFolderDataset`` or ``HRImageDataset`` with ``train=False``). Call
    ``model.eval()`` first. ``keep_going``: an item that cannot be read (``UserInputError``) is left
    out and listed in ``failed`` instead of stopping the evaluation."""
    result = SetScore(set_name, scale, method)
    label = f"{set_name} x{scale}".strip()
    bar = tqdm(range(len(dataset)), desc=label, unit="img", disable=not progress, file=sys.stderr,
               leave=False)
    names = getattr(dataset, "names", None)
    for index in bar:
        try:
            item = dataset[index]
        except UserInputError as error:
            if not keep_going:
                raise
            result.failed.append((names[index] if names else f"#{index}", one_line(error)))
            continue
        lr, hr, name = item["lr"], item["hr"], item["name"]
        sr = upscale(lr[None].to(device))
        if sr.dim() != 4 or sr.shape[0] != 1 or tuple(sr.shape[-3:]) != tuple(hr.shape):
            raise EvalError(f"{label}: {name}: the model returned shape {list(sr.shape)} for LR "
                               f"{list(lr.shape)}; expected [1, {', '.join(map(str, hr.shape))}]")
        sr = quantize(sr[0].detach().to("cpu", torch.float64))
        result.images.append(ImageScore(name, float(psnr_y(sr, hr, scale)), float(ssim_y(sr, hr, scale))))
    return result


def find_test_sets(root: PathLike, names: Sequence[str] | None = None) -> dict[str, Path]:
    """``{set name: folder}`` of the test sets under ``root`` (folders with an ``HR`` subfolder).

    ``root`` itself counts as one set when it has ``HR``, or when it holds images and no such
    subfolders (a plain folder of HR images: see ``is_plain_folder``). ``names`` picks sets (unknown
    ones: error).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "HR").is_dir():
        found = {root.resolve().name: root}
    else:
        found = {p.name: p for p in sorted(root.iterdir()) if (p / "HR").is_dir()}
        if not found and list_images(root):
            found = {root.resolve().name: root}
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            listed = ", ".join(found) or "none"
            raise FileNotFoundError(f"test set(s) {', '.join(unknown)} not found in {root} (sets there: "
                                    f"{listed}; a set is a folder with HR/ and LR_bicubic/X<s>/)")
        found = {n: found[n] for n in names}
    if not found:
        raise FileNotFoundError(f"no test sets and no images in {root}: expected HR images "
                                f"({', '.join(IMAGE_EXTENSIONS)}), or <set>/HR/*.png and "
                                "<set>/LR_bicubic/X<s>/*.png")
    return found


def is_plain_folder(folder: PathLike) -> bool:
    """A folder of HR images without the ``HR`` / ``LR_bicubic`` layout: LR is made on the fly."""
    return not (Path(folder) / "HR").is_dir()


def dataset_for_set(folder: PathLike, scale: int, *, degradation: str = "BI", noise_sigma: float | None = None,
                     seed: int = 0, cache: bool = False) -> Dataset:
    """The whole-image data set of one test set at one scale: the stored LR images for BI in the
    usual layout, else LR made from the HR images with ``degradation`` (``DegradedFolderDataset``)."""
    folder = Path(folder)
    if is_plain_folder(folder):
        return DegradedFolderDataset(folder, scale, degradation=degradation, noise_sigma=noise_sigma, seed=seed)
    if degradation.upper() == "BI":
        return PairedFolderDataset.from_test_set(folder, scale, train=False, cache=cache)
    return DegradedFolderDataset(folder / "HR", scale, degradation=degradation, noise_sigma=noise_sigma,
                                 seed=seed)


def evaluate(
    upscalers: Mapping[int, UpscaleFn],
    sets: Mapping[str, PathLike],
    *,
    method: str = "",
    device: torch.device | str = "cpu",
    progress: bool = True,
    cache: bool = False,
    degradation: str = "BI",
    noise_sigma: float | None = None,
    seed: int = 0,
    keep_going: bool = False,
    conversions: dict[str, str] | None = None,
) -> list[SetScore]:
    """Score each ``upscalers[scale]`` on each test set folder: one ``SetScore`` per (scale, set).

    LR images come from ``dataset_for_set``. A set that cannot be read as a whole (missing LR
    folder, mismatched sizes) raises :class:`~dlsn.errors.UserInputError`; ``keep_going`` leaves
    single unreadable images out (``SetScore.failed``). ``conversions`` collects what reading files
    as 8-bit RGB changed (``"<set>/<file>"``: description).
    """
    results = []
    for scale, upscale in upscalers.items():
        for set_name, folder in sets.items():
            try:
                dataset = dataset_for_set(folder, scale, degradation=degradation, noise_sigma=noise_sigma,
                                           seed=seed, cache=cache)
            except (FileNotFoundError, NotADirectoryError, ValueError) as error:
                hint = (" (or give the folder of HR images itself as --data: LR images are then made on the fly)"
                        if isinstance(error, FileNotFoundError) else "")
                raise UserInputError(f"test set {set_name} at x{scale}: {one_line(error)}{hint}") from error
            results.append(evaluate_dataset(upscale, dataset, scale, set_name=set_name, method=method,
                                            device=device, progress=progress, keep_going=keep_going))
            if conversions is not None:
                conversions.update({f"{set_name}/{name}": what
                                    for name, what in getattr(dataset, "conversions", {}).items()})
    return results


# --------------------------------------------------------------------------------------------------
# Reporting


def format_tables(results: Sequence[SetScore], per_image: bool = False) -> str:
    """One text table per (method, scale): set, image count, mean PSNR (dB) and SSIM."""
    blocks = []
    keys = list(dict.fromkeys((r.method, r.scale) for r in results))
    for method, scale in keys:
        rows = [r for r in results if (r.method, r.scale) == (method, scale)]
        width = max([len("Set")] + [len(r.set_name) for r in rows]
                    + ([len(s.name) + 2 for r in rows for s in r.images] if per_image else []))
        lines = [f"{method} x{scale}".strip(),
                 f"{'Set':<{width}}  {'Images':>6}  {'PSNR (dB)':>9}  {'SSIM':>6}",
                 "-" * (width + 29)]
        for r in rows:
            lines.append(f"{r.set_name:<{width}}  {r.n_images:>6}  {r.psnr:>9.2f}  {r.ssim:>6.4f}")
            if per_image:
                lines += [f"{'  ' + s.name:<{width}}  {'':>6}  {s.psnr:>9.2f}  {s.ssim:>6.4f}"
                          for s in r.images]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_csv(results: Sequence[SetScore], path: PathLike) -> Path:
    """One row per image plus a ``MEAN`` row per (method, scale, set)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "scale", "set", "image", "psnr", "ssim"])
        for r in results:
            for s in r.images:
                writer.writerow([r.method, r.scale, r.set_name, s.name, f"{s.psnr:.6f}", f"{s.ssim:.6f}"])
            writer.writerow([r.method, r.scale, r.set_name, "MEAN", f"{r.psnr:.6f}", f"{r.ssim:.6f}"])
    return path


def write_json(results: Sequence[SetScore], path: PathLike, extra: Mapping | None = None) -> Path:
    """``{..extra, "results": [SetScore.to_dict()]}``; an identical image's PSNR is written as Infinity."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), "results": [r.to_dict() for r in results]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
