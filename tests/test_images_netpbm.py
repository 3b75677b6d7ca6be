"""dlsn.images on PGM/PPM files: samples scaled by the header's maxval, ``round(v * 255 / maxval)``.

The files are written here byte by byte (header, then the samples: one byte each for a maxval below 256,
two big-endian bytes otherwise); every expected array is computed with numpy from the samples written.
"""

from __future__ import annotations

import numpy as np
import pytest

from dlsn.images import decode_image


def _write_netpbm(path, samples: np.ndarray, maxval: int, plain: bool = False) -> None:
    """``samples`` ([H, W] grey or [H, W, 3] RGB, integers 0..maxval) as a binary or plain PGM/PPM."""
    grey = samples.ndim == 2
    height, width = samples.shape[:2]
    magic = ("P2" if grey else "P3") if plain else ("P5" if grey else "P6")
    header = f"{magic}\n# written by the tests\n{width} {height}\n{maxval}\n".encode()
    if plain:
        body = "\n".join(" ".join(str(int(v)) for v in row.ravel()) for row in samples).encode() + b"\n"
    else:
        body = samples.astype(">u2" if maxval > 255 else "u1").tobytes()
    path.write_bytes(header + body)


def _scaled(samples: np.ndarray, maxval: int) -> np.ndarray:
    """round(v * 255 / maxval) (round half to even, like Python's round) as [H, W, 3] uint8."""
    levels = np.round(samples.astype(np.float64) * 255 / maxval).astype(np.uint8)
    return np.repeat(levels[:, :, None], 3, axis=2) if levels.ndim == 2 else levels


def _every_value(maxval: int, width: int = 64) -> np.ndarray:
    """0..maxval (each value once when maxval < 4096, else a spread with both ends) as a [H, width] array."""
    values = np.arange(maxval + 1) if maxval < 4096 else np.unique(np.r_[
        np.random.default_rng(maxval).integers(0, maxval + 1, 4000), 0, 1, 127, 128, 129, maxval - 1, maxval])
    values = np.r_[values, np.zeros(-len(values) % width, dtype=values.dtype)]
    return values.reshape(-1, width)


def test_a_dark_sixteen_bit_pgm_is_not_read_as_eight_bit(tmp_path):
    # every value <= 255: the old reading guessed an 8-bit range from the largest value (full brightness)
    dark = np.arange(256, dtype=np.int64).reshape(16, 16)
    _write_netpbm(tmp_path / "dark.pgm", dark, 65535)
    array, said = decode_image(tmp_path / "dark.pgm")
    assert said == "16-bit greyscale"
    assert set(np.unique(array).tolist()) == {0, 1}  # round(v / 257): 0 up to 128, then 1
    np.testing.assert_array_equal(array, _scaled(dark, 65535))


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("maxval", [256, 1000, 1023, 4095, 65534, 65535])
def test_sixteen_bit_pgms_are_scaled_by_their_maxval(tmp_path, maxval, plain):
    grey = _every_value(maxval)
    _write_netpbm(tmp_path / "grey.pgm", grey, maxval, plain)
    array, said = decode_image(tmp_path / "grey.pgm")
    assert said == "16-bit greyscale" + ("" if maxval == 65535 else f", maxval {maxval}")
    assert array.dtype == np.uint8 and array.shape == (*grey.shape, 3)
    np.testing.assert_array_equal(array, _scaled(grey, maxval))


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("maxval", [1023, 65535])
def test_sixteen_bit_ppms_are_scaled_and_said(tmp_path, maxval, plain):
    rgb = np.random.default_rng(maxval).integers(0, maxval + 1, (9, 13, 3))
    rgb[0, :3] = [[0, 128, 129], [maxval, maxval - 1, 1], [383, 384, 385]]
    _write_netpbm(tmp_path / "rgb.ppm", rgb, maxval, plain)
    array, said = decode_image(tmp_path / "rgb.ppm")
    assert said == "16-bit RGB" + ("" if maxval == 65535 else f", maxval {maxval}")
    np.testing.assert_array_equal(array, _scaled(rgb, maxval))
    if maxval == 65535:
        np.testing.assert_array_equal(array, np.round(rgb / 257.0).astype(np.uint8))


@pytest.mark.parametrize("maxval", [1, 2, 6, 15, 100, 254])
def test_low_maxvals_are_scaled_up_and_said(tmp_path, maxval):
    grey = _every_value(maxval, width=maxval + 1)
    _write_netpbm(tmp_path / "grey.pgm", grey, maxval)
    array, said = decode_image(tmp_path / "grey.pgm")
    assert said == f"greyscale, maxval {maxval}"
    np.testing.assert_array_equal(array, _scaled(grey, maxval))
    rgb = np.stack([grey, grey[:, ::-1], np.full_like(grey, maxval)], axis=2)
    _write_netpbm(tmp_path / "rgb.ppm", rgb, maxval)
    array, said = decode_image(tmp_path / "rgb.ppm")
    assert said == f"RGB, maxval {maxval}"
    np.testing.assert_array_equal(array, _scaled(rgb, maxval))
    assert array[0, 0, 2] == 255


def test_eight_bit_pgm_and_ppm_read_as_stored(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (7, 9))
    _write_netpbm(tmp_path / "grey.pgm", grey, 255)
    array, said = decode_image(tmp_path / "grey.pgm")
    assert said == "greyscale"
    np.testing.assert_array_equal(array, np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8))
    rgb = rng.integers(0, 256, (7, 9, 3))
    _write_netpbm(tmp_path / "rgb.ppm", rgb, 255)
    array, said = decode_image(tmp_path / "rgb.ppm")
    assert said is None
    np.testing.assert_array_equal(array, rgb.astype(np.uint8))
