"""Scoring SR methods on test sets: Y-channel PSNR / SSIM (dlsn/metrics.py) and their tables.

The library behind ``python -m dlsn.eval`` (``dlsn/eval.py``, the command line), also used by training
(periodic validation) and ``dlsn.upscale`` (the self-ensemble). An *upscaler* (``UpscaleFn``) maps
``lr [N, 3, h, w]`` in [0, 1] to ``sr [N, 3, s*h, s*w]`` in [0, 1]: ``bicubic_upscaler`` or a network
through ``model_upscaler``. Each LR image goes through it whole, or in pieces: ``forward_chop`` (the
authors' ``--chop`` protocol, four overlapping quadrants, recursively) or ``forward_tiled`` (overlapping
tiles blended across the seams). The output is rounded to 8 bits and scored against the HR (cropped to
``scale`` times the LR size) with ``dlsn.metrics.psnr_y`` / ``ssim_y``. An output holding NaN or inf scores
NaN, which the tables print as ``NaN (non-finite output)``; an image too small for the scores (the border
``scale`` and the 11x11 SSIM window) is skipped and listed (``SetScore.skipped``), the others are scored.
"""

from __future__ import annotations

import csv
import itertools
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
from dlsn.metrics import min_scorable_size, psnr_y, ssim_y

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


# --------------------------------------------------------------------------------------------------
# Whole images in pieces: the authors' chop protocol and overlapping tiles


def forward_chop(model: Callable[[Tensor], Tensor], lr: Tensor, scale: int, shave: int = 10,
                 min_size: int = 120000) -> Tensor:
    """``model`` over ``lr [N, C, h, w]`` in four overlapping quadrants, the authors' ``--chop``.

    The protocol of EDSR's ``forward_chop`` (the DLSN code's ``src/model/__init__.py``, one GPU): each
    quadrant is ``h // 2 + shave`` by ``w // 2 + shave`` LR pixels, its height then raised by
    ``4 - height % 4`` and its width by ``8 - width % 8`` (a full 4 or 8 when already a multiple, as
    there). Quadrants of at least ``min_size`` LR pixels are chopped again the same way; the others go
    through ``model`` one at a time. The output takes each quadrant's corner of ``scale * h // 2`` by
    ``scale * w // 2`` (its far side), so every output pixel comes from exactly one quadrant.
    """
    _, _, h, w = lr.shape
    h_half, w_half = h // 2, w // 2
    h_size, w_size = h_half + shave, w_half + shave
    h_size += 4 - h_size % 4
    w_size += 8 - w_size % 8
    if h_size > h or w_size > w:
        # The authors' slicing would read past the image here and return garbage.
        raise ValueError(f"forward_chop: a {w}x{h} LR image is too small to chop with shave={shave} "
                         f"(its quadrants would be {w_size}x{h_size})")
    crops = [lr[:, :, :h_size, :w_size], lr[:, :, :h_size, w - w_size:],
             lr[:, :, h - h_size:, :w_size], lr[:, :, h - h_size:, w - w_size:]]
    if h_size * w_size < min_size:
        outs = [model(crop) for crop in crops]
    else:
        outs = [forward_chop(model, crop, scale, shave, min_size) for crop in crops]
    H, W, H_half, W_half, H_size, W_size = (scale * v for v in (h, w, h_half, w_half, h_size, w_size))
    out = outs[0].new_empty(outs[0].shape[0], outs[0].shape[1], H, W)
    out[:, :, :H_half, :W_half] = outs[0][:, :, :H_half, :W_half]
    out[:, :, :H_half, W_half:] = outs[1][:, :, :H_half, W_size - W + W_half:]
    out[:, :, H_half:, :W_half] = outs[2][:, :, H_size - H + H_half:, :W_half]
    out[:, :, H_half:, W_half:] = outs[3][:, :, H_size - H + H_half:, W_size - W + W_half:]
    return out


MIN_TILE = 2  # a 1-pixel tile is not something to super-resolve


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering ``[0, size)``, consecutive ones overlapping by
    at least ``overlap``; the last tile is moved back to end at the border."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, overlap: float, fade_in: bool, fade_out: bool) -> Tensor:
    """1-D blending weight of one tile (``length`` and ``overlap`` in output pixels).

    On a side shared with a neighbour the weight is 0 over the first quarter of the overlap (pixels
    that saw the tile's artificial border), then rises linearly to 1 over the next half; the
    neighbour's weight falls over the same pixels, so the two cross-fade and sum to 1.
    """
    weight = torch.ones(length)
    if overlap > 0:
        rise = (torch.arange(length, dtype=torch.float32) + 0.5 - overlap / 4) / (overlap / 2)
        if fade_in:
            weight = torch.minimum(weight, rise.clamp(0, 1))
        if fade_out:
            weight = torch.minimum(weight, rise.flip(0).clamp(0, 1))
    # Never exactly 0: with extreme tile/overlap settings every output pixel still gets weight.
    return weight.clamp_min(1e-6)


def forward_tiled(forward: Callable[[Tensor], Tensor], x: Tensor, scale: int, tile: int, overlap: int) -> Tensor:
    """``forward`` over overlapping ``tile x tile`` crops of ``x [N, C, h, w]``, blended.

    Equals ``forward(x)`` when ``tile >= max(h, w)``, and for a network whose receptive radius is at
    most ``overlap / 4`` input pixels (the blend ignores each tile's outer quarter-overlap). The
    output is accumulated on the CPU (float32): only one tile's activations live on the device.
    """
    if tile < MIN_TILE:
        raise ValueError(f"tile must be >= {MIN_TILE}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap must be in [0, tile={tile}), got {overlap}")
    n, _, height, width = x.shape
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return forward(x)
    total: Tensor | None = None
    weight_sum = torch.zeros(1, 1, height * scale, width * scale)
    for top, left in itertools.product(rows, cols):
        th, tw = min(tile, height), min(tile, width)
        out = forward(x[:, :, top : top + th, left : left + tw]).float().cpu()
        if total is None:
            total = torch.zeros(n, out.shape[1], height * scale, width * scale)
        wy = _ramp(th * scale, overlap * scale, top > 0, top + th < height)
        wx = _ramp(tw * scale, overlap * scale, left > 0, left + tw < width)
        weight = (wy[:, None] * wx[None, :])[None, None]
        region = (slice(None), slice(None), slice(top * scale, (top + th) * scale),
                  slice(left * scale, (left + tw) * scale))
        total[region] += out * weight
        weight_sum[region] += weight
    assert total is not None
    return (total / weight_sum).to(x.device)


def pieces(forward: Callable[[Tensor], Tensor], scale: int, *, chop: bool = False, tile: int | None = None,
           tile_overlap: int = 16) -> Callable[[Tensor], Tensor]:
    """``forward`` run whole, through ``forward_chop`` (``chop``) or through ``forward_tiled`` (``tile``)."""
    if chop and tile is not None:
        raise ValueError("chop and tile are two ways of cutting the image: choose one")
    if chop:
        return lambda x: forward_chop(forward, x, scale)
    if tile is not None:
        return lambda x: forward_tiled(forward, x, scale, tile, tile_overlap)
    return forward


def bicubic_upscaler(scale: int) -> UpscaleFn:
    """The bicubic baseline as an ``UpscaleFn`` (MATLAB-style ``imresize(lr, scale)``)."""
    return lambda lr: bicubic_upsample(lr, scale)


def model_upscaler(model: nn.Module, rgb_range: float = 255.0, ensemble: bool = False, *, chop: bool = False,
                   tile: int | None = None, tile_overlap: int = 16) -> UpscaleFn:
    """A network as an ``UpscaleFn``: ``sr_forward`` without gradients, optionally self-ensembled, each
    pass whole, chopped (``chop``: the authors' protocol) or tiled (``tile``, ``tile_overlap``: LR pixels)."""
    cut = chop or tile is not None
    run = pieces(model, int(model.scale) if cut else 1, chop=chop, tile=tile, tile_overlap=tile_overlap)

    def one_pass(lr: Tensor) -> Tensor:
        return sr_forward(run, lr, rgb_range)

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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image name, its size): too small to score

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
                "failed": [{"name": name, "reason": reason} for name, reason in self.failed],
                "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped]}


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
    out and listed in ``failed`` instead of stopping the evaluation. An HR image smaller than
    ``dlsn.metrics.min_scorable_size(scale)`` on a side is not upscaled but listed in ``skipped``."""
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
        smallest = min_scorable_size(scale)
        if min(hr.shape[-2:]) < smallest:
            result.skipped.append((name, f"HR {hr.shape[-1]}x{hr.shape[-2]}; x{scale} scoring needs "
                                         f"{smallest}x{smallest} or more"))
            continue
        sr = upscale(lr[None].to(device))
        if sr.dim() != 4 or sr.shape[0] != 1 or tuple(sr.shape[-3:]) != tuple(hr.shape):
            raise EvalError(f"{label}: {name}: the model returned shape {list(sr.shape)} for LR "
                               f"{list(lr.shape)}; expected [1, {', '.join(map(str, hr.shape))}]")
        # Not rounded here: psnr_y/ssim_y round, after noting a non-finite output (rounding clamps inf).
        sr = sr[0].detach().to("cpu", torch.float64)
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


NON_FINITE = "NaN (non-finite output)"


def format_score(psnr: float, ssim: float | None = None, n_images: int = 1) -> str:
    """``"27.14 / 0.8123"`` (PSNR only without ``ssim``); ``NaN (non-finite output)`` for a NaN score (an
    output holding NaN or inf), ``-`` for a set with no scored image."""
    if n_images == 0:
        return "-"
    if math.isnan(psnr) or (ssim is not None and math.isnan(ssim)):
        return NON_FINITE
    return f"{psnr:.2f}" if ssim is None else f"{psnr:.2f} / {ssim:.4f}"


def _cells(psnr: float, ssim: float, n_images: int = 1) -> tuple[str, str]:
    """The PSNR and SSIM columns of ``format_tables``: ``NaN (non-finite output)`` spans both."""
    text = format_score(psnr, ssim, n_images)
    if text in ("-", NON_FINITE):
        return text, ""
    return f"{psnr:.2f}", f"{ssim:.4f}"


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
            psnr, ssim = _cells(r.psnr, r.ssim, r.n_images)
            lines.append(f"{r.set_name:<{width}}  {r.n_images:>6}  {psnr:>9}  {ssim:>6}".rstrip())
            if per_image:
                for s in r.images:
                    psnr, ssim = _cells(s.psnr, s.ssim)
                    lines.append(f"{'  ' + s.name:<{width}}  {'':>6}  {psnr:>9}  {ssim:>6}".rstrip())
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
