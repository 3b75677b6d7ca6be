"""The banded inference tail (dlsn/models/tail.py) against the whole-image tail."""

import pytest
import torch
from torch import nn

import dlsn.models.tail as tail_mod
from dlsn.models import Upsampler, build_model
from dlsn.models.dlsn import conv3x3
from dlsn.models.tail import run_tail, tail_halo


def _tail(scale: int, channels: int = 8) -> nn.Sequential:
    torch.manual_seed(scale)
    return nn.Sequential(Upsampler(scale, channels), conv3x3(channels, 3)).eval()


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("height", [17, 40, 53])
def test_bands_match_the_whole_tail(scale, height):
    tail = _tail(scale)
    x = torch.randn(2, 8, height, 11)
    with torch.no_grad():
        whole = tail(x)
        banded = run_tail(tail, x, scale, band_pixels=16)  # 16 rows a band: several bands, a short last one
    assert banded.shape == whole.shape == (2, 3, height * scale, 11 * scale)
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-5)


def test_halo_counts_each_convolution_and_refuses_non_local_layers():
    assert tail_halo(_tail(2)) == 2 and tail_halo(_tail(3)) == 2 and tail_halo(_tail(4)) == 3
    assert tail_halo(nn.Sequential(nn.Conv2d(3, 3, 3, stride=2, padding=1))) is None
    assert tail_halo(nn.Sequential(nn.Conv2d(3, 3, 5, padding=1))) is None  # padding is not the kernel's reach
    assert tail_halo(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Upsample(scale_factor=2))) is None


def test_whole_tail_under_autograd_and_for_a_single_band():
    tail = _tail(2)
    x = torch.randn(1, 8, 40, 11, requires_grad=True)
    out = run_tail(tail, x, 2, band_pixels=16)  # grad enabled: whole, differentiable
    assert torch.equal(out, tail(x)) and out.requires_grad
    with torch.no_grad():
        assert torch.equal(run_tail(tail, x, 2, band_pixels=10**6), tail(x))


@pytest.mark.parametrize("preset", ["tiny", "cnn"])
def test_network_inference_in_bands(preset, monkeypatch):
    model = build_model(preset, 2, backend="cpu").eval()
    nn.init.normal_(model.tail[-1].weight, std=0.1)  # the residual presets start with a zero last conv
    x = torch.rand(1, 3, 37, 20) * 255
    with torch.no_grad():
        model.set_inference(seed=0)
        whole = model(x)
        monkeypatch.setattr(tail_mod, "BAND_PIXELS", 16 * 20)
        model.set_inference(seed=0)
        banded = model(x)
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-4)


def test_scaled_residual_in_place_only_without_autograd():
    from dlsn.models.residual import scaled_residual

    x, body = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)
    want = body * 0.1 + x
    with torch.no_grad():
        fresh = body.clone()
        got = scaled_residual(fresh, x, 0.1)
        assert got is fresh and torch.equal(got, want)  # in place, the same roundings
        promoted = scaled_residual(body.bfloat16(), x, 0.1)  # bf16 + fp32 promotes: not in place
        assert promoted.dtype == torch.float32
    leaf = body.clone().requires_grad_()
    out = scaled_residual(leaf * 1, x, 0.1)
    assert torch.equal(out, want)
    out.sum().backward()
    assert torch.allclose(leaf.grad, torch.full_like(leaf, 0.1))
