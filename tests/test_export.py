"""``python -m dlsn.export``: the ONNX graph is standard, runs in ONNX Runtime and gives PyTorch's pixels.

Three small networks are exported once per module: ``tiny`` (DLSN, two GLA blocks, K = 64, R = 2, x2, default
opset), ``cpu_default`` (DLSN with a bicubic residual, K = 32, R = 1, x3, the newest opset) and ``nlsn_small``
(NLSN, two NLSA blocks, K = 32, R = 2, rgb_range 1). Sizes are odd and chosen for their chunk count nc
(1, 2, 3+) and bucket count B. No network here holds both GLA and NLSA blocks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("onnxscript", reason="the export extra is not installed")

from dlsn.export import OPSETS, check_onnx, export_onnx, main  # noqa: E402
from dlsn.images import write_image  # noqa: E402
from dlsn.models import GLA, build_model, load_model, save_checkpoint  # noqa: E402
from dlsn.models.nlsn import NLSA  # noqa: E402
from dlsn.onnx_graph import BUCKET_COUNTS, ExportGLA, ExportNLSA, bank_offset, rotation_bank  # noqa: E402
from dlsn_kernels import n_buckets_for  # noqa: E402

SEED = 3
REPO = Path(__file__).resolve().parents[1]


def _checkpoint(folder: Path, preset: str, scale: int) -> Path:
    torch.manual_seed(0)
    model = build_model(preset, scale)
    # Untrained tails are near zero (cpu_default's last conv is zero): give every weight some size so the
    # attention's contribution reaches the output.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.02)
    return save_checkpoint(folder / f"{preset}_x{scale}.pt", model)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint = _checkpoint(folder, "tiny", 2)
    export_onnx(checkpoint, folder / "tiny.onnx", seed=SEED)
    return checkpoint, folder / "tiny.onnx"


@pytest.fixture(scope="module")
def residual(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("residual")
    checkpoint = _checkpoint(folder, "cpu_default", 3)
    export_onnx(checkpoint, folder / "cpu_default.onnx", seed=SEED, opset=OPSETS[-1])
    return checkpoint, folder / "cpu_default.onnx"


@pytest.fixture(scope="module")
def nlsn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("nlsn")
    checkpoint = _checkpoint(folder, "nlsn_small", 2)
    export_onnx(checkpoint, folder / "nlsn_small.onnx", seed=SEED)
    return checkpoint, folder / "nlsn_small.onnx"


def _pytorch(checkpoint: Path, image: torch.Tensor) -> np.ndarray:
    """What dlsn.upscale computes (float32, inference seed), in [0, 1]."""
    model, config = load_model(checkpoint)
    model.set_inference(seed=SEED)
    model.set_dtype("float32")
    rgb_range = config["rgb_range"]
    with torch.inference_mode():
        return (model(image * rgb_range) / rgb_range).clamp(0, 1).numpy()


def _onnx(path: Path, image: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.numpy()})[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _chunks(height: int, width: int, chunk_size: int) -> int:
    return -(-height * width // chunk_size)


@pytest.mark.parametrize("fixture", ["tiny", "residual"])
def test_graph_is_standard_onnx(fixture: str, request: pytest.FixtureRequest) -> None:
    _, path = request.getfixturevalue(fixture)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in model.opset_import] in ([("", o)] for o in OPSETS)
    assert not model.functions
    ops = {node.op_type for node in model.graph.node}
    assert {"TopK", "ArgMax", "ScatterElements", "Conv"} <= ops
    (image,), (output,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == ["batch", 3, "height", "width"]
    out_dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert output.name == "output" and out_dims[:2] == ["batch", 3]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["scale"] == str({"tiny": 2, "residual": 3}[fixture])
    assert meta["name"] == {"tiny": "dlsn", "residual": "dlsn_residual"}[fixture]
    assert meta["version"].startswith("dlsn-kernels ") and meta["seed"] == str(SEED)


# (height, width): nc and B for tiny (K = 64) in the id.
@pytest.mark.parametrize("size", [(7, 9), (9, 9), (13, 11), (17, 15), (31, 29)],
                         ids=["nc1-B1", "nc2-B2", "nc3-B2", "nc4-B4", "nc15-B14"])
def test_tiny_matches_pytorch(tiny: tuple[Path, Path], size: tuple[int, int]) -> None:
    checkpoint, path = tiny
    torch.manual_seed(1)
    image = torch.rand(1, 3, *size)
    ours, theirs = _onnx(path, image), _pytorch(checkpoint, image)
    assert ours.shape == theirs.shape == (1, 3, 2 * size[0], 2 * size[1])
    assert _psnr(ours, theirs) >= 50
    assert float(np.abs(ours - theirs).max()) < 1e-3


def test_tiny_sizes_cover_chunk_and_bucket_counts() -> None:
    sizes = [(7, 9), (9, 9), (13, 11), (17, 15), (31, 29)]
    assert [_chunks(h, w, 64) for h, w in sizes] == [1, 2, 3, 4, 15]
    assert [n_buckets_for(h * w, 64) for h, w in sizes] == [1, 2, 2, 4, 14]


@pytest.mark.parametrize("size", [(5, 5), (7, 9), (11, 9)], ids=["nc1-B1", "nc2-B2", "nc4-B4"])
def test_residual_network_matches_pytorch(residual: tuple[Path, Path], size: tuple[int, int]) -> None:
    checkpoint, path = residual
    assert _chunks(*size, 32) == {(5, 5): 1, (7, 9): 2, (11, 9): 4}[size]
    torch.manual_seed(2)
    image = torch.rand(1, 3, *size)
    ours, theirs = _onnx(path, image), _pytorch(checkpoint, image)
    assert ours.shape == theirs.shape == (1, 3, 3 * size[0], 3 * size[1])
    assert _psnr(ours, theirs) >= 50


@pytest.mark.parametrize("size", [(5, 5), (7, 9), (9, 13), (31, 29)],
                         ids=["nc1-B1", "nc2-B2", "nc4-B4", "nc29-B28"])
def test_nlsn_matches_pytorch(nlsn: tuple[Path, Path], size: tuple[int, int]) -> None:
    checkpoint, path = nlsn
    assert (_chunks(*size, 32), n_buckets_for(size[0] * size[1], 32)) == {
        (5, 5): (1, 1), (7, 9): (2, 2), (9, 13): (4, 4), (31, 29): (29, 28)}[size]
    torch.manual_seed(4)
    image = torch.rand(1, 3, *size)
    ours, theirs = _onnx(path, image), _pytorch(checkpoint, image)
    assert ours.shape == theirs.shape == (1, 3, 2 * size[0], 2 * size[1])
    assert _psnr(ours, theirs) >= 50
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}


def test_export_module_equals_nlsa_blocks() -> None:
    """ExportNLSA (bank of cat[R, -R], no learned score) equals each NLSA block in eval mode."""
    torch.manual_seed(0)
    model = build_model("nlsn_small", 2).eval()
    model.set_inference(seed=SEED)
    blocks = [m for m in model.modules() if isinstance(m, NLSA)]
    assert len(blocks) == 2
    for block in blocks:
        swapped = ExportNLSA(block)
        for size in [(5, 5), (9, 9), (23, 21)]:
            x = torch.randn(1, block.channels, *size)
            with torch.no_grad():
                torch.testing.assert_close(swapped(x), block(x), rtol=1e-4, atol=1e-5)


def test_batch_of_two_images(tiny: tuple[Path, Path]) -> None:
    checkpoint, path = tiny
    torch.manual_seed(3)
    image = torch.rand(2, 3, 9, 13)
    ours = _onnx(path, image)
    assert ours.shape == (2, 3, 18, 26)
    for index in range(2):  # each image as PyTorch computes it alone
        assert _psnr(ours[index:index + 1], _pytorch(checkpoint, image[index:index + 1])) >= 50


def test_export_twice_gives_identical_files_and_check_prints_psnr(
    residual: tuple[Path, Path], tmp_path: Path
) -> None:
    """A second export, from the command line in a new process, gives the same bytes; --check reports."""
    checkpoint, first = residual
    image = tmp_path / "small.png"
    write_image(image, np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    second = tmp_path / "again.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "dlsn.export", str(checkpoint), str(second), "--seed", str(SEED),
         "--opset", str(OPSETS[-1]), "--check", str(image)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert second.read_bytes() == first.read_bytes()
    lines = [line for line in result.stdout.splitlines() if line.startswith("dlsn.export:")]
    assert len(lines) == 2 and "PSNR" in lines[1] and "33x27" in lines[1]


def test_check_onnx_reports_psnr(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, path = tiny
    image = tmp_path / "odd.png"
    write_image(image, np.random.default_rng(1).integers(0, 256, (13, 9, 3), dtype=np.uint8))
    result = check_onnx(path, checkpoint, image, seed=SEED)
    assert result["same_size"] and result["onnx_size"] == "18x26"
    assert result["psnr_float"] >= 50 and result["psnr_uint8"] >= 50


def test_export_module_equals_gla_blocks() -> None:
    """ExportGLA (rotations from the bank, eagerly the reference op) equals each GLA block in eval mode with its
    inference seed, at sizes with different bucket counts."""
    torch.manual_seed(0)
    model = build_model("tiny", 2).eval()
    model.set_inference(seed=SEED)
    blocks = [m for m in model.modules() if isinstance(m, GLA)]
    assert len(blocks) == 2
    for block in blocks:
        swapped = ExportGLA(block)
        for size in [(5, 7), (9, 9), (23, 21)]:
            x = torch.randn(1, block.channels, *size)
            with torch.no_grad():
                torch.testing.assert_close(swapped(x), block(x), rtol=1e-4, atol=1e-5)


def test_rotation_bank_layout() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 2).eval()
    model.set_inference(seed=SEED)
    block = next(m for m in model.modules() if isinstance(m, GLA))
    bank = rotation_bank(block)
    assert bank.shape == (block.channels // block.reduction, block.rounds(), sum(BUCKET_COUNTS))
    starts = [bank_offset(b) for b in BUCKET_COUNTS]
    assert starts == [sum(BUCKET_COUNTS[:i]) for i in range(len(BUCKET_COUNTS))]
    for n_buckets in (2, 6, 128):
        start = bank_offset(n_buckets)
        expected = block.rotations(n_buckets * block.chunk_size, torch.device("cpu"))
        torch.testing.assert_close(bank[:, :, start:start + n_buckets], expected, rtol=0, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "{out}"], "checkpoint not found"),
    (["{garbage}", "{out}"], "not a readable checkpoint"),
    (["{garbage}", "{out}", "--opset", "7"], "--opset 7 is not supported"),
    (["{garbage}", "{out}", "--opset", "x"], "--opset must be an integer"),
    (["{garbage}", "{out}", "--dtype", "int8"], "--dtype 'int8'"),
    (["{garbage}", "{nofolder}"], "does not exist"),
], ids=["missing", "unreadable", "opset", "opset-text", "dtype", "out-folder"])
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n")
    paths = {"missing": tmp_path / "missing.pt", "garbage": garbage, "out": tmp_path / "out.onnx",
             "nofolder": tmp_path / "no" / "out.onnx"}
    assert main([a.format(**paths) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlsn.export: error:") and message in lines[0]
    assert not (tmp_path / "out.onnx").exists()
