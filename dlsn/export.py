"""Export a checkpoint to ONNX: a standard-operator graph that ONNX Runtime (and other ONNX runtimes) can run.

    python -m dlsn.export CHECKPOINT OUT.onnx [--opset N] [--dtype float32|float16] [--seed S] [--check IMAGE]

CHECKPOINT is anything :func:`dlsn.models.checkpoint.load_model` reads (our ``.pt`` and ``model.safetensors``,
the authors' state dicts). The graph takes ``image [N, 3, H, W]`` in [0, 1] (any N, H, W >= 2) and returns
``output [N, 3, sH, sW]`` in [0, 1]; the model's ``rgb_range`` is applied inside. Every node is in the
default ONNX domain. GLA's hash rotations are drawn at export from ``--seed`` exactly as
``python -m dlsn.upscale --seed S`` draws them, for every bucket count, so the graph gives the pixels that
command gives (``dlsn/onnx_graph.py`` says how the hash, the sort and the attention are expressed).

``--check IMAGE`` runs the written graph with ONNX Runtime on the CPU and the checkpoint with PyTorch (as
``dlsn.upscale`` does, float32) on IMAGE, and prints the PSNR between the two outputs. Bad input (an
unreadable checkpoint, an opset outside the supported range, an unwritable OUT) prints one line and exits 2.

The graph is built with ``torch.onnx.export(..., dynamo=True)``: ``torch.export`` traces H and W as symbols,
so the bucket count, the padding and the chunk count are computed in the graph from the input's shape.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlsn.cli import run_tool
from dlsn.errors import UserInputError, one_line

__all__ = ["DEFAULT_OPSET", "DTYPES", "OPSETS", "check_onnx", "export_onnx", "main", "project_version"]

# Opsets the exporter writes and ONNX Runtime 1.2x loads for this graph (tests/test_export.py exports the ends).
OPSETS = range(18, 24)
DEFAULT_OPSET = 18  # the oldest that takes every op here as an input-sized op (Slice/TopK/ReduceMax axes as inputs)
DTYPES = {"float32": torch.float32, "float16": torch.float16}
INPUT_NAME = "image"
OUTPUT_NAME = "output"
# Example input of the trace: batch and sides >= 2 (torch.export fixes sizes 0 and 1), unequal sides so that H
# and W get separate symbols.
EXAMPLE_SIZE = (2, 3, 20, 17)


def project_version() -> str:
    """The installed dlsn-kernels version (the one in pyproject.toml when run from a checkout)."""
    try:
        return metadata.version("dlsn-kernels")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        return "unknown"


def _load(checkpoint: Path, seed: int) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model as ``dlsn.upscale`` prepares it (eval, inference seed, float32), its config and checkpoint."""
    from dlsn.models.checkpoint import load_checkpoint, load_model

    model, config = load_model(checkpoint, map_location="cpu")
    if hasattr(model, "set_inference"):
        model.set_inference(seed=seed)
    if hasattr(model, "set_dtype"):
        model.set_dtype("float32")
    extra = load_checkpoint(checkpoint).get("extra", {}) or {}
    return model, config, extra


def _clean_up(model: Any) -> None:
    """The exporter's optimizer without its pattern rewriter, in place on the ``onnx_ir`` model: constant folding,
    dead nodes, constants as initializers, duplicate initializers and common subexpressions merged. The rewriter
    (``optimize=True``) took most of the export time (70 of 126 s for ``tiny`` on a loaded 2-core machine) and
    finds nothing to fuse in this graph's ops."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        _constant_folding.FoldConstantsPass(shape_inference=False, input_size_limit=8192, output_size_limit=262144),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _strip_debug_info(model: Any) -> None:
    """Drops the exporter's per-node debug strings (Python stack traces, FX names): they hold paths of this
    machine and make the file bigger; the graph is the same without them."""
    for graph in [model.graph, *(f for f in model.functions)]:
        nodes = list(graph.node)
        for node in nodes:
            node.doc_string = ""
            del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        del value.metadata_props[:]
    for initializer in model.graph.initializer:
        del initializer.metadata_props[:]
    model.graph.doc_string = ""


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, Any]:
    """Writes the ONNX graph of ``checkpoint`` to ``out``; returns its metadata (as stored in the file).

    Raises :class:`UserInputError` for an unreadable checkpoint, an opset outside :data:`OPSETS`, an unknown
    dtype or an unwritable ``out``.
    """
    import onnx

    from dlsn.atomic_files import write_atomically
    from dlsn.onnx_graph import export_network, gla_attention_onnx, gla_attention_op

    if opset not in OPSETS:
        raise UserInputError(f"--opset {opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1}")
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserInputError(f"cannot write {out}: folder {out.parent} does not exist")
    model, config, extra = _load(Path(checkpoint), seed)
    graph_module = export_network(model, DTYPES[dtype])
    example = torch.rand(EXAMPLE_SIZE, dtype=DTYPES[dtype])
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=2),
            3: torch.export.Dim("width", min=2)}
    # Autograd on while tracing: the network's inference-only paths (the banded tail, in-place skips) are
    # Python loops and in-place updates; with autograd on it takes the whole-tensor forms (nothing needs grad).
    with torch.enable_grad():
        program = torch.onnx.export(
            graph_module, (example,), None, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=(dims,), optimize=False, verbose=False,
            custom_translation_table={gla_attention_op._opoverload: gla_attention_onnx},
        )
    _clean_up(program.model)
    proto = program.model_proto
    _strip_debug_info(proto)
    name = str(extra.get("preset") or config.get("arch", "model"))
    info = {
        "name": name,
        "arch": str(config.get("arch")),
        "scale": str(config.get("scale")),
        "version": f"dlsn-kernels {project_version()}",
        "seed": str(seed),
        "dtype": dtype,
        "config": json.dumps(config, sort_keys=True),
        "input": f"{INPUT_NAME} [N, 3, H, W] RGB in [0, 1], {dtype}",
        "output": f"{OUTPUT_NAME} [N, 3, {config.get('scale')}H, {config.get('scale')}W] RGB in [0, 1]",
    }
    del proto.metadata_props[:]
    for key, value in info.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "dlsn-kernels"
    proto.producer_version = project_version()
    proto.doc_string = (f"DLSN super-resolution x{config.get('scale')} ({name}); GLA hash rotations drawn from "
                        f"seed {seed}, as python -m dlsn.upscale --seed {seed} draws them")
    onnx.checker.check_model(proto, full_check=False)
    data = proto.SerializeToString(deterministic=True)
    try:
        write_atomically(out, lambda handle: handle.write(data), durable=False)
    except OSError as error:
        raise UserInputError(f"cannot write {out}: {error}") from error
    return info


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def check_onnx(onnx_path: str | Path, checkpoint: str | Path, image_path: str | Path, seed: int = 0) -> dict[str, Any]:
    """Runs ``onnx_path`` with ONNX Runtime (CPU) and ``checkpoint`` with PyTorch (float32, seed ``seed``, as
    ``dlsn.upscale`` does) on one image: PSNR of the float outputs (peak 1) and of the 8-bit images, the sizes,
    how many 8-bit values differ, and both run times."""
    import onnxruntime as ort

    from dlsn.images import decode_image, tensor_to_uint8, uint8_to_tensor
    from dlsn.upscale import upscale_tensor

    image_path = Path(image_path)
    if not image_path.is_file():
        raise UserInputError(f"--check image not found: {image_path}")
    try:
        image, _ = decode_image(image_path)
    except (OSError, ValueError) as error:
        raise UserInputError(f"--check: cannot read {image_path}: {one_line(error)}") from error

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_type = session.get_inputs()[0].type
    x = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    if "float16" in input_type:
        x = x.astype(np.float16)
    start = time.perf_counter()
    onnx_out = session.run(None, {INPUT_NAME: np.ascontiguousarray(x)})[0].astype(np.float32)[0]
    onnx_seconds = time.perf_counter() - start

    model, config, _ = _load(Path(checkpoint), seed)
    rgb_range = float(config.get("rgb_range", 255.0))
    start = time.perf_counter()
    # dlsn.upscale's path: upscale_tensor (one whole-image pass without gradients), then tensor_to_uint8.
    torch_out = upscale_tensor(model, uint8_to_tensor(image, rgb_range)[None])[0]
    torch_seconds = time.perf_counter() - start
    torch_uint8 = tensor_to_uint8(torch_out, rgb_range)  # exactly what dlsn.upscale writes
    torch_float = (torch_out / rgb_range).clamp(0, 1).numpy()
    onnx_uint8 = np.clip(np.round(onnx_out * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return {
        "image": image_path.name,
        "input_size": f"{image.shape[1]}x{image.shape[0]}",
        "onnx_size": f"{onnx_out.shape[2]}x{onnx_out.shape[1]}",
        "torch_size": f"{torch_float.shape[2]}x{torch_float.shape[1]}",
        "same_size": onnx_out.shape == torch_float.shape,
        "psnr_float": _psnr(onnx_out, torch_float, 1.0) if onnx_out.shape == torch_float.shape else None,
        "psnr_uint8": _psnr(onnx_uint8, torch_uint8, 255.0) if onnx_uint8.shape == torch_uint8.shape else None,
        "uint8_values_differ": int(np.count_nonzero(onnx_uint8 != torch_uint8))
        if onnx_uint8.shape == torch_uint8.shape else None,
        "max_abs_diff": float(np.abs(onnx_out - torch_float).max()) if onnx_out.shape == torch_float.shape else None,
        "onnx_seconds": onnx_seconds,
        "torch_seconds": torch_seconds,
    }


def _format_db(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf dB (identical)" if math.isinf(value) else f"{value:.2f} dB"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dlsn.export",
        description="Export a DLSN checkpoint to an ONNX graph of standard operators: input image [N, 3, H, W] "
                    "in [0, 1], dynamic N, H, W; output [N, 3, sH, sW] in [0, 1]. Exit status 2 for bad input.",
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="our .pt / model.safetensors, or an authors' state dict")
    parser.add_argument("out", type=Path, metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--opset", default=str(DEFAULT_OPSET),
                        help=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default) or float16 (weights and activations; the hash and the "
                             "attention stay float32 inside)")
    parser.add_argument("--seed", default="0",
                        help="seed of the hash rotations, as dlsn.upscale --seed (default 0)")
    parser.add_argument("--check", type=Path, default=None, metavar="IMAGE",
                        help="run the graph with ONNX Runtime (CPU) and the checkpoint with PyTorch on IMAGE "
                             "and print the PSNR between them")
    return parser


def _int_arg(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"{name} must be an integer, got {value!r}") from None


def _run(args: argparse.Namespace) -> int:
    opset = _int_arg(args.opset, "--opset")
    seed = _int_arg(args.seed, "--seed")
    if args.check is not None and not args.check.is_file():
        raise UserInputError(f"--check image not found: {args.check}")
    start = time.perf_counter()
    info = export_onnx(args.checkpoint, args.out, opset=opset, dtype=args.dtype, seed=seed)
    seconds = time.perf_counter() - start
    size_mb = args.out.stat().st_size / 1e6
    print(f"dlsn.export: wrote {args.out} ({info['name']} x{info['scale']}, {args.dtype}, opset {opset}, "
          f"seed {seed}; {size_mb:.1f} MB, {seconds:.1f} s)")
    if args.check is not None:
        result = check_onnx(args.out, args.checkpoint, args.check, seed=seed)
        print(f"dlsn.export: check {result['image']} ({result['input_size']}): ONNX Runtime CPU "
              f"{result['onnx_size']} in {result['onnx_seconds']:.2f} s, PyTorch {result['torch_size']} in "
              f"{result['torch_seconds']:.2f} s; PSNR {_format_db(result['psnr_float'])} (float), "
              f"{_format_db(result['psnr_uint8'])} (8-bit, {result['uint8_values_differ']} values differ), "
              f"max |diff| {result['max_abs_diff']:.2e}")
        if not result["same_size"]:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_tool("dlsn.export", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
