"""Evaluate SR on test sets: Y-channel PSNR / SSIM tables (SPEC 5).

    python -m dlsn.eval --data ROOT --checkpoint FILE [FILE ...] [--scale 2 [3 4]] [--sets Set5 Set14]
                        [--self-ensemble] [--n-hashes R] [--seed S] [--device D] [--backend NAME]
                        [--csv out.csv] [--json out.json] [--per-image] [--no-progress]
    python -m dlsn.eval --data ROOT --scale 2 3 4 --bicubic
    python -m dlsn.eval --data PHOTOS --checkpoint FILE --degradation BD      # a plain folder of HR photos

ROOT holds one folder per test set in the usual layout, ``<set>/HR/*.png`` and
``<set>/LR_bicubic/X{s}/*.png`` (LR names may carry the ``x{s}`` suffix); ROOT may also be a single set,
or a plain folder of HR images. The stored LR images are used for BI (``--degradation``, default);
for BD and DN, and for a plain folder, the LR images are made from the HR ones on the fly
(``dlsn.data.degradations``; DN noise seeded by ``--seed``, so scores repeat).
Each LR image goes through the model whole; the output is rounded to 8 bits and scored against the HR
(cropped to ``scale`` times the LR size) with ``dlsn.metrics.psnr_y`` / ``ssim_y``.
An image that cannot be read is left out and listed at the end, and the command then exits with
status 1; bad arguments print one line and exit with 2; Ctrl-C prints one line and exits with 130.

A checkpoint holds a model of one scale; give one checkpoint per scale (``--scale`` defaults to the
checkpoints' scales). ``--bicubic`` scores MATLAB-style bicubic upscaling instead (no checkpoint).
``--self-ensemble`` averages the 8 flips/transposes (reported as "<arch>+", e.g. DLSN+).
Hash rotations are drawn from ``--seed`` (default 0), so runs are repeatable.
"""

from __future__ import annotations

import argparse
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

from dlsn.cli import check_backend, format_conversions, format_failures, pick_device, run_tool
from dlsn.data.datasets import DegradedFolderDataset, PairedFolderDataset, dihedral
from dlsn.data.degradations import DEGRADATIONS
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


# --------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dlsn.eval",
        description="Y-channel PSNR/SSIM of a checkpoint (or of bicubic upscaling) on SR test sets, or on a "
                    "plain folder of HR images (LR made on the fly).",
    )
    parser.add_argument("--data", required=True, type=Path,
                        help="folder of test sets (<set>/HR, <set>/LR_bicubic/X<s>), one such set, or a plain "
                             "folder of HR images")
    parser.add_argument("--scale", type=int, nargs="+",
                        help="scales to evaluate (default: the checkpoints')")
    parser.add_argument("--checkpoint", type=Path, nargs="+", help="checkpoint file(s), one per scale")
    parser.add_argument("--bicubic", action="store_true", help="evaluate bicubic upscaling (no checkpoint)")
    parser.add_argument("--degradation", type=str.upper, choices=DEGRADATIONS, default="BI",
                        help="how LR images are made: BI uses a set's stored LR_bicubic images; BD and DN, "
                             "and any plain folder, make them from the HR images (default BI)")
    parser.add_argument("--noise-sigma", type=float,
                        help="DN noise level on the 0-255 scale (default 15)")
    parser.add_argument("--sets", nargs="+", help="test sets to evaluate (default: all under --data)")
    parser.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/transposes (x8)")
    parser.add_argument("--n-hashes", type=int, help="hash rounds at inference (default: the model's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the hash rotations and of DN noise (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--backend", default=None,
                        help="attention kernel backend: reference, cpu, cuda, triton (default: automatic)")
    parser.add_argument("--csv", type=Path, help="write per-image and mean scores to this CSV file")
    parser.add_argument("--json", type=Path, help="write all scores to this JSON file")
    parser.add_argument("--per-image", action="store_true", help="also print each image's scores")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _load_models(paths: Sequence[Path], device: torch.device | str, backend: str | None, n_hashes: int | None,
                 seed: int) -> dict[int, tuple[nn.Module, dict]]:
    """``{scale: (model, config)}``; two checkpoints of one scale are an error."""
    # Imported here: --bicubic must work without the network (and its kernels) importable.
    from dlsn.models.checkpoint import load_model

    models: dict[int, tuple[nn.Module, dict]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise EvalError(f"checkpoint not found: {path}")
        model, config = load_model(path, map_location=device, backend=backend)
        scale = int(config["scale"])
        if scale in models:
            raise EvalError(f"two checkpoints for scale x{scale}; give one per scale")
        model.eval()
        if hasattr(model, "set_inference"):
            model.set_inference(n_hashes=n_hashes, seed=seed)
        elif n_hashes is not None:
            raise EvalError(f"--n-hashes: the model in {path} has no hash rounds to set")
        models[scale] = (model, config)
    return models


def _check_args(args: argparse.Namespace) -> None:
    if args.bicubic == bool(args.checkpoint):
        raise EvalError("give --checkpoint FILE [FILE ...] or --bicubic (one of the two)")
    if args.scale and any(s < 1 for s in args.scale):
        raise EvalError(f"--scale values must be positive integers, got {args.scale}")
    if args.n_hashes is not None and args.n_hashes < 1:
        raise EvalError(f"--n-hashes must be >= 1, got {args.n_hashes}")
    if args.noise_sigma is not None and args.degradation != "DN":
        raise EvalError(f"--noise-sigma is for --degradation DN, not {args.degradation}")
    if args.noise_sigma is not None and args.noise_sigma < 0:
        raise EvalError(f"--noise-sigma must be >= 0, got {args.noise_sigma}")
    if args.bicubic and not args.scale:
        raise EvalError("--bicubic needs --scale")


def _run(args: argparse.Namespace, conversions: dict[str, str] | None = None,
         say: Callable[[str], None] = print) -> list[SetScore]:
    _check_args(args)
    try:
        sets = find_test_sets(args.data, args.sets)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise EvalError(str(error)) from error
    device = pick_device(args.device)
    progress = not args.no_progress
    noise_sigma = (15.0 if args.noise_sigma is None else args.noise_sigma) if args.degradation == "DN" else None
    made = [name for name, folder in sets.items() if is_plain_folder(folder) or args.degradation != "BI"]
    if made:
        noise = f", noise sigma {noise_sigma:g}" if noise_sigma is not None else ""
        say(f"dlsn.eval: LR images made from the HR images with {args.degradation}{noise} for "
            f"{', '.join(made)}")
    torch.manual_seed(args.seed)
    data_options = {"degradation": args.degradation, "noise_sigma": noise_sigma, "seed": args.seed,
                    "keep_going": True, "conversions": conversions}

    if args.bicubic:
        upscalers = {s: bicubic_upscaler(s) for s in dict.fromkeys(args.scale)}
        return evaluate(upscalers, sets, method="bicubic", device=device, progress=progress, **data_options)

    backend = check_backend(args.backend, device)
    models = _load_models(args.checkpoint, device, backend, args.n_hashes, args.seed)
    scales = list(dict.fromkeys(args.scale)) if args.scale else sorted(models)
    missing = [s for s in scales if s not in models]
    if missing:
        have = ", ".join(f"x{s}" for s in sorted(models))
        wanted = ", ".join(f"x{s}" for s in missing)
        raise EvalError(f"no checkpoint for scale(s) {wanted} (checkpoints: {have})")
    results = []
    for scale in scales:
        model, config = models[scale]
        arch = str(config.get("arch") or "model").upper().replace("_", "-")
        method = arch + ("+" if args.self_ensemble else "")
        upscale = model_upscaler(model, float(config.get("rgb_range", 255.0)), args.self_ensemble)
        results += evaluate({scale: upscale}, sets, method=method, device=device, progress=progress,
                            **data_options)
    return results


def _main(args: argparse.Namespace) -> int:
    conversions: dict[str, str] = {}
    results = _run(args, conversions)
    if conversions:
        print(f"dlsn.eval: note: {format_conversions(sorted(conversions.items()))}")
    print(format_tables(results, per_image=args.per_image))
    extra = {"data": str(args.data), "self_ensemble": bool(args.self_ensemble), "seed": args.seed,
             "n_hashes": args.n_hashes, "checkpoints": [str(p) for p in args.checkpoint or []],
             "degradation": args.degradation}
    if args.csv:
        print(f"wrote {write_csv(results, args.csv)}")
    if args.json:
        print(f"wrote {write_json(results, args.json, extra)}")
    # An image fails at every scale and for every method: list it once.
    failed = dict.fromkeys((f"{r.set_name}/{name}", reason) for r in results for name, reason in r.failed)
    if failed:
        total = len({(r.set_name, s.name) for r in results for s in r.images}) + len(failed)
        print(f"dlsn.eval: {format_failures(list(failed), total)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_tool("dlsn.eval", lambda: _main(args),
                    lambda: "nothing written (scores are written when every set is done)")


if __name__ == "__main__":
    sys.exit(main())
