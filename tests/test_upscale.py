"""`python -m dlsn.upscale`: the command, its errors, tiling and self-ensemble."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dlsn.evaluation import self_ensemble as forward_self_ensemble
from dlsn.images import read_image
from dlsn.models import build_model, save_checkpoint
from dlsn.upscale import forward_tiled, main, upscale_tensor
from tests.helpers import assert_each_default_once

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("tiny", 2, chunk_size=16)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_x2.pt", model)


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def run(*args) -> int:
    return main([str(a) for a in args] + ["--backend", "reference", "--device", "cpu"])


def test_one_image(tiny_checkpoint, tmp_path, capsys):
    source = write_png(tmp_path / "photo.png", 9, 7)
    target = tmp_path / "out" / "photo_sr.png"
    assert run(source, target, "--checkpoint", tiny_checkpoint) == 0
    assert read_image(target).shape == (14, 18, 3)
    assert str(target) in capsys.readouterr().out
    first = target.read_bytes()
    assert run(source, target, "--checkpoint", tiny_checkpoint) == 0
    assert target.read_bytes() == first  # seeded rotations: the same pixels every run


def test_trailing_slash_names_a_new_folder(tiny_checkpoint, tmp_path):
    source = write_png(tmp_path / "small.png", 4, 3)
    assert run(source, f"{tmp_path / 'new'}/", "--checkpoint", tiny_checkpoint) == 0
    assert read_image(tmp_path / "new" / "small_x2.png").shape == (6, 8, 3)


def test_folder(tiny_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", 6, 5, seed=1)
    write_png(inputs / "b.png", 4, 8, seed=2)
    (inputs / "notes.txt").write_text("not an image")
    outputs = tmp_path / "out"
    assert run(inputs, outputs, "--checkpoint", tiny_checkpoint, "--n-hashes", "1", "--self-ensemble") == 0
    assert sorted(p.name for p in outputs.iterdir()) == ["a_x2.png", "b_x2.png"]
    assert read_image(outputs / "b_x2.png").shape == (16, 8, 3)
    assert "2 images in" in capsys.readouterr().out


def test_image_into_existing_folder_and_tiles(tiny_checkpoint, tmp_path):
    source = write_png(tmp_path / "big.png", 20, 13)
    outputs = tmp_path / "out"
    outputs.mkdir()
    assert run(source, outputs, "--checkpoint", tiny_checkpoint, "--tile", "8", "--tile-overlap", "2") == 0
    assert read_image(outputs / "big_x2.png").shape == (26, 40, 3)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_checkpoint", "checkpoint not found"),
        ("empty_folder", "no images in folder"),
        ("unreadable", "cannot read image"),
        ("too_small", "smallest input is 2x2"),
        ("folder_to_file", "OUT must be a folder"),
        ("bad_out_name", "neither a folder nor an image file"),
        ("bad_overlap", "--tile-overlap"),
        ("missing_input", "input not found"),
    ],
)
def test_errors_are_clear(setup, message, tiny_checkpoint, tmp_path, capsys):
    checkpoint = tiny_checkpoint
    source, target, extra = write_png(tmp_path / "ok.png", 5, 5), tmp_path / "out.png", []
    if setup == "missing_checkpoint":
        checkpoint = tmp_path / "missing.pt"
    elif setup == "empty_folder":
        source = tmp_path / "empty"
        source.mkdir()
        target = tmp_path / "out"
    elif setup == "unreadable":
        source = tmp_path / "broken.png"
        source.write_bytes(b"no png here")
    elif setup == "too_small":
        source = write_png(tmp_path / "line.png", 5, 1)
    elif setup == "folder_to_file":
        source = tmp_path / "images"
        source.mkdir()
        write_png(source / "x.png", 4, 4)
        target = write_png(tmp_path / "exists.png", 2, 2)
    elif setup == "bad_out_name":
        target = tmp_path / "result.unknown"
    elif setup == "bad_overlap":
        extra = ["--tile", "8", "--tile-overlap", "8"]
    elif setup == "missing_input":
        source = tmp_path / "nothing.png"
    assert run(source, target, "--checkpoint", checkpoint, *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_module_runs_as_a_program(tiny_checkpoint, tmp_path):
    source = write_png(tmp_path / "p.png", 4, 4)
    result = subprocess.run(
        [sys.executable, "-m", "dlsn.upscale", str(source), str(tmp_path / "p2.png"),
         "--checkpoint", str(tiny_checkpoint), "--backend", "reference", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p2.png").is_file()


# ----------------------------------------------------------------------------------------------
# Tiling and self-ensemble.


class LocalSR(nn.Module):
    """x2 network with a 2-pixel receptive radius: tiles overlapping by >= 2 pixels are exact."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.body(x))


def test_tiles_blend_to_the_whole_image_output_for_a_local_network():
    torch.manual_seed(0)
    model = LocalSR()
    x = torch.rand(1, 3, 23, 17)
    with torch.no_grad():
        whole = model(x)
        assert torch.equal(forward_tiled(model, x, 2, tile=32, overlap=4), whole)
        # Receptive radius 2 <= overlap / 4: every blended pixel comes from tiles that saw its whole
        # neighbourhood, so the tiles reproduce the whole-image output (up to float rounding).
        tiled = forward_tiled(model, x, 2, tile=12, overlap=8)
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
        # Too little overlap for the radius: tile borders leak in, and the test above would notice.
        leaky = forward_tiled(model, x, 2, tile=12, overlap=4)
    assert (leaky - whole).abs().max() > 1e-3


def test_tiles_of_dlsn_have_bounded_seams(tiny_checkpoint):
    from dlsn.models import load_model

    model, _ = load_model(tiny_checkpoint, backend="reference")
    model.set_inference(seed=0)
    x = torch.rand(1, 3, 20, 18) * 255
    whole = upscale_tensor(model, x)
    tiled = upscale_tensor(model, x, tile=12, tile_overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 40, 36)
    # GLA is global, so tiles cannot be exact; with random weights the outputs stay within a few
    # levels of the whole-image pass.
    difference = (tiled - whole).abs()
    assert difference.mean() < 0.05 * whole.std()


def test_self_ensemble_undoes_each_transform():
    # Nearest upsampling commutes with flips and transposes, so the ensemble equals one pass;
    # a wrong inverse would misplace pixels of this non-square, non-symmetric input.
    upsample = nn.Upsample(scale_factor=2, mode="nearest")
    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    torch.testing.assert_close(forward_self_ensemble(upsample, x), upsample(x), rtol=0, atol=0)
    shifted = forward_self_ensemble(lambda t: upsample(t) + 8.0, x)
    torch.testing.assert_close(shifted, upsample(x) + 8.0)


def test_bad_tiling_arguments():
    model = LocalSR()
    x = torch.rand(1, 3, 9, 9)
    with pytest.raises(ValueError, match="tile_overlap"):
        forward_tiled(model, x, 2, tile=4, overlap=4)
    with pytest.raises(ValueError, match="tile must be"):
        forward_tiled(model, x, 2, tile=1, overlap=0)


# ----------------------------------------------------------------------------------------------
# A careless user's inputs: one line each, folder runs that finish, conversions said, Ctrl-C.


def test_a_folder_run_upscales_every_good_image_and_lists_the_bad_ones(tiny_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", 6, 5, seed=1)
    (inputs / "b_broken.png").write_bytes(b"not a png")
    write_png(inputs / "c_line.png", 6, 1, seed=3)
    write_png(inputs / "d.png", 5, 4, seed=4)
    outputs = tmp_path / "out"
    assert run(inputs, outputs, "--checkpoint", tiny_checkpoint) == 1
    assert sorted(p.name for p in outputs.iterdir()) == ["a_x2.png", "d_x2.png"]  # after the bad ones too
    captured = capsys.readouterr()
    assert "wrote 2 images in" in captured.out
    failure_lines = [line for line in captured.err.splitlines() if "failed" in line]
    assert len(failure_lines) == 1 and "Traceback" not in captured.err
    assert "failed: 2 of 4 images: b_broken.png (cannot read image" in failure_lines[0]
    assert "c_line.png (image is 6x1 pixels" in failure_lines[0]


def test_colour_mode_and_bit_depth_conversions_are_stated_in_one_line(tiny_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)).save(inputs / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (5, 6), dtype=np.uint16)).save(inputs / "grey16.png")
    write_png(inputs / "plain.png", 6, 5)
    assert run(inputs, tmp_path / "out", "--checkpoint", tiny_checkpoint) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "converted" in line]
    assert notes == ["dlsn.upscale: note: converted to 8-bit RGB on reading: grey16.png (16-bit greyscale), "
                     "rgba.png (RGBA, alpha dropped)"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"some text, not a checkpoint\n", "is not a readable checkpoint"),
        (bytes(range(256)) * 8, "is not a readable checkpoint"),
    ],
    ids=["text", "binary"],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content, message):
    fake = tmp_path / "model.pt"
    fake.write_bytes(content)
    assert run(write_png(tmp_path / "p.png", 4, 4), tmp_path / "o.png", "--checkpoint", fake) == 2
    err = capsys.readouterr().err
    assert err == f"dlsn.upscale: error: {fake} {message} (not written by torch.save, or corrupt or truncated)\n"


def test_bad_device_and_backend_are_one_line(tiny_checkpoint, tmp_path, capsys):
    source = write_png(tmp_path / "p.png", 4, 4)
    assert main([str(source), str(tmp_path / "o.png"), "--checkpoint", str(tiny_checkpoint),
                 "--backend", "fastest"]) == 2
    assert capsys.readouterr().err.startswith("dlsn.upscale: error: --backend 'fastest' is not a backend")
    assert main([str(source), str(tmp_path / "o.png"), "--checkpoint", str(tiny_checkpoint),
                 "--device", "nonsense"]) == 2
    assert "--device 'nonsense' is not a torch device" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_a_bug_keeps_its_traceback(tiny_checkpoint, tmp_path, monkeypatch):
    import dlsn.upscale as upscale_module

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel bug")

    monkeypatch.setattr(upscale_module, "upscale_array", broken)
    with pytest.raises(RuntimeError, match="a kernel bug"):
        run(write_png(tmp_path / "p.png", 4, 4), tmp_path / "o.png", "--checkpoint", tiny_checkpoint)


def test_ctrl_c_keeps_the_images_written_and_says_so(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import dlsn.upscale as upscale_module

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_png(inputs / f"{i}.png", 5, 5, seed=i)
    real, calls = upscale_module.upscale_array, []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(upscale_module, "upscale_array", interrupted_on_the_second)
    outputs = tmp_path / "out"
    assert run(inputs, outputs, "--checkpoint", tiny_checkpoint) == 130
    assert sorted(p.name for p in outputs.iterdir()) == ["0_x2.png"]  # whole files only, no temporaries
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"dlsn.upscale: interrupted; wrote 1 of 3 images to {outputs}"
    assert "Traceback" not in err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert_each_default_once(capsys.readouterr().out)


def test_help_says_when_each_exit_status_comes_and_that_out_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "IN OUT" in text and "needed when" not in text
    assert "OUT output image file, or a folder to write <name>_x<scale>.png into (must be a folder when IN is one)" \
        in text
    assert ("Exit status: 0 when every image was written; 1 when some images of a folder could not be read or "
            "upscaled") in text
