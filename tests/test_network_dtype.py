"""The networks' compute dtype (``dlsn.models.precision``, the tools' ``--dtype``): bfloat16 autocast gives
float32 outputs close to the float32 ones, the default follows the CPU's instructions, and the tools take
the flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dlsn.metrics import psnr_y
from dlsn.models import build_model, precision
from dlsn.models.checkpoint import save_checkpoint
from dlsn.upscale import main as upscale_main


@pytest.mark.parametrize("preset", ["tiny", "cpu_default", "cnn"])
def test_bfloat16_output_is_float32_and_close(preset):
    torch.manual_seed(0)
    model = build_model(preset, 2, backend="reference").eval()
    if preset != "tiny":  # residual presets start as bicubic: perturb the zeroed last conv
        torch.nn.init.normal_(model.tail[-1].weight, std=0.01)
    model.set_inference(seed=0)
    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        want = model(x)
        model.set_dtype("bfloat16")
        got = model(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.equal(got, want)  # it did run in bfloat16
    assert psnr_y(got.clamp(0, 255) / 255, want.clamp(0, 255) / 255, 2) > 35.0
    model.set_dtype("float32")
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_set_dtype_rejects_other_dtypes():
    model = build_model("tiny", 2, backend="reference")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        model.set_dtype("float16")


def test_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.default_dtype("cpu") == "bfloat16"
    assert precision.default_dtype("cuda") == "float32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.default_dtype("cpu") == "float32"


def test_with_dtype_wraps_a_forward():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(1, 3, 8, 8)
    assert precision.with_dtype(conv, "float32") is conv
    y = precision.with_dtype(conv, "bfloat16")(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, conv(x), atol=0.05, rtol=0.05)


def test_upscale_takes_dtype(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny_x2.pt", build_model("tiny", 2, chunk_size=16))
    source = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(source)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        target = tmp_path / f"{dtype}.png"
        assert upscale_main([str(source), str(target), "--checkpoint", str(ckpt), "--backend", "reference",
                             "--device", "cpu", "--dtype", dtype]) == 0
        assert f"(x2, cpu, {dtype})" in capsys.readouterr().out
        outputs[dtype] = np.asarray(Image.open(target)).astype(np.float64)
    assert outputs["float32"].shape == (20, 24, 3)
    assert np.abs(outputs["float32"] - outputs["bfloat16"]).mean() < 2.0
