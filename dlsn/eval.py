"""Evaluate SR on test sets: Y-channel PSNR / SSIM tables; the command line of ``dlsn.evaluation``.

    python -m dlsn.eval --data ROOT --checkpoint FILE [FILE ...] [--scale 2 [3 4]] [--sets Set5 Set14]
                        [--self-ensemble] [--chop | --tile SIZE --tile-overlap PX] [--n-hashes R] [--seed S]
                        [--device D] [--backend NAME]
                        [--csv out.csv] [--json out.json] [--per-image] [--no-progress]
    python -m dlsn.eval --data ROOT --scale 2 3 4 --bicubic
    python -m dlsn.eval --data ROOT --checkpoint FILE --bicubic                # model and bicubic, one table
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
checkpoints' scales; 2, 3 or 4, as in training). ``--bicubic`` scores MATLAB-style bicubic upscaling: alone
(give ``--scale``), or beside the checkpoints in one table with each model's gain. Tables name a network by
its preset (``cpu_default``, ``tiny (n_feats=16)``), else by its architecture.
``--self-ensemble`` averages the 8 flips/transposes (reported as "<name>+", e.g. cpu_default+).
``--chop`` runs the authors' test protocol (``dlsn.evaluation.forward_chop``), the one behind the paper's
tables; ``--tile SIZE --tile-overlap PX`` runs overlapping tiles blended across the seams.
Hash rotations are drawn from ``--seed`` (default 0), so runs are repeatable.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dlsn.cli import (
    BACKEND_HELP,
    check_backend,
    format_conversions,
    format_failures,
    kernels_line,
    pick_device,
    run_tool,
    saving,
)
from dlsn.data.degradations import DEGRADATIONS
from dlsn.evaluation import (
    EvalError,
    SetScore,
    bicubic_upscaler,
    evaluate,
    find_test_sets,
    format_score,
    format_tables,
    is_plain_folder,
    model_upscaler,
    write_csv,
    write_json,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dlsn.eval",
        description="Y-channel PSNR/SSIM of a checkpoint (or of bicubic upscaling) on SR test sets, or on a "
                    "plain folder of HR images (LR made on the fly).",
    )
    parser.add_argument("--data", required=True, type=Path,
                        help="folder of test sets (<set>/HR, <set>/LR_bicubic/X<s>), one such set, or a plain "
                             "folder of HR images")
    parser.add_argument("--scale", type=int, nargs="+", choices=(2, 3, 4),
                        help="scales to evaluate, 2, 3 or 4 as in training (default: the checkpoints')")
    parser.add_argument("--checkpoint", type=Path, nargs="+", help="checkpoint file(s), one per scale")
    parser.add_argument("--bicubic", action="store_true",
                        help="also (or, without --checkpoint, only) score bicubic upscaling, in the same table")
    parser.add_argument("--degradation", type=str.upper, choices=DEGRADATIONS, default="BI",
                        help="how LR images are made: BI uses a set's stored LR_bicubic images; BD and DN, "
                             "and any plain folder, make them from the HR images (default BI)")
    parser.add_argument("--noise-sigma", type=float,
                        help="DN noise level on the 0-255 scale (default 15)")
    parser.add_argument("--sets", nargs="+", help="test sets to evaluate (default: all under --data)")
    parser.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/transposes (x8)")
    parser.add_argument("--chop", action="store_true",
                        help="the authors' test protocol: four overlapping quadrants (shave 10), split again "
                             "while one has >= 120000 LR pixels")
    parser.add_argument("--tile", type=int, metavar="SIZE",
                        help="run the model on overlapping SIZE x SIZE LR tiles, blended across the seams "
                             "(bounds memory; default: whole images)")
    parser.add_argument("--tile-overlap", type=int, default=16, metavar="PX",
                        help="overlap of neighbouring tiles in LR pixels (default 16)")
    parser.add_argument("--n-hashes", type=int, help="hash rounds at inference (default: the model's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the hash rotations and of DN noise (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--backend", default=None, help=BACKEND_HELP)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of the network (default: bfloat16 on a CPU with AVX512-BF16 or AMX, "
                             "else float32)")
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


def _set_dtype(models: dict[int, tuple[nn.Module, dict]], dtype: str | None, device: torch.device) -> None:
    """``--dtype`` (None: ``dlsn.models.precision.default_dtype``) on every model that has the setting."""
    from dlsn.models.precision import default_dtype

    for model, _ in models.values():
        if hasattr(model, "set_dtype"):
            model.set_dtype(dtype or default_dtype(device))
        elif dtype not in (None, "float32"):
            raise EvalError(f"--dtype {dtype}: the model {type(model).__name__} has no dtype setting")


def _check_args(args: argparse.Namespace) -> None:
    if not args.bicubic and not args.checkpoint:
        raise EvalError("give --checkpoint FILE [FILE ...], --bicubic, or both")
    if args.chop and args.tile is not None:
        raise EvalError("--chop and --tile are two ways of cutting the image: give one")
    if args.tile is not None and (args.tile < 2 or not 0 <= args.tile_overlap < args.tile):
        raise EvalError(f"--tile must be >= 2 and --tile-overlap in [0, --tile), got {args.tile} and "
                        f"{args.tile_overlap}")
    if args.n_hashes is not None and args.n_hashes < 1:
        raise EvalError(f"--n-hashes must be >= 1, got {args.n_hashes}")
    if args.noise_sigma is not None and args.degradation != "DN":
        raise EvalError(f"--noise-sigma is for --degradation DN, not {args.degradation}")
    if args.noise_sigma is not None and args.noise_sigma < 0:
        raise EvalError(f"--noise-sigma must be >= 0, got {args.noise_sigma}")
    if args.bicubic and not args.checkpoint and not args.scale:
        raise EvalError("--bicubic needs --scale (or a --checkpoint, whose scale it then takes)")


def method_name(config: dict) -> str:
    """The name README gives a checkpoint's network: its preset (``cpu_default``, ``paper``...), with the
    settings that differ from it (``tiny (n_feats=16)``); a network no preset is close to: its arch."""
    from dlsn.models.presets import PRESETS

    net = {key: value for key, value in config.items() if key != "scale"}
    closest: tuple[str, list[str]] | None = None
    for name, preset in PRESETS.items():
        model = dict(preset.model)
        if model.get("arch") != net.get("arch"):
            continue
        differ = sorted(key for key in set(model) | set(net) if model.get(key) != net.get(key))
        if closest is None or len(differ) < len(closest[1]):
            closest = (name, differ)
    if closest is None or len(closest[1]) > 2:
        return str(config.get("arch") or "model").upper().replace("_", "-")
    name, differ = closest
    return name + (f" ({', '.join(f'{key}={net.get(key)!r}' for key in differ)})" if differ else "")


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
    models: dict[int, tuple[nn.Module, dict]] = {}
    if args.checkpoint:
        backend = check_backend(args.backend, device)
        models = _load_models(args.checkpoint, device, backend, args.n_hashes, args.seed)
        _set_dtype(models, args.dtype, device)
    scales = list(dict.fromkeys(args.scale)) if args.scale else sorted(models)
    missing = [s for s in scales if models and s not in models]
    if missing:
        have = ", ".join(f"x{s}" for s in sorted(models))
        wanted = ", ".join(f"x{s}" for s in missing)
        raise EvalError(f"no checkpoint for scale(s) {wanted} (checkpoints: {have})")
    # Said once the arguments and checkpoints are known to be good: no note line before an error line.
    if models:
        from dlsn.models.precision import default_dtype

        dtype = getattr(torch, args.dtype or default_dtype(device))
        for line in sorted({kernels_line(m, args.backend, device, dtype) for m, _ in models.values()} - {None}):
            say(f"dlsn.eval: {line}")
    made = [name for name, folder in sets.items() if is_plain_folder(folder) or args.degradation != "BI"]
    if made:
        noise = f", noise sigma {noise_sigma:g}" if noise_sigma is not None else ""
        say(f"dlsn.eval: LR images made from the HR images with {args.degradation}{noise} for "
            f"{', '.join(made)}")
    torch.manual_seed(args.seed)
    data_options = {"degradation": args.degradation, "noise_sigma": noise_sigma, "seed": args.seed,
                    "keep_going": True, "conversions": conversions}

    results = []
    for scale in scales:
        if args.bicubic:
            results += evaluate({scale: bicubic_upscaler(scale)}, sets, method="bicubic", device=device,
                                progress=progress, **data_options)
        if scale not in models:
            continue
        model, config = models[scale]
        method = method_name(config) + ("+" if args.self_ensemble else "")
        method += " chop" if args.chop else f" tile {args.tile}/{args.tile_overlap}" if args.tile else ""
        upscale = model_upscaler(model, float(config.get("rgb_range", 255.0)), args.self_ensemble,
                                 chop=args.chop, tile=args.tile, tile_overlap=args.tile_overlap)
        results += evaluate({scale: upscale}, sets, method=method, device=device, progress=progress,
                            **data_options)
    return results


def _score_cell(values: dict[str, tuple[float, float, int]], method: str) -> str:
    return format_score(*values[method]) if method in values else "-"


def _gain_cell(values: dict[str, tuple[float, float, int]], method: str) -> str:
    if method not in values or "bicubic" not in values:
        return "-"
    gain = values[method][0] - values["bicubic"][0]
    return "-" if math.isnan(gain) else f"{gain:+.2f} dB"


def _side_by_side(results: list[SetScore], per_image: bool) -> str:
    """One scale's table: a ``PSNR / SSIM`` column per method, then each model's gain over bicubic."""
    methods = list(dict.fromkeys(r.method for r in results))
    gains = [m for m in methods if m != "bicubic"] if "bicubic" in methods else []
    set_names = list(dict.fromkeys(r.set_name for r in results))
    image_names = [f"  {s.name}" for r in results for s in r.images] if per_image else []
    width = max(len(name) for name in ["Set", *set_names, *image_names])
    cell = max(16, *(len(m) for m in methods))
    gain_labels = {m: "vs bicubic" if len(gains) == 1 else f"{m} vs bicubic" for m in gains}
    header = (f"{'Set':<{width}}  {'Images':>6}" + "".join(f"  {m:>{cell}}" for m in methods)
              + "".join(f"  {label:>10}" for label in gain_labels.values()))
    lines = [f"x{results[0].scale}: Y-PSNR (dB) / SSIM", header, "-" * len(header)]

    def row(label: str, images: str, values: dict[str, tuple[float, float, int]]) -> str:
        return (f"{label:<{width}}  {images:>6}" + "".join(f"  {_score_cell(values, m):>{cell}}" for m in methods)
                + "".join(f"  {_gain_cell(values, m):>{max(10, len(gain_labels[m]))}}" for m in gains))

    for set_name in set_names:
        rows = {r.method: r for r in results if r.set_name == set_name}
        count = max(r.n_images for r in rows.values())
        lines.append(row(set_name, str(count), {m: (r.psnr, r.ssim, r.n_images) for m, r in rows.items()}))
        if per_image:
            for image in dict.fromkeys(s.name for r in rows.values() for s in r.images):
                lines.append(row(f"  {image}", "", {m: (s.psnr, s.ssim, 1) for m, r in rows.items()
                                                     for s in r.images if s.name == image}))
    return "\n".join(lines)


def format_side_by_side(results: Sequence[SetScore], per_image: bool = False) -> str:
    """``format_tables``, except that the methods scored at one scale (``--checkpoint X --bicubic``) share
    one table: a ``PSNR / SSIM`` column per method, and each model's gain over bicubic."""
    scales = list(dict.fromkeys(r.scale for r in results))
    if all(len({r.method for r in results if r.scale == s}) == 1 for s in scales):
        return format_tables(results, per_image=per_image)
    return "\n\n".join(_side_by_side([r for r in results if r.scale == s], per_image) for s in scales)


def _main(args: argparse.Namespace) -> int:
    conversions: dict[str, str] = {}
    results = _run(args, conversions)
    if conversions:
        print(f"dlsn.eval: note: {format_conversions(sorted(conversions.items()))}")
    print(format_side_by_side(results, per_image=args.per_image))
    extra = {"data": str(args.data), "self_ensemble": bool(args.self_ensemble), "seed": args.seed,
             "n_hashes": args.n_hashes, "chop": bool(args.chop), "tile": args.tile,
             "tile_overlap": args.tile_overlap if args.tile else None,
             "checkpoints": [str(p) for p in args.checkpoint or []],
             "degradation": args.degradation}
    # An image too small to score is the same at every method: listed once per (set, scale).
    skipped = dict.fromkeys((f"{r.set_name}/{name} at x{r.scale}", why) for r in results for name, why in r.skipped)
    if skipped:
        listed = "; ".join(f"{name} ({why})" for name, why in skipped)
        print(f"dlsn.eval: skipped {len(skipped)} image(s) too small to score, the others are scored: {listed}",
              file=sys.stderr)
    non_finite = sorted({r.method for r in results if any(math.isnan(s.psnr) for s in r.images)})
    if non_finite:
        print(f"dlsn.eval: warning: {', '.join(non_finite)} gave non-finite output (NaN/inf) on some images: "
              "their scores are NaN; the checkpoint's weights or --dtype may have overflowed", file=sys.stderr)
    for path, write in ((args.csv, lambda: write_csv(results, args.csv)),
                        (args.json, lambda: write_json(results, args.json, extra))):
        if path:
            with saving(path, "the scores printed above"):
                print(f"wrote {write()}")
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
