"""dlsn.images on TIFFs whose samples are not 8 or 16-bit unsigned: mapped from the declared range.

PIL opens signed and 32-bit greyscale as mode ``I``, 12-bit greyscale as ``I;16`` (0..4095), signed 8-bit as
``L`` (the bytes as unsigned) and 16-bit CMYK keeping the high bytes; the range comes from the file's
BitsPerSample and SampleFormat tags instead of a guess from the largest value. Float greyscale is read
only in 0..1. Files are written with tifffile, or byte by byte (``_write_packed_tiff``) for bit depths
tifffile packs only with imagecodecs; every expected array is computed with numpy from the samples written.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import tifffile

from dlsn.errors import UserInputError
from dlsn.images import decode_image


def _rgb(levels: np.ndarray) -> np.ndarray:
    """``[H, W]`` levels (already rounded) as the ``[H, W, 3]`` uint8 a grey image reads as."""
    return np.repeat(levels.astype(np.uint8)[:, :, None], 3, axis=2)


def _spread(dtype, shape=(9, 13), seed=0) -> np.ndarray:
    """Random samples of ``dtype`` over its whole range, both ends and the middle included."""
    info = np.iinfo(dtype)
    values = np.random.default_rng(seed).integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    values.flat[:4] = [info.min, info.max, info.min + (info.max - info.min) // 2, 0]
    return values


@pytest.mark.parametrize(("dtype", "byteorder", "compression"),
                         list(itertools.product((np.int8, np.int16, np.int32), "<>", (None, "zlib"))))
def test_signed_grey_tiffs_map_their_whole_declared_range(tmp_path, dtype, byteorder, compression):
    samples = _spread(dtype)
    tifffile.imwrite(tmp_path / "signed.tif", samples, photometric="minisblack", byteorder=byteorder,
                     compression=compression)
    array, said = decode_image(tmp_path / "signed.tif")
    bits = np.dtype(dtype).itemsize * 8
    assert said == f"signed {bits}-bit greyscale, {-2 ** (bits - 1)}..{2 ** (bits - 1) - 1} mapped to 0..255"
    expected = np.round((samples.astype(np.float64) + 2 ** (bits - 1)) * 255 / (2 ** bits - 1))
    np.testing.assert_array_equal(array, _rgb(expected))
    assert array[0, 0, 0] == 0 and array[0, 1, 0] == 255  # negatives are no longer clipped to black


def test_the_reported_signed_tiff_keeps_its_negative_half(tmp_path):
    samples = np.array([[-32768, -16384, -1, 0, 16384, 32767]], dtype=np.int16)
    tifffile.imwrite(tmp_path / "s16.tif", samples, photometric="minisblack")
    # before: negatives clipped to 0 and 0..32767 scaled as 0..65535 ([0, 0, 0, 0, 64, 128])
    assert decode_image(tmp_path / "s16.tif")[0][0, :, 0].tolist() == [0, 64, 127, 128, 191, 255]


def test_unsigned_32_bit_grey_tiffs_map_0_to_2_32_minus_1(tmp_path):
    samples = _spread(np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", samples, photometric="minisblack", byteorder="<")
    array, said = decode_image(tmp_path / "u32.tif")
    assert said == "32-bit greyscale"
    # values >= 2^31 come from PIL as negative int32s; before they were clipped to black
    np.testing.assert_array_equal(array, _rgb(np.round(samples.astype(np.float64) * 255 / (2 ** 32 - 1))))


def test_a_dark_sixteen_bit_grey_tiff_is_not_read_as_eight_bit(tmp_path):
    for dtype in (np.uint16, np.int16):  # all values <= 255: the old guess took them for 8-bit ones
        samples = np.arange(0, 256, 5, dtype=dtype).reshape(4, 13)
        tifffile.imwrite(tmp_path / "dark.tif", samples, photometric="minisblack")
        lowest = -32768 if dtype == np.int16 else 0
        expected = np.round((samples.astype(np.float64) - lowest) * 255 / 65535)
        np.testing.assert_array_equal(decode_image(tmp_path / "dark.tif")[0], _rgb(expected))


def _pack_rows(samples: np.ndarray, bits: int) -> bytes:
    """``samples`` (``[H, W]`` or ``[H, W, S]``) as TIFF packs them: ``bits`` per sample, most significant
    bit first, every row starting on a byte."""
    rows = []
    for row in samples.reshape(samples.shape[0], -1):
        text = "".join(format(int(value), f"0{bits}b") for value in row)
        text += "0" * (-len(text) % 8)
        rows.append(int(text, 2).to_bytes(len(text) // 8, "big"))
    return b"".join(rows)


def _write_packed_tiff(path, samples: np.ndarray, bits: int, photometric: int) -> None:
    """A little-endian, uncompressed, one-strip TIFF of unsigned ``bits``-bit samples (grey or RGB)."""
    height, width = samples.shape[:2]
    per_pixel = samples.shape[2] if samples.ndim == 3 else 1
    data = _pack_rows(samples, bits)
    entries = 9
    bits_at = 8 + 2 + 12 * entries + 4  # BitsPerSample after the directory when it holds several values
    data_at = bits_at + 2 * per_pixel
    bits_value = (struct.pack("<HH", bits, 0) if per_pixel == 1 else struct.pack("<I", bits_at))
    tags = [(256, 3, 1, struct.pack("<HH", width, 0)), (257, 3, 1, struct.pack("<HH", height, 0)),
            (258, 3, per_pixel, bits_value), (259, 3, 1, struct.pack("<HH", 1, 0)),
            (262, 3, 1, struct.pack("<HH", photometric, 0)), (273, 4, 1, struct.pack("<I", data_at)),
            (277, 3, 1, struct.pack("<HH", per_pixel, 0)), (278, 3, 1, struct.pack("<HH", height, 0)),
            (279, 4, 1, struct.pack("<I", len(data)))]
    directory = struct.pack("<H", entries) + b"".join(struct.pack("<HHI", *tag[:3]) + tag[3] for tag in tags)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + directory + b"\0\0\0\0"
                     + struct.pack(f"<{per_pixel}H", *[bits] * per_pixel) + data)


def test_twelve_bit_grey_tiffs_map_0_to_4095(tmp_path):
    samples = np.random.default_rng(12).integers(0, 4096, (7, 11), dtype=np.uint16)  # odd width: padded rows
    samples.flat[:4] = [0, 4095, 2048, 1]
    _write_packed_tiff(tmp_path / "g12.tif", samples, 12, photometric=1)
    array, said = decode_image(tmp_path / "g12.tif")
    assert said == "12-bit greyscale"
    # before: scaled as 0..65535, so the brightest sample read as 16
    np.testing.assert_array_equal(array, _rgb(np.round(samples.astype(np.float64) * 255 / 4095)))


@pytest.mark.parametrize(("bits", "channels", "photometric"),
                         [(10, 1, 1), (14, 1, 1), (12, 3, 2), (12, 1, 0)])
def test_bit_depths_pil_cannot_open_are_refused_in_one_line(tmp_path, bits, channels, photometric):
    shape = (5, 6, channels) if channels > 1 else (5, 6)
    samples = np.random.default_rng(bits).integers(0, 2 ** bits, shape, dtype=np.uint16)
    _write_packed_tiff(tmp_path / "deep.tif", samples, bits, photometric)
    with pytest.raises(UserInputError) as refused:
        decode_image(tmp_path / "deep.tif")
    message = str(refused.value)
    assert "\n" not in message and "deep.tif" in message
    assert f"{channels} sample(s) per pixel, {bits}-bit unsigned integers, Photometric {photometric}" in message
    assert "convert it to 8 or 16 bits per sample" in message


@pytest.mark.parametrize(("byteorder", "compression"), list(itertools.product("<>", (None, "zlib"))))
def test_float_grey_in_0_1_is_scaled_by_255(tmp_path, byteorder, compression):
    samples = np.random.default_rng(4).random((6, 9)).astype(np.float32)
    samples.flat[:4] = [0.0, 1.0, 0.5, 0.25]
    for photometric, expected in (("minisblack", samples), ("miniswhite", 1 - samples.astype(np.float64))):
        tifffile.imwrite(tmp_path / "f.tif", samples, photometric=photometric, byteorder=byteorder,
                         compression=compression)
        array, said = decode_image(tmp_path / "f.tif")
        assert said == "floating-point greyscale, 0..1 scaled to 0..255"
        np.testing.assert_array_equal(array, _rgb(np.round(expected.astype(np.float64) * 255)))
    # before: 0..1 was taken for 0..255 (the image read as black); big-endian Deflate ones byte-swapped


@pytest.mark.parametrize(("values", "says"), [
    ([0.0, 100.0, 255.0], "from 0 to 255"), ([0.0, 0.5, 7.5], "from 0 to 7.5"),
    ([-0.25, 0.5, 1.0], "from -0.25 to 1"), ([0.0, np.nan, 1.0], "NaN or infinite"),
    ([0.0, np.inf, 1.0], "NaN or infinite")])
def test_float_grey_outside_0_1_is_refused_in_one_line(tmp_path, values, says):
    tifffile.imwrite(tmp_path / "f.tif", np.array([values], dtype=np.float32), photometric="minisblack")
    with pytest.raises(UserInputError) as refused:
        decode_image(tmp_path / "f.tif")
    message = str(refused.value)
    assert "\n" not in message and "f.tif" in message and says in message and "only 0..1 is read" in message


def _naive_rgb(cmyk: np.ndarray, top: int) -> np.ndarray:
    """(1 - C)(1 - K) per channel from all the bits, rounded once, as uint8."""
    values = cmyk.astype(np.float64)
    return np.round((top - values[:, :, :3]) * (top - values[:, :, 3:]) * 255 / top ** 2).astype(np.uint8)


@pytest.mark.parametrize(("byteorder", "compression", "planar"),
                         list(itertools.product("<>", (None, "zlib"), (False, True))))
def test_sixteen_bit_cmyk_tiffs_use_all_sixteen_bits(tmp_path, byteorder, compression, planar):
    cmyk = np.random.default_rng(16).integers(0, 65536, (11, 14, 4), dtype=np.uint16)
    cmyk[0, :3] = [[0, 0, 0, 0], [65535, 65535, 65535, 0], [255, 32768, 65280, 255]]
    data = cmyk.transpose(2, 0, 1) if planar else cmyk
    tifffile.imwrite(tmp_path / "cmyk.tif", data, photometric="separated", byteorder=byteorder,
                     compression=compression, rowsperstrip=4, planarconfig="separate" if planar else "contig")
    array, said = decode_image(tmp_path / "cmyk.tif")
    assert said == "16-bit CMYK"
    np.testing.assert_array_equal(array, _naive_rgb(cmyk, 65535))
    assert array[0, :2].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_eight_bit_cmyk_stays_as_pil_converts_it(tmp_path):
    cmyk = np.random.default_rng(8).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cmyk8.tif", cmyk, photometric="separated")
    array, said = decode_image(tmp_path / "cmyk8.tif")
    assert said == "CMYK"
    np.testing.assert_array_equal(array, _naive_rgb(cmyk, 255))  # PIL's formula, rounded like ours
