"""dlsn.images on TIFF files: 16 bits per channel rounded to 8 (``round(v / 257)``) like 16-bit PNGs.

PIL reads a 16-bit RGB(A) TIFF by keeping each sample's high byte (``floor(v / 256)``), 16-bit planes
stored one per channel as 8-bit ones, and divides premultiplied colour by alpha rounding down; every
expected array here is computed with numpy from the pixels written, never with the code under test.
The files are written with tifffile (installed with scikit-image).
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import tifffile
import torch
from PIL import TiffImagePlugin

from dlsn.errors import UserInputError
from dlsn.images import decode_image, read_image, write_image


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


def _packbits_literals(data: bytes) -> bytes:
    """``data`` as a valid PackBits stream of literal runs only (a count byte n, then n + 1 bytes)."""
    return b"".join(bytes([len(run) - 1]) + run for run in (data[at:at + 128] for at in range(0, len(data), 128)))


def _write_lzw_tiff(path, pixels: np.ndarray, byteorder: str, rows_per_strip: int, planar: bool = False,
                    encode=_lzw_literals, compression: int = 5) -> None:
    """An LZW TIFF of ``pixels``: tifffile encodes LZW only with imagecodecs (not a dependency), so it
    writes our own LZW strips as they are, labelled Deflate, and the Compression tag is then set to 5.
    ``planar``: one plane per channel (the strips of the first channel, then the second's...). ``encode``
    and ``compression``: another codec's strips (``_packbits_literals``, 32773)."""
    planes = pixels.transpose(2, 0, 1) if planar else pixels[None]
    strips = [encode(plane[top:top + rows_per_strip].astype(byteorder + pixels.dtype.str[1:]).tobytes())
              for plane in planes for top in range(0, pixels.shape[0], rows_per_strip)]
    layout = {"planarconfig": "separate"} if planar else {}
    data_pixels = pixels.transpose(2, 0, 1) if planar else pixels
    extra = {"extrasamples": ["unassalpha"]} if pixels.shape[2] == 4 else {}
    tifffile.imwrite(path, iter(strips), shape=data_pixels.shape, dtype=pixels.dtype, photometric="rgb",
                     compression="zlib", rowsperstrip=rows_per_strip, byteorder=byteorder, **layout, **extra)
    with tifffile.TiffFile(path) as tiff:
        at = tiff.pages[0].tags["Compression"].valueoffset
    with open(path, "r+b") as file:
        file.seek(at)
        file.write(struct.pack(byteorder + "H", compression))


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


def _write_planar(path, pixels: np.ndarray, extrasample: str = "unassalpha", **options) -> None:
    """``pixels`` (``[H, W, C]``) as a TIFF with one plane per channel (PlanarConfiguration 2)."""
    extra = {"extrasamples": [extrasample]} if pixels.shape[2] == 4 else {}
    tifffile.imwrite(path, pixels.transpose(2, 0, 1), photometric="rgb", planarconfig="separate", **extra, **options)


def _planar_pixels(channels: int, seed: int = 8) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 65536, (37, 45, channels), dtype=np.uint16)
    pixels[0, :4, :3] = [[0, 128, 129], [383, 384, 385], [65407, 65408, 65535], [32767, 32768, 32896]]
    return pixels


@pytest.mark.parametrize(("channels", "compression", "byteorder", "layout"),
                         list(itertools.product((3, 4), (None, "zlib"), "<>", ("strips", "tiles"))))
def test_sixteen_bit_planar_tiffs_are_rounded(tmp_path, channels, compression, byteorder, layout):
    pixels = _planar_pixels(channels)
    _write_planar(tmp_path / "planar.tif", pixels, compression=compression, byteorder=byteorder, **LAYOUTS[layout])
    with tifffile.TiffFile(tmp_path / "planar.tif") as tiff:
        assert tiff.pages[0].planarconfig == 2
    array, said = decode_image(tmp_path / "planar.tif")
    assert said == ("16-bit RGB" if channels == 3 else "16-bit RGBA, alpha dropped")
    assert array.dtype == np.uint8 and array.shape == (37, 45, 3)
    np.testing.assert_array_equal(array, _rounded(pixels))


def test_the_reported_uncompressed_planar_tiff_is_no_longer_garbage(tmp_path):
    pixels = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 997 % 65536).astype(np.uint16)
    _write_planar(tmp_path / "planes.tif", pixels)
    array, said = decode_image(tmp_path / "planes.tif")
    assert said == "16-bit RGB"  # was None, with PIL's 8-bit reading of the 16-bit planes
    assert array[0, :3].tolist() == [[0, 4, 8], [12, 16, 19], [23, 27, 31]]
    np.testing.assert_array_equal(array, _rounded(pixels))


@pytest.mark.parametrize("options", [{"compression": "zlib", "predictor": True}, {"extrasample": "unspecified"},
                                     {"compression": "zlib", "compressionargs": {"level": 9}, "rowsperstrip": 1}])
def test_more_planar_variants_are_rounded(tmp_path, options):
    pixels = _planar_pixels(4 if "extrasample" in options else 3, seed=9)
    _write_planar(tmp_path / "planar.tif", pixels, **options)
    array, said = decode_image(tmp_path / "planar.tif")
    assert said == "16-bit RGB"
    np.testing.assert_array_equal(array, _rounded(pixels))


@pytest.mark.parametrize("byteorder", "<>")
def test_sixteen_bit_planar_packbits_tiffs_are_rounded(tmp_path, byteorder):
    pixels = _planar_pixels(3, seed=10)[:21, :30]
    _write_lzw_tiff(tmp_path / "packbits.tif", pixels, byteorder, rows_per_strip=4, planar=True,
                    encode=_packbits_literals, compression=32773)
    with tifffile.TiffFile(tmp_path / "packbits.tif") as tiff:
        assert tiff.pages[0].compression == 32773 and tiff.pages[0].planarconfig == 2
    array, said = decode_image(tmp_path / "packbits.tif")
    assert said == "16-bit RGB"
    np.testing.assert_array_equal(array, _rounded(pixels))


def test_a_sixteen_bit_planar_lzw_tiff_is_refused_in_one_line(tmp_path):
    # tifffile decodes LZW only with imagecodecs (not installed here), and PIL would keep the high bytes
    if 5 in tifffile.TIFF.DECOMPRESSORS:
        pytest.skip("imagecodecs is installed: tifffile reads LZW itself")
    pixels = _planar_pixels(3)[:9, :10]
    _write_lzw_tiff(tmp_path / "lzw.tif", pixels, ">", rows_per_strip=4, planar=True)
    with pytest.raises(UserInputError) as refused:
        decode_image(tmp_path / "lzw.tif")
    message = str(refused.value)
    assert "\n" not in message and "lzw.tif" in message
    assert "16-bit TIFF with one plane per channel and LZW compression" in message
    assert "imagecodecs" in message and "tiffcp -c zip -p contig" in message


@pytest.mark.parametrize(("compression", "lzw"), [(None, False), ("zlib", False), (None, True)])
def test_eight_bit_planar_tiffs_read_as_stored(tmp_path, compression, lzw):
    rng = np.random.default_rng(11)
    for channels in (3, 4):
        pixels = rng.integers(0, 256, (13, 17, channels), dtype=np.uint8)
        if lzw:
            _write_lzw_tiff(tmp_path / "planar8.tif", pixels, "<", rows_per_strip=5, planar=True)
        else:
            _write_planar(tmp_path / "planar8.tif", pixels, compression=compression, rowsperstrip=5)
        array, said = decode_image(tmp_path / "planar8.tif")
        assert said == (None if channels == 3 else "RGBA, alpha dropped")
        np.testing.assert_array_equal(array, pixels[:, :, :3])


def _premultiplied(bits: int, seed: int) -> np.ndarray:
    """Premultiplied RGBA samples (colour <= alpha), with the edge cases of the division in the first row."""
    top = (1 << bits) - 1
    dtype = np.uint16 if bits == 16 else np.uint8
    rng = np.random.default_rng(seed)
    alpha = rng.integers(0, top + 1, (11, 14, 1))
    stored = np.concatenate([np.round(rng.integers(0, top + 1, (11, 14, 3)) * alpha / top), alpha], axis=2)
    stored[0, :5] = [[0, 0, 0, 0], [top, 0, 1, top], [1, 3, 5, 2 * 255], [0, 1, 2, 4], [7, 7, 7, 7]]
    return stored.astype(dtype)


def _unpremultiplied(stored: np.ndarray) -> np.ndarray:
    """round(255 * colour / alpha) (round half to even, like Python's round), black where alpha is 0."""
    colour, alpha = stored[:, :, :3].astype(np.float64), stored[:, :, 3:].astype(np.float64)
    return np.where(alpha > 0, np.round(colour * 255 / np.maximum(alpha, 1)), 0).astype(np.uint8)


@pytest.mark.parametrize(("bits", "how"), list(itertools.product((8, 16), ("raw", "zlib", "lzw", "planar",
                                                                            "planar zlib"))))
def test_premultiplied_tiffs_are_divided_with_rounding(tmp_path, bits, how):
    stored = _premultiplied(bits, seed=bits)
    if how == "lzw":
        _write_lzw_tiff(tmp_path / "assoc.tif", stored, ">", rows_per_strip=3)
        with tifffile.TiffFile(tmp_path / "assoc.tif") as tiff:  # the helper writes unassociated alpha: say 1
            at = tiff.pages[0].tags["ExtraSamples"].valueoffset
        with open(tmp_path / "assoc.tif", "r+b") as file:
            file.seek(at)
            file.write(struct.pack(">H", 1))
    elif how.startswith("planar"):
        _write_planar(tmp_path / "assoc.tif", stored, "assocalpha", compression="zlib" if "zlib" in how else None)
    else:
        tifffile.imwrite(tmp_path / "assoc.tif", stored, photometric="rgb", extrasamples=["assocalpha"],
                         compression=None if how == "raw" else "zlib")
    with tifffile.TiffFile(tmp_path / "assoc.tif") as tiff:
        assert tiff.pages[0].extrasamples == (1,)
    array, said = decode_image(tmp_path / "assoc.tif")
    assert said == ("16-bit RGBA" if bits == 16 else "RGBA") + ", alpha dropped"
    expected = _unpremultiplied(stored)
    # alpha 0: black; alpha 510 (16 bits): 255 / 510 = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; 7 / 7: white
    assert expected[0, 0].tolist() == [0, 0, 0] and expected[0, 4].tolist() == [255, 255, 255]
    if bits == 16:
        assert expected[0, 2].tolist() == [0, 2, 2]
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize(("bits", "planar", "compression"),
                         [(16, False, None), (16, False, "zlib"), (16, True, None), (16, True, "zlib"),
                          (8, False, None), (8, False, "zlib")])
def test_a_tiff_orientation_is_said_and_applied(tmp_path, bits, planar, compression):
    pixels = np.random.default_rng(12).integers(0, 1 << bits, (5, 8, 3), dtype=np.uint16 if bits == 16 else np.uint8)
    tag = [(274, "H", 1, 6, True)]  # 6: the stored rows are turned 90 degrees clockwise for display
    if planar:
        _write_planar(tmp_path / "turned.tif", pixels, compression=compression, extratags=tag)
    else:
        _write_tiff(tmp_path / "turned.tif", pixels, compression=compression, extratags=tag)
    array, said = decode_image(tmp_path / "turned.tif")
    assert said == ("16-bit RGB, " if bits == 16 else "") + "EXIF orientation 6 applied"
    np.testing.assert_array_equal(array, np.rot90(_rounded(pixels) if bits == 16 else pixels, k=-1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_tiff_orientation_matches_the_same_png(tmp_path, orientation):
    # PIL turns a TIFF while loading it, a PNG is turned by dlsn.images: both must agree, and say so
    from PIL import Image

    pixels = np.random.default_rng(13).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    _write_tiff(tmp_path / "o.tif", pixels, extratags=[(274, "H", 1, orientation, True)])
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif)
    tiff_array, tiff_said = decode_image(tmp_path / "o.tif")
    png_array, png_said = decode_image(tmp_path / "o.png")
    assert tiff_said == png_said == (None if orientation == 1 else f"EXIF orientation {orientation} applied")
    np.testing.assert_array_equal(tiff_array, png_array)
    assert tiff_array.shape == ((7, 4, 3) if orientation >= 5 else (4, 7, 3))


@pytest.mark.parametrize(("bits", "compression"), list(itertools.product((8, 16), (None, "zlib"))))
def test_min_is_white_grey_tiffs_are_inverted(tmp_path, bits, compression):
    top = (1 << bits) - 1
    grey = np.random.default_rng(bits).integers(0, top + 1, (6, 9), dtype=np.uint16 if bits == 16 else np.uint8)
    grey[0, :3] = [0, top, 128]
    tifffile.imwrite(tmp_path / "white.tif", grey, photometric="miniswhite", compression=compression)
    array, said = decode_image(tmp_path / "white.tif")
    assert said == ("16-bit greyscale" if bits == 16 else "greyscale")
    expected = np.round((top - grey.astype(np.float64)) * 255 / top).astype(np.uint8)
    assert expected[0, :2].tolist() == [255, 0]
    np.testing.assert_array_equal(array, np.repeat(expected[:, :, None], 3, axis=2))
