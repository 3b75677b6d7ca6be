"""dlsn.images on TIFF files: 16 bits per channel rounded to 8 (``round(v / 257)``) like 16-bit PNGs.

PIL reads a 16-bit RGB(A) TIFF by keeping each sample's high byte (``floor(v / 256)``); every expected
array here is computed with numpy from the 16-bit pixels written, never with the code under test.
The files are written with tifffile (installed with scikit-image).
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import torch
from PIL import TiffImagePlugin

from dlsn.errors import UserInputError
from dlsn.images import decode_image, read_image, write_image

tifffile = pytest.importorskip("tifffile")  # comes with scikit-image, a dependency


def _rounded(pixels: np.ndarray) -> np.ndarray:
    """What a 16-bit image should read as: the colour channels, ``round(v / 257)``."""
    return np.round(pixels[:, :, :3] / 257.0).astype(np.uint8)


def _write_tiff(path, pixels: np.ndarray, data=None, **options) -> None:
    """``pixels`` as a TIFF (grey, RGB, or RGBA with unassociated alpha); ``data``: its strips, when given."""
    extra = {"extrasamples": ["unassalpha"]} if pixels.ndim == 3 and pixels.shape[2] == 4 else {}
    if data is not None:
        extra.update(shape=pixels.shape, dtype=pixels.dtype)
    tifffile.imwrite(path, pixels if data is None else data,
                     photometric="rgb" if pixels.ndim == 3 else "minisblack", **extra, **options)


def _lzw_literals(data: bytes) -> bytes:
    """``data`` as a valid TIFF LZW stream of literal codes only: 9-bit codes, most significant bit first,
    a Clear code (256) before every 250 literals so the decoder's table never needs 10-bit codes, and End
    of Information (257) last. No compression, but every decoder reads it as LZW."""
    codes: list[int] = []
    for start in range(0, len(data), 250):
        codes += [256, *data[start:start + 250]]
    codes.append(257)
    bits = "".join(f"{code:09b}" for code in codes)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _write_lzw_tiff(path, pixels: np.ndarray, byteorder: str, rows_per_strip: int) -> None:
    """An LZW TIFF of ``pixels``: tifffile encodes LZW only with imagecodecs (not a dependency), so it
    writes our own LZW strips as they are, labelled Deflate, and the Compression tag is then set to 5."""
    strips = [_lzw_literals(pixels[top:top + rows_per_strip].astype(byteorder + "u2").tobytes())
              for top in range(0, pixels.shape[0], rows_per_strip)]
    _write_tiff(path, pixels, iter(strips), compression="zlib", rowsperstrip=rows_per_strip, byteorder=byteorder)
    with tifffile.TiffFile(path) as tiff:
        at = tiff.pages[0].tags["Compression"].valueoffset
    with open(path, "r+b") as file:
        file.seek(at)
        file.write(struct.pack(byteorder + "H", 5))


def test_the_reported_tiff_reads_rounded_not_truncated(tmp_path):
    pixels = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 997 % 65536).astype(np.uint16)
    _write_tiff(tmp_path / "t16.tif", pixels)
    array, said = decode_image(tmp_path / "t16.tif")
    assert said == "16-bit RGB"
    assert array[0, :3].tolist() == [[0, 4, 8], [12, 16, 19], [23, 27, 31]]  # PIL alone: [[0, 3, 7], [11, 15, 19], ...]
    np.testing.assert_array_equal(array, _rounded(pixels))


LAYOUTS = {"one strip": {}, "strips": {"rowsperstrip": 3}, "tiles": {"tile": (16, 16)}}


@pytest.mark.parametrize(("channels", "compression", "byteorder", "layout"),
                         list(itertools.product((3, 4), (None, "zlib"), "<>", LAYOUTS)))
def test_sixteen_bit_rgb_and_rgba_tiffs_are_rounded(tmp_path, channels, compression, byteorder, layout):
    # 37x45: neither a whole number of strips nor of 16x16 tiles
    pixels = np.random.default_rng(channels).integers(0, 65536, (37, 45, channels), dtype=np.uint16)
    pixels[0, :4, :3] = [[0, 128, 129], [383, 384, 385], [65407, 65408, 65535], [32767, 32768, 32896]]
    _write_tiff(tmp_path / "deep.tif", pixels, compression=compression, byteorder=byteorder, **LAYOUTS[layout])
    array, said = decode_image(tmp_path / "deep.tif")
    assert said == ("16-bit RGB" if channels == 3 else "16-bit RGBA, alpha dropped")
    assert array.dtype == np.uint8 and array.shape == (37, 45, 3)
    np.testing.assert_array_equal(array, _rounded(pixels))


@pytest.mark.parametrize(("channels", "byteorder"), list(itertools.product((3, 4), "<>")))
def test_sixteen_bit_lzw_tiffs_are_rounded(tmp_path, channels, byteorder):
    pixels = np.random.default_rng(7).integers(0, 65536, (21, 30, channels), dtype=np.uint16)
    _write_lzw_tiff(tmp_path / "lzw.tif", pixels, byteorder, rows_per_strip=4)
    with tifffile.TiffFile(tmp_path / "lzw.tif") as tiff:
        assert tiff.pages[0].compression == 5 and len(tiff.pages[0].dataoffsets) == 6
    array, said = decode_image(tmp_path / "lzw.tif")
    assert said == ("16-bit RGB" if channels == 3 else "16-bit RGBA, alpha dropped")
    np.testing.assert_array_equal(array, _rounded(pixels))


def test_an_unspecified_fourth_sample_is_dropped_too(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 65536, (6, 7, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgbx.tif", pixels, photometric="rgb", extrasamples=["unspecified"])
    array, said = decode_image(tmp_path / "rgbx.tif")
    assert said == "16-bit RGB"
    np.testing.assert_array_equal(array, _rounded(pixels))


@pytest.mark.parametrize(("compression", "byteorder"), list(itertools.product((None, "zlib"), "<>")))
def test_sixteen_bit_grey_tiffs_are_rounded(tmp_path, compression, byteorder):
    grey = np.random.default_rng(5).integers(0, 65536, (9, 11), dtype=np.uint16)
    grey[0, :3] = [128, 129, 65535]
    _write_tiff(tmp_path / "grey16.tif", grey, compression=compression, byteorder=byteorder)
    array, said = decode_image(tmp_path / "grey16.tif")
    assert said == "16-bit greyscale"
    np.testing.assert_array_equal(array, np.repeat(np.round(grey / 257.0).astype(np.uint8)[:, :, None], 3, axis=2))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_eight_bit_tiffs_read_as_stored(tmp_path, compression):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    _write_tiff(tmp_path / "rgb.tif", rgb, compression=compression, rowsperstrip=3)
    assert decode_image(tmp_path / "rgb.tif")[1] is None
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), rgb)
    rgba = rng.integers(0, 256, (8, 10, 4), dtype=np.uint8)
    _write_tiff(tmp_path / "rgba.tif", rgba, compression=compression)
    array, said = decode_image(tmp_path / "rgba.tif")
    assert said == "RGBA, alpha dropped"
    np.testing.assert_array_equal(array, rgba[:, :, :3])


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_tiff_orientation_is_applied_to_the_rounded_pixels(tmp_path, compression):
    pixels = np.random.default_rng(4).integers(0, 65536, (5, 8, 3), dtype=np.uint16)
    # Orientation 6: the stored rows are turned 90 degrees clockwise for display.
    _write_tiff(tmp_path / "turned.tif", pixels, compression=compression, extratags=[(274, "H", 1, 6, True)])
    array = read_image(tmp_path / "turned.tif")
    np.testing.assert_array_equal(array, np.rot90(_rounded(pixels), k=-1))


def test_the_size_limit_refuses_a_sixteen_bit_tiff_before_decoding(tmp_path, monkeypatch):
    pixels = np.zeros((30, 40, 3), dtype=np.uint16)
    _write_tiff(tmp_path / "big.tif", pixels, compression="zlib")

    def no_decoding(self):
        raise AssertionError("decoded despite the size limit")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", no_decoding)
    with pytest.raises(UserInputError, match=r"big\.tif is 40x30 = 0\.0 Mpx, over the limit .*not decoded"):
        decode_image(tmp_path / "big.tif", max_pixels=1000)


def test_upscaling_a_sixteen_bit_tiff_gives_the_output_of_its_rounded_png(tmp_path, capsys):
    from dlsn.models import build_model, save_checkpoint
    from dlsn.upscale import main

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny_x2.pt", build_model("tiny", 2, chunk_size=16))
    pixels = np.random.default_rng(6).integers(0, 65536, (7, 9, 4), dtype=np.uint16)
    _write_tiff(tmp_path / "deep.tif", pixels, compression="zlib", byteorder=">")
    write_image(tmp_path / "rounded.png", _rounded(pixels))
    for name in ("deep.tif", "rounded.png"):
        assert main([str(tmp_path / name), str(tmp_path / f"{name}_x2.png"), "--checkpoint", str(checkpoint),
                     "--backend", "reference", "--device", "cpu"]) == 0
    assert "deep.tif (16-bit RGBA, alpha dropped)" in capsys.readouterr().out
    upscaled = read_image(tmp_path / "deep.tif_x2.png")
    assert upscaled.shape == (14, 18, 3)
    np.testing.assert_array_equal(upscaled, read_image(tmp_path / "rounded.png_x2.png"))
