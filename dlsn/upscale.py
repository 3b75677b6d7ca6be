"""Super-resolve images with a trained checkpoint.

    python -m dlsn.upscale IN OUT --checkpoint FILE [--device D] [--backend B]
                           [--n-hashes R] [--seed S] [--tile T --tile-overlap O | --chop] [--self-ensemble]
                           [--dtype float32|bfloat16]

IN is an image or a folder of images; OUT is the output image (or a folder: then each result is
written there as ``<name>_x<scale>.png``; a folder IN needs a folder OUT). The scale comes from
the checkpoint (ours, or an authors' state dict). By default every image goes through the network
in one pass, so GLA sees the whole image; ``--tile`` cuts big images into overlapping tiles
(sizes in input pixels) whose outputs cross-fade linearly inside the overlaps. GLA is
global, so tiled results differ slightly from whole-image ones; tiles bound the memory.
``--chop`` runs the authors' protocol instead (``dlsn.evaluation.forward_chop``: four overlapping
quadrants, split again while one holds 120000 LR pixels or more), as their published test command does.
Hash rotations are drawn from ``--seed`` (default 0), so the same command gives the same pixels.
``--dtype bfloat16`` runs the network under bfloat16 autocast (``dlsn.models.precision``); the default is
bfloat16 on a CPU with bfloat16 instructions (AVX512-BF16, AMX), float32 elsewhere.

A folder run upscales every image it can read; if some could not be, it lists them at the end and exits
with status 1: unreadable files, decompression bombs, images over ``--max-megapixels`` (64 by default,
checked from the file's header before decoding), images the device has no memory for, and outputs that are
not finite (NaN or inf, which would be written as black). Bad arguments (a file that is not a checkpoint,
a missing input) print one line and exit with 2, and Ctrl-C keeps the images written so far (each file is
written whole or not at all) and exits with 130.
Images that are not 8-bit RGB (RGBA, greyscale, 16-bit) are converted, and images with an EXIF
orientation turned upright; one line says which. A checkpoint with NaN or inf weights or an impossible
config, and a backend that refuses the call (e.g. one that cannot run this size within memory), are one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from dlsn.cli import (
    BACKEND_HELP,
    check_backend,
    format_conversions,
    format_failures,
    kernel_refusal,
    kernels_line,
    pick_device,
    run_tool,
)
from dlsn.errors import UserInputError, one_line
from dlsn.evaluation import forward_tiled, pieces
from dlsn.evaluation import self_ensemble as eight_fold_ensemble
from dlsn.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image,
    is_image_file,
    list_images,
    tensor_to_uint8,
    uint8_to_tensor,
    write_image,
)
from dlsn.models.checkpoint import load_model
from dlsn.models.precision import DTYPES, default_dtype

__all__ = ["forward_tiled", "main", "upscale_array", "upscale_tensor"]

MIN_SIDE = 2  # a 1-pixel-wide image is not something to super-resolve

Forward = Callable[[Tensor], Tensor]


def upscale_tensor(
    model: nn.Module,
    x: Tensor,
    *,
    tile: int | None = None,
    tile_overlap: int = 16,
    self_ensemble: bool = False,
    chop: bool = False,
) -> Tensor:
    """``x [N, 3, h, w]`` (in the model's ``[0, rgb_range]``) -> ``[N, 3, h*s, w*s]``, no gradients.

    ``chop``: the authors' protocol (``dlsn.evaluation.forward_chop``); ``tile``: overlapping tiles."""
    one_pass = pieces(model, model.scale, chop=chop, tile=tile, tile_overlap=tile_overlap)

    with torch.inference_mode():
        return eight_fold_ensemble(one_pass, x) if self_ensemble else one_pass(x)


def upscale_array(
    model: nn.Module,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    tile: int | None = None,
    tile_overlap: int = 16,
    self_ensemble: bool = False,
    chop: bool = False,
) -> np.ndarray:
    """``[h, w, 3]`` uint8 -> ``[h*s, w*s, 3]`` uint8; :class:`UserInputError` when the output is not finite."""
    height, width = image.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise UserInputError(f"image is {width}x{height} pixels; the smallest input is {MIN_SIDE}x{MIN_SIDE}")
    rgb_range = float(model.config.get("rgb_range", 255.0))
    x = uint8_to_tensor(image, rgb_range).unsqueeze(0).to(device)
    y = upscale_tensor(model, x, tile=tile, tile_overlap=tile_overlap, self_ensemble=self_ensemble, chop=chop)
    if not bool(y.isfinite().all()):  # rounding would write NaN as black and inf as white, silently
        raise UserInputError(NON_FINITE)
    return tensor_to_uint8(y[0], rgb_range)


def _plan(source: Path, out: str, scale: int) -> list[tuple[Path, Path]]:
    """(input, output) pairs for IN and OUT, with the errors a user can fix.

    ``out`` stays a string so that a trailing slash ("results/": a folder to create) is seen.
    """
    target = Path(out)
    _check_input(source)
    if source.is_dir():
        inputs = list_images(source)
        if not inputs:
            raise UserInputError(f"no images in folder {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if target.exists() and not target.is_dir():
            raise UserInputError(f"IN is a folder, so OUT must be a folder too, but {target} is a file")
        return [(p, target / f"{p.stem}_x{scale}.png") for p in inputs]
    if target.is_dir() or out.endswith(("/", os.sep)):
        output = target / f"{source.stem}_x{scale}.png"
    elif is_image_file(target):
        output = target
    else:
        raise UserInputError(f"OUT {target} is neither a folder nor an image file name (.png, .jpg, ...)")
    if output.resolve() == source.resolve():
        raise UserInputError(f"OUT would overwrite the input {source}")
    return [(source, output)]


def _check_input(source: Path) -> None:
    if not source.exists():
        raise UserInputError(f"input not found: {source}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dlsn.upscale",
        description="Super-resolve an image or a folder of images with a DLSN checkpoint. Exit status: 0 "
                    "when every image was written; 1 when some images of a folder could not be read or "
                    "upscaled (the others are written, and these listed at the end); 2 for bad arguments; "
                    "130 on Ctrl-C.",
    )
    parser.add_argument("input", type=Path, metavar="IN", help="an image, or a folder of images")
    parser.add_argument("output", metavar="OUT", help="output image file, or a folder to write "
                                                      "<name>_x<scale>.png into (must be a folder when IN is one)")
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="our checkpoint or an authors' state dict"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument("--backend", default=None, help=BACKEND_HELP)
    parser.add_argument(
        "--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6, metavar="MP",
        help=f"refuse input images larger than this, checked before decoding (default {DEFAULT_MAX_PIXELS / 1e6:g}; "
             "0: no limit but PIL's decompression-bomb check)",
    )
    parser.add_argument(
        "--n-hashes", type=int, default=None, help="hash rounds R at inference (default: the checkpoint's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the hash rotations (default 0)")
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        help="process in tiles of T x T input pixels (default: whole image at once)",
    )
    parser.add_argument(
        "--tile-overlap", type=int, default=16, help="overlap of tiles in input pixels (default 16)"
    )
    parser.add_argument(
        "--self-ensemble", action="store_true", help="average over 8 flips/transposes (x8 time)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="compute dtype of the network (default: bfloat16 on a CPU with AVX512-BF16 or AMX, else float32)",
    )
    parser.add_argument(
        "--chop", action="store_true",
        help="the authors' --chop: four overlapping quadrants (shave 10), split again while one has "
             ">= 120000 LR pixels (not with --tile)",
    )
    return parser


OUT_OF_MEMORY_HINT = "out of memory; try --tile 256 (or smaller)"
NON_FINITE = "the network's output is not finite (NaN or inf); not written"


def _out_of_memory(error: BaseException) -> bool:
    """A device's out-of-memory error, or the CPU allocator's (a RuntimeError naming the bytes it wanted)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text
                                                or "not enough memory" in text)


class _Run:
    """One command: the images written, the ones that failed and the conversions made on reading."""

    def __init__(self, args: argparse.Namespace, prog: str) -> None:
        self.args, self.prog = args, prog
        self.pairs: list[tuple[Path, Path]] = []
        self.written: list[Path] = []
        self.failed: list[tuple[str, str]] = []
        self.conversions: list[tuple[str, str]] = []

    def __call__(self) -> int:
        args = self.args
        if args.n_hashes is not None and args.n_hashes < 1:
            raise UserInputError(f"--n-hashes must be >= 1, got {args.n_hashes}")
        if not args.max_megapixels >= 0:
            raise UserInputError(f"--max-megapixels must be >= 0 (0: no limit), got {args.max_megapixels}")
        if args.chop and args.tile is not None:
            raise UserInputError("--chop and --tile are two ways of cutting the image: give one")
        if args.tile is not None and not 0 <= args.tile_overlap < args.tile:
            raise UserInputError(
                f"--tile-overlap must be in [0, --tile), got {args.tile_overlap} with tile {args.tile}"
            )
        _check_input(args.input)
        device = pick_device(args.device)
        backend = check_backend(args.backend, device)
        model, config = load_model(args.checkpoint, map_location=device, backend=backend)
        model.set_inference(n_hashes=args.n_hashes, seed=args.seed)
        dtype = args.dtype or default_dtype(device)
        if hasattr(model, "set_dtype"):
            model.set_dtype(dtype)
        elif dtype != "float32":
            raise UserInputError(f"--dtype {dtype}: this model has no dtype setting; use --dtype float32")
        scale = int(config["scale"])
        self.pairs = _plan(args.input, args.output, scale)
        kernels = kernels_line(model, backend, device, getattr(torch, dtype))
        if kernels is not None:
            print(f"{self.prog}: {kernels}")
        one_image = len(self.pairs) == 1 and not args.input.is_dir()
        for source, target in tqdm(self.pairs, desc=f"x{scale}", unit="image", disable=len(self.pairs) == 1,
                                   file=sys.stderr):
            try:
                self._one(model, device, source, target)
            except (UserInputError, ValueError, RuntimeError) as error:
                # Bad images, no memory for this one, or a backend refusing its size: the others may go.
                if not (isinstance(error, UserInputError) or _out_of_memory(error) or kernel_refusal(error)):
                    raise
                reason = OUT_OF_MEMORY_HINT if _out_of_memory(error) else one_line(error)
                if one_image:
                    raise UserInputError(reason if str(source) in reason else f"{source}: {reason}") from error
                self.failed.append((source.name, reason))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if self.conversions:
            print(f"{self.prog}: note: {format_conversions(self.conversions)}")
        if self.written:
            where = self.written[0] if one_image else f"{len(self.written)} images in {args.output}"
            print(f"{self.prog}: wrote {where} (x{scale}, {device.type}, {dtype})")
        if self.failed:
            print(f"{self.prog}: {format_failures(self.failed, len(self.pairs))}", file=sys.stderr)
            return 1
        return 0

    def _one(self, model: nn.Module, device: torch.device, source: Path, target: Path) -> None:
        limit = self.args.max_megapixels
        image, conversion = decode_image(source, round(limit * 1e6) if limit > 0 else None)
        if conversion is not None:
            self.conversions.append((source.name, conversion))
        result = upscale_array(model, image, device=device, tile=self.args.tile,
                               tile_overlap=self.args.tile_overlap, self_ensemble=self.args.self_ensemble,
                               chop=self.args.chop)
        try:
            write_image(target, result)
        except OSError as error:
            raise UserInputError(f"cannot write {target}: {error}") from error
        self.written.append(target)

    def interrupted(self) -> str:
        if not self.pairs:
            return "nothing written"
        return f"wrote {len(self.written)} of {len(self.pairs)} images" + (
            f" to {self.args.output}" if self.written else "")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = _Run(args, "dlsn.upscale")
    return run_tool(run.prog, run, run.interrupted)


if __name__ == "__main__":
    sys.exit(main())
