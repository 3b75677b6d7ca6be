"""The authors' chop protocol (``forward_chop``) against a plain restatement of it, and tiles in eval."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlsn.evaluation import forward_chop, forward_tiled, model_upscaler, pieces


class TinySR(nn.Module):
    """A conv and a pixel shuffle; ``global_mean`` adds the input's mean, a global term like GLA's, so
    the output of a crop depends on the crop (as a real network's does beyond ``shave``)."""

    def __init__(self, scale: int, global_mean: bool = False) -> None:
        super().__init__()
        self.scale, self.global_mean = scale, global_mean
        self.conv = nn.Conv2d(3, 3 * scale * scale, 5, padding=2)
        self.shuffle = nn.PixelShuffle(scale)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[-2], x.shape[-1]))
        out = self.shuffle(self.conv(x))
        return out + x.mean() if self.global_mean else out


def quadrant_boxes(h: int, w: int, shave: int) -> tuple[int, int, int, int]:
    """The authors' quadrant size, restated: half plus shave, then height +4 - h%4, width +8 - w%8."""
    hs, ws = h // 2 + shave, w // 2 + shave
    hs = hs + (4 - hs % 4)
    ws = ws + (8 - ws % 8)
    return h // 2, w // 2, hs, ws


def leaves(top: int, left: int, h: int, w: int, shave: int, min_size: int, keep: tuple, depth: int = 0):
    """Every crop the protocol runs: (LR crop box, the LR pixels its output fills, depth), in absolute
    LR coordinates. A box is cut into quadrant cells at its halves; each crop fills the part of its cell
    inside the cells of every level above it (``keep``: rows and columns, half-open)."""
    hh, wh, hs, ws = quadrant_boxes(h, w, shave)
    crops = [(top, left), (top, left + w - ws), (top + h - hs, left), (top + h - hs, left + w - ws)]
    cells = [((top, top + hh), (left, left + wh)), ((top, top + hh), (left + wh, left + w)),
             ((top + hh, top + h), (left, left + wh)), ((top + hh, top + h), (left + wh, left + w))]
    found = []
    for (ct, cl), (rows, cols) in zip(crops, cells):
        rows = (max(rows[0], keep[0][0]), min(rows[1], keep[0][1]))
        cols = (max(cols[0], keep[1][0]), min(cols[1], keep[1][1]))
        if rows[0] >= rows[1] or cols[0] >= cols[1]:
            continue  # this crop's output is cut away by a level above
        if hs * ws < min_size:
            found.append(((ct, cl, hs, ws), rows, cols, depth))
        else:
            found += leaves(ct, cl, hs, ws, shave, min_size, (rows, cols), depth + 1)
    return found


def plain_chop(model: nn.Module, x: torch.Tensor, scale: int, shave: int, min_size: int) -> tuple[torch.Tensor, int]:
    """The protocol restated as a list of leaf crops pasted into place; returns (output, max depth)."""
    n, c, h, w = x.shape
    out = torch.full((n, c, h * scale, w * scale), float("nan"))
    found = leaves(0, 0, h, w, shave, min_size, ((0, h), (0, w)))
    for (t, lt, hs, ws), (r0, r1), (c0, c1), _ in found:
        sr = model(x[:, :, t:t + hs, lt:lt + ws])
        out[:, :, r0 * scale:r1 * scale, c0 * scale:c1 * scale] = \
            sr[:, :, (r0 - t) * scale:(r1 - t) * scale, (c0 - lt) * scale:(c1 - lt) * scale]
    return out, max(depth for *_, depth in found)


@pytest.mark.parametrize(("size", "min_size", "depth"), [
    ((60, 90), 120000, 0),   # the default: small images run as four quadrants
    ((101, 77), 2000, 1),    # quadrants chopped once more
    ((203, 171), 2000, 3),   # several levels
])
@pytest.mark.parametrize("scale", [2, 3])
def test_forward_chop_equals_the_restated_protocol(size, min_size, depth, scale):
    torch.manual_seed(0)
    model = TinySR(scale, global_mean=True).eval()
    x = torch.rand(1, 3, *size) * 255
    with torch.no_grad():
        expected, found_depth = plain_chop(model, x, scale, 10, min_size)
        model.calls.clear()
        got = forward_chop(model, x, scale, shave=10, min_size=min_size)
    assert found_depth == depth
    assert not torch.isnan(expected).any()
    assert len(model.calls) == 4 ** (depth + 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * 255)
    # each crop's output differs from the whole image's, so the test tells the crops apart
    assert not torch.allclose(got, model(x), atol=1e-3)


def test_forward_chop_rounding_quirk_adds_a_full_step_at_multiples():
    model = TinySR(2).eval()
    with torch.no_grad():
        forward_chop(model, torch.rand(1, 3, 76, 92), 2)  # 38 + 10 = 48 (a multiple of 4 and 8): +4, +8
    assert set(model.calls) == {(52, 64)}


def test_forward_chop_refuses_images_its_quadrants_do_not_fit():
    with pytest.raises(ValueError, match="too small to chop"):
        forward_chop(TinySR(2), torch.rand(1, 3, 20, 60), 2)


def test_tiles_and_chop_in_the_upscaler():
    torch.manual_seed(1)
    model = TinySR(2).eval()
    x = torch.rand(1, 3, 48, 64)
    whole = model_upscaler(model, 255.0)(x)
    chopped = model_upscaler(model, 255.0, chop=True)(x)
    tiled = model_upscaler(model, 255.0, tile=24, tile_overlap=12)(x)
    # a 5x5 conv has receptive radius 2 <= overlap / 4: tiles blend back to the whole image
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled, forward_tiled(lambda t: model(t * 255) / 255, x, 2, 24, 12))
    assert chopped.shape == whole.shape
    with pytest.raises(ValueError, match="choose one"):
        pieces(model, 2, chop=True, tile=16)


def test_eval_and_upscale_take_chop_and_tile(tmp_path, capsys):
    import json

    import numpy as np

    from dlsn import eval as eval_cli
    from dlsn import upscale as upscale_cli
    from dlsn.data import samples
    from dlsn.images import read_image, write_image
    from dlsn.models import build_model
    from dlsn.models.checkpoint import save_checkpoint

    photos = tmp_path / "photos"
    for i, name in enumerate(("astronaut", "coffee")):
        write_image(photos / f"p{i}.png", np.ascontiguousarray(samples.load_sample(name)[60:124, 80:148]))
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", build_model("tiny", 2, backend="reference"))
    scores = {}
    for flags in ([], ["--chop"], ["--tile", "20", "--tile-overlap", "8"]):
        out = tmp_path / f"scores{len(flags)}.json"
        assert eval_cli.main(["--data", str(photos), "--checkpoint", str(checkpoint), "--no-progress",
                              "--backend", "reference", "--json", str(out), *flags]) == 0
        result = json.loads(out.read_text())
        scores[len(flags)] = result["results"][0]["psnr"]
        assert result["chop"] == ("--chop" in flags) and result["tile"] == (20 if "--tile" in flags else None)
    printed = capsys.readouterr().out
    assert "chop" in printed and "tile 20/8" in printed
    assert all(np.isfinite(list(scores.values())))
    assert eval_cli.main(["--data", str(photos), "--checkpoint", str(checkpoint), "--chop", "--tile", "16"]) == 2
    assert "give one" in capsys.readouterr().err
    target = tmp_path / "up.png"
    assert upscale_cli.main([str(photos / "p0.png"), str(target), "--checkpoint", str(checkpoint), "--chop",
                             "--backend", "reference"]) == 0
    assert read_image(target).shape == (128, 136, 3)
