"""Tests of dlsn.data (imresize, degradations, data sets, samples) and dlsn.images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dlsn.data import (
    HRFolderDataset,
    HRImageDataset,
    PairedFolderDataset,
    degrade,
    dihedral,
    imresize,
    modcrop,
)
from dlsn.data.degradations import gaussian_blur, gaussian_kernel
from dlsn.data.imresize import bicubic_downsample, cubic, resize_matrix
from dlsn.data.samples import SAMPLE_NAMES, TRAIN_NAMES, VAL_NAMES, load_sample, train_val_split
from dlsn.errors import UserInputError
from dlsn.images import read_image, tensor_to_uint8, uint8_to_tensor, write_image

# --------------------------------------------------------------------------------------------------
# imresize


def numpy_imresize_axis(x: np.ndarray, out_len: int, scale: float) -> np.ndarray:
    """Direct per-pixel MATLAB bicubic along axis 0 of ``x``, written independently with plain loops."""

    def kernel(t: float) -> float:
        a = abs(t)
        if a <= 1:
            return 1.5 * a**3 - 2.5 * a**2 + 1
        if a <= 2:
            return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
        return 0.0

    n = x.shape[0]
    width = 4.0 / scale if scale < 1 else 4.0
    out = np.zeros((out_len,) + x.shape[1:])
    for i in range(1, out_len + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        first = math.floor(u - width / 2)
        taps = []
        for j in range(first, first + math.ceil(width) + 2):
            w = scale * kernel(scale * (u - j)) if scale < 1 else kernel(u - j)
            k = j - 1  # to 0-based, then mirror into [0, n)
            while k < 0 or k >= n:
                k = -k - 1 if k < 0 else 2 * n - 1 - k
            taps.append((w, k))
        total = sum(w for w, _ in taps)
        for w, k in taps:
            out[i - 1] += (w / total) * x[k]
    return out


def test_cubic_kernel_values():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.5], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.5625, 0.0, -0.0625, 0.0, 0.0, 0.5625], dtype=torch.float64)
    torch.testing.assert_close(cubic(x), expected)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2.0, 3.0, 0.7])
def test_constant_image_stays_constant(scale):
    image = torch.full((2, 3, 19, 26), 0.3712, dtype=torch.float64)
    out = imresize(image, scale=scale)
    torch.testing.assert_close(out, torch.full_like(out, 0.3712), rtol=0, atol=1e-12)


def test_output_sizes():
    image = torch.rand(3, 17, 23)
    assert imresize(image, scale=1 / 3).shape == (3, 6, 8)  # ceil(17/3), ceil(23/3)
    assert imresize(image, scale=2).shape == (3, 34, 46)
    assert imresize(image, size=(5, 40)).shape == (3, 5, 40)
    assert imresize(image, scale=(0.5, 2)).shape == (3, 9, 46)
    assert imresize(torch.rand(300, 300), scale=1 / 3).shape == (100, 100)  # no float error in ceil
    assert bicubic_downsample(torch.rand(1, 3, 48, 36), 4).shape == (1, 3, 12, 9)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downscaled_ramp_is_the_ramp_at_pixel_centres(factor):
    # Output pixel i (0-based) centres on input coordinate (i + 0.5) * s - 0.5; the taps are symmetric
    # around it for integer factors, so a linear ramp is reproduced exactly away from the borders.
    width = 16 * factor
    ramp = torch.arange(width, dtype=torch.float64).expand(5, width)
    out = imresize(ramp, scale=1 / factor)
    centres = (torch.arange(16, dtype=torch.float64) + 0.5) * factor - 0.5
    margin = 3  # kernel reach is 2 * factor input pixels: 2 output pixels, plus one
    torch.testing.assert_close(out[0, margin:-margin], centres[margin:-margin], rtol=0, atol=1e-10)
    assert (out[:, 0] > 0).all() and (out[:, 0] < centres[1]).all()  # mirrored border: still sensible


@pytest.mark.parametrize("shape,scale", [((13, 11), 1 / 3), ((12, 10), 1 / 2), ((9, 7), 1 / 4),
                                         ((7, 5), 2.0), ((6, 9), 3.0), ((10, 10), 0.6)])
def test_matches_direct_numpy_formula(shape, scale):
    rng = np.random.default_rng(1)
    image = rng.random(shape)
    out_h, out_w = math.ceil(shape[0] * scale - 1e-9), math.ceil(shape[1] * scale - 1e-9)
    expected = numpy_imresize_axis(numpy_imresize_axis(image, out_h, scale).T, out_w, scale).T
    ours = imresize(torch.from_numpy(image), scale=scale).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_close_to_pillow_bicubic_away_from_borders(factor):
    # PIL's BICUBIC is the same a=-0.5 kernel with antialiasing; it treats borders differently.
    rng = np.random.default_rng(2)
    image = rng.random((60, 48)).astype(np.float32)
    pil = np.asarray(Image.fromarray(image, mode="F").resize((48 // factor, 60 // factor), Image.BICUBIC))
    ours = imresize(torch.from_numpy(image).double(), scale=1 / factor).numpy()
    m = 3
    np.testing.assert_allclose(ours[m:-m, m:-m], pil[m:-m, m:-m], rtol=0, atol=1e-5)
    assert np.abs(ours - pil).mean() < 0.01


def test_resize_matrix_rows_sum_to_one_and_is_banded():
    matrix = resize_matrix(40, 10, 0.25)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert (matrix[5, :8] == 0).all() and (matrix[5, 36:] == 0).all()


def test_imresize_errors():
    with pytest.raises(TypeError, match="floating"):
        imresize(torch.zeros(3, 8, 8, dtype=torch.uint8), scale=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(torch.zeros(3, 8, 8), scale=0.5, size=(4, 4))
    with pytest.raises(ValueError, match="scale"):
        imresize(torch.zeros(3, 8, 8), scale=-1.0)
    with pytest.raises(ValueError, match="factor"):
        bicubic_downsample(torch.zeros(3, 8, 8), 0)


# --------------------------------------------------------------------------------------------------
# Degradations


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A [3, H, W] float image in [0, 1] with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 4), max(2, width // 4), generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    return (0.8 * image[0] + 0.2 * torch.rand(3, height, width, generator=g)).clamp(0, 1)


def assert_8bit(image: torch.Tensor) -> None:
    levels = image * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bi_is_quantised_bicubic(scale):
    hr = smooth_image(12 * scale, 8 * scale)
    lr = degrade(hr, scale, "BI")
    assert lr.shape == (3, 12, 8)
    assert_8bit(lr)
    exact = imresize(hr, scale=1 / scale).clamp(0, 1)
    assert (lr - exact).abs().max() <= 0.5 / 255 + 1e-6


def test_gaussian_kernel_is_normalised_and_symmetric():
    kernel = gaussian_kernel(7, 1.6)
    assert kernel.shape == (7, 7)
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(kernel, kernel.flip(0))
    torch.testing.assert_close(kernel, kernel.T)
    assert kernel[3, 3] == kernel.max()
    # Ratio of neighbouring taps is exp(-1 / (2 sigma^2)) along an axis.
    assert math.isclose(float(kernel[3, 4] / kernel[3, 3]), math.exp(-1 / (2 * 1.6**2)), rel_tol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bd_blurs_then_keeps_pixel_s_i_plus_half_s(scale):
    hr = smooth_image(6 * scale, 5 * scale, seed=3).double()
    lr = degrade(hr, scale, "BD", quantize=False)
    blurred = gaussian_blur(hr, 7, 1.6)
    torch.testing.assert_close(lr, blurred[:, scale // 2::scale, scale // 2::scale])
    assert lr.shape == (3, 6, 5)
    assert_8bit(degrade(hr, scale, "BD"))
    constant = torch.full((3, 4 * scale, 4 * scale), 0.25, dtype=torch.float64)
    torch.testing.assert_close(degrade(constant, scale, "BD", quantize=False), torch.full((3, 4, 4), 0.25,
                                                                                         dtype=torch.float64))


def test_dn_noise_is_seeded_and_has_the_requested_level():
    hr = torch.full((3, 128, 128), 0.5)
    sigma = 15.0
    first = degrade(hr, 2, "DN", noise_sigma=sigma, generator=torch.Generator().manual_seed(7))
    again = degrade(hr, 2, "DN", noise_sigma=sigma, generator=torch.Generator().manual_seed(7))
    other = degrade(hr, 2, "DN", noise_sigma=sigma, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert_8bit(first)
    clean = degrade(hr, 2, "BI")
    std = float((first - clean).std() * 255)
    assert abs(std - sigma) < 0.05 * sigma
    saturated = degrade(torch.ones(3, 32, 32), 2, "DN", noise_sigma=25.0, generator=torch.Generator())
    assert saturated.max() == 1.0 and saturated.min() >= 0.0


def test_degradation_errors():
    hr = torch.rand(3, 10, 10)
    with pytest.raises(ValueError, match="multiple of scale 3"):
        degrade(hr, 3, "BI")
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(hr, 2, "XYZ")
    with pytest.raises(ValueError, match="noise_sigma"):
        degrade(hr, 2, "DN")
    with pytest.raises(TypeError, match="floating"):
        degrade(torch.zeros(3, 10, 10, dtype=torch.uint8), 2)
    assert modcrop(torch.rand(3, 11, 14), 3).shape == (3, 9, 12)
    assert degrade(hr, 2, "bi").shape == (3, 5, 5)  # names are case-insensitive



@pytest.mark.parametrize("kind", ["BI", "BD", "DN"])
def test_degradations_refuse_values_outside_0_1(kind):
    from dlsn.data.degradations import add_noise, degrade_bd, degrade_bi, degrade_dn
    from dlsn.errors import UserInputError

    eight_bit = torch.rand(3, 8, 8) * 255  # a 0-255 image: once quietly clamped to white
    function = {"BI": degrade_bi, "BD": degrade_bd, "DN": lambda hr, s: degrade_dn(hr, s, 10.0)}[kind]
    with pytest.raises(UserInputError, match=r"hr values must lie in \[0, 1\], got min .* divide 8-bit"):
        function(eight_bit, 2)
    with pytest.raises(UserInputError, match=r"\[0, 1\]"):
        degrade(torch.full((3, 8, 8), -0.5), 2, kind, noise_sigma=5.0)
    nan = torch.rand(3, 8, 8)
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="max nan"):
        function(nan, 2)
    with pytest.raises(UserInputError, match="image values"):
        add_noise(eight_bit, 5.0)
    for edge in (torch.zeros(3, 8, 8), torch.ones(3, 8, 8)):  # the ends of the range are fine
        assert function(edge, 2).shape == (3, 4, 4)
    assert "[0, 1]" in (degrade_bi.__doc__ or "") and "[0, 1]" in (degrade_bd.__doc__ or "")
    assert "[0, 1]" in (degrade_dn.__doc__ or "")


def _png_16_bits_per_channel(path, pixels: np.ndarray) -> None:
    """A 48-bit RGB (or 64-bit RGBA) PNG, written by hand: PIL writes only 8 bits per channel."""
    import struct
    import zlib

    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_decode_image_names_every_colour_and_depth_conversion(tmp_path):
    from dlsn.images import decode_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, rgb[:, :, :1]], axis=2)).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 65536, (4, 5), dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    deep = rng.integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    _png_16_bits_per_channel(tmp_path / "rgb16.png", deep)
    expected = {"rgb.png": None, "rgba.png": "RGBA, alpha dropped", "grey.png": "greyscale",
                "grey16.png": "16-bit greyscale", "palette.png": "palette", "rgb16.png": "16-bit RGB"}
    for name, conversion in expected.items():
        array, said = decode_image(tmp_path / name)
        assert said == conversion, name
        assert array.dtype == np.uint8 and array.shape == (4, 5, 3)
    np.testing.assert_array_equal(decode_image(tmp_path / "rgba.png")[0], rgb)
    # Rounded like 16-bit grey (issue 31), not truncated to the high byte as PIL does.
    np.testing.assert_array_equal(decode_image(tmp_path / "rgb16.png")[0], np.round(deep / 257.0).astype(np.uint8))
    deep4 = rng.integers(0, 65536, (4, 5, 4), dtype=np.uint16)
    _png_16_bits_per_channel(tmp_path / "rgba16.png", deep4)
    array, said = decode_image(tmp_path / "rgba16.png")
    assert said == "16-bit RGBA, alpha dropped"
    np.testing.assert_array_equal(array, np.round(deep4[:, :, :3] / 257.0).astype(np.uint8))


def test_degraded_folder_dataset_reads_lazily_and_names_bad_files(tmp_path):
    from dlsn.data.datasets import DegradedFolderDataset
    from dlsn.errors import UserInputError

    hr = load_sample("astronaut")[:31, :40].copy()
    write_image(tmp_path / "a.png", hr)
    (tmp_path / "b.png").write_bytes(b"broken")
    data = DegradedFolderDataset(tmp_path, 3, degradation="BD")
    assert len(data) == 2 and data.names == ["a", "b"]
    item = data[0]
    expected_hr = uint8_to_tensor(hr[:30, :39])
    torch.testing.assert_close(item["hr"], expected_hr)
    torch.testing.assert_close(item["lr"], degrade(expected_hr, 3, "BD"))
    with pytest.raises(UserInputError, match="cannot read image .*b.png"):
        data[1]
    with pytest.raises(ValueError, match="noise_sigma"):
        DegradedFolderDataset(tmp_path, 2, degradation="DN")

# --------------------------------------------------------------------------------------------------
# Data sets


def uint8_image(height: int, width: int, seed: int) -> np.ndarray:
    return tensor_to_uint8(smooth_image(height, width, seed))


def locate(patch: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """(top, left) where ``patch`` occurs in ``image`` (exact match)."""
    ph, pw = patch.shape[:2]
    hits = [(top, left) for top in range(image.shape[0] - ph + 1) for left in range(image.shape[1] - pw + 1)
            if np.array_equal(image[top:top + ph, left:left + pw], patch)]
    assert len(hits) == 1, f"patch found {len(hits)} times"
    return hits[0]


def test_dihedral_transforms_are_8_distinct_and_invertible():
    x = torch.arange(12.0).reshape(1, 3, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) + tuple(o.shape) for o in outs}) == 8
    for k in range(8):
        torch.testing.assert_close(dihedral(dihedral(x, k), k, inverse=True), x)
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_pyramid_adds_downscaled_copies_that_fit_a_patch():
    images = {"a": uint8_image(64, 80, 1), "b": uint8_image(30, 40, 2)}
    data = HRImageDataset(images, 2, patch_size=8, pyramid=(0.5, 0.75), augment=False)
    # b at 0.5 is 15x20: too small for a 16-pixel HR patch, so it is left out
    assert data.names == ["a", "b", "a@0.5", "a@0.75", "b@0.75"]
    assert data.hr_images[2].shape == (32, 40, 3)
    assert data.hr_images[3].shape == (48, 60, 3)
    assert data.hr_images[4].shape == (22, 30, 3)  # 23x30, cropped to a multiple of the scale
    expected = tensor_to_uint8(imresize(uint8_to_tensor(images["a"], dtype=torch.float64), 0.5).clamp(0, 1))
    assert np.abs(data.hr_images[2].astype(int) - expected.astype(int)).max() <= 1
    # a downscaled copy keeps the image's content: its mean colour stays close
    assert abs(float(data.hr_images[3].mean()) - float(images["a"].mean())) < 2.0
    with pytest.raises(ValueError, match="pyramid"):
        HRImageDataset(images, 2, patch_size=8, pyramid=(1.0,))
    with pytest.raises(ValueError, match="training sets only"):
        HRImageDataset(images, 2, train=False, pyramid=(0.5,))


def test_hr_dataset_training_patches_are_aligned():
    images = {"a": uint8_image(64, 80, 1), "b": uint8_image(50, 61, 2)}
    data = HRImageDataset(images, 2, patch_size=8, repeat=3, augment=False)
    assert len(data) == 6
    assert data.hr_images[1].shape == (50, 60, 3)  # cropped to a multiple of the scale
    torch.manual_seed(0)
    for index in range(len(data)):
        item = data[index]
        assert item["name"] == ["a", "b"][index % 2]
        assert item["lr"].shape == (3, 8, 8) and item["hr"].shape == (3, 16, 16)
        assert item["lr"].dtype == torch.float32
        image_index = index % 2
        top, left = locate(tensor_to_uint8(item["lr"]), data.lr_images[image_index])
        hr = data.hr_images[image_index][2 * top:2 * top + 16, 2 * left:2 * left + 16]
        np.testing.assert_array_equal(tensor_to_uint8(item["hr"]), hr)
    # The LR images are the BI degradation of the (cropped) HR images.
    expected = tensor_to_uint8(degrade(uint8_to_tensor(data.hr_images[1]), 2, "BI"))
    np.testing.assert_array_equal(data.lr_images[1], expected)


def test_augmentation_applies_one_transform_to_both():
    image = uint8_image(40, 40, 4)
    data = HRImageDataset([image], 2, patch_size=20, augment=True)  # patch = whole LR image
    lr_full, hr_full = uint8_to_tensor(data.lr_images[0]), uint8_to_tensor(data.hr_images[0])
    torch.manual_seed(1)
    seen = set()
    for _ in range(40):
        item = data[0]
        matches = [k for k in range(8) if torch.equal(dihedral(item["lr"], k, inverse=True), lr_full)]
        assert matches, "LR patch is not a flip/rotation of the LR image"
        k = matches[0]
        torch.testing.assert_close(dihedral(item["hr"], k, inverse=True), hr_full, rtol=0, atol=0)
        seen.add(k)
    assert len(seen) >= 6  # all symmetries get used


def test_hr_dataset_eval_mode_returns_whole_images():
    images = {"odd": uint8_image(50, 37, 5)}
    data = HRImageDataset(images, 3, train=False, degradation="BD")
    assert len(data) == 1
    item = data[0]
    assert item["hr"].shape == (3, 48, 36) and item["lr"].shape == (3, 16, 12)
    torch.testing.assert_close(item["lr"], degrade(item["hr"], 3, "BD"), rtol=0, atol=1e-6)


def test_dn_dataset_noise_fresh_in_training_and_fixed_in_eval():
    images = [uint8_image(32, 32, 6)]
    train = HRImageDataset(images, 2, degradation="DN", noise_sigma=20, patch_size=16, augment=False)
    first, second = train[0]["lr"], train[0]["lr"]
    assert not torch.equal(first, second)  # same crop (whole image), fresh noise
    assert_8bit(first)
    val_a = HRImageDataset(images, 2, degradation="DN", noise_sigma=20, train=False, seed=3)[0]["lr"]
    val_b = HRImageDataset(images, 2, degradation="DN", noise_sigma=20, train=False, seed=3)[0]["lr"]
    torch.testing.assert_close(val_a, val_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_sigma"):
        HRImageDataset(images, 2, degradation="DN")


def test_dataloader_batches_items():
    data = HRImageDataset([uint8_image(40, 40, 7), uint8_image(48, 40, 8)], 4, patch_size=6, repeat=2)
    batch = next(iter(DataLoader(data, batch_size=3, shuffle=True)))
    assert batch["lr"].shape == (3, 3, 6, 6) and batch["hr"].shape == (3, 3, 24, 24)
    assert len(batch["name"]) == 3


def test_hr_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="smaller than the patch size"):
        HRImageDataset({"small": uint8_image(40, 40, 0)}, 4, patch_size=12)
    with pytest.raises(ValueError, match="uint8"):
        HRImageDataset([np.zeros((8, 8, 3), dtype=np.float32)], 2, patch_size=2)
    with pytest.raises(ValueError, match="no images"):
        HRImageDataset([], 2)
    with pytest.raises(FileNotFoundError, match="not found"):
        HRFolderDataset(tmp_path / "missing", 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        HRFolderDataset(tmp_path / "empty", 2)


def test_hr_folder_dataset_reads_every_image(tmp_path):
    for name, seed in (("x", 1), ("y", 2)):
        write_image(tmp_path / f"{name}.png", uint8_image(24, 30, seed))
    data = HRFolderDataset(tmp_path, 2, train=False)
    assert data.names == ["x", "y"]
    np.testing.assert_array_equal(data.hr_images[0], read_image(tmp_path / "x.png"))


def make_pairs(hr_dir, lr_dir, scale, names, suffix, hr_extra=0):
    for i, name in enumerate(names):
        hr = uint8_image(12 * scale, 10 * scale, i)
        padded = np.pad(hr, ((0, hr_extra), (0, hr_extra), (0, 0)), mode="edge")
        write_image(hr_dir / f"{name}.png", padded)
        write_image(lr_dir / f"{name}{suffix}.png", degrade(uint8_to_tensor(hr), scale))


def test_paired_dataset_div2k_layout(tmp_path):
    make_pairs(tmp_path / "DIV2K_train_HR", tmp_path / "DIV2K_train_LR_bicubic" / "X2", 2,
               ["0001", "0002"], "x2")
    data = PairedFolderDataset.from_div2k(tmp_path, 2, patch_size=6, repeat=4)
    assert data.names == ["0001", "0002"] and len(data) == 8
    item = data[1]
    assert item["lr"].shape == (3, 6, 6) and item["hr"].shape == (3, 12, 12)
    lazy = PairedFolderDataset.from_div2k(tmp_path, 2, train=False, cache=False)
    cached = PairedFolderDataset.from_div2k(tmp_path, 2, train=False)
    for a, b in zip(lazy, cached, strict=True):
        assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"])
    assert cached[0]["hr"].shape == (3, 24, 20)


def test_paired_dataset_test_set_layout_crops_hr(tmp_path):
    make_pairs(tmp_path / "Set" / "HR", tmp_path / "Set" / "LR_bicubic" / "X3", 3, ["baby", "bird"], "",
               hr_extra=2)
    data = PairedFolderDataset.from_test_set(tmp_path / "Set", 3)
    assert not data.train and len(data) == 2
    item = data[0]
    assert item["name"] == "baby"
    assert item["lr"].shape == (3, 12, 10) and item["hr"].shape == (3, 36, 30)


def test_paired_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2)
    make_pairs(tmp_path / "hr", tmp_path / "lr", 2, ["a", "b"], "x2")
    (tmp_path / "lr" / "bx2.png").unlink()
    with pytest.raises(ValueError, match="no LR file"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2)
    # An LR file of the wrong size.
    write_image(tmp_path / "lr" / "bx2.png", uint8_image(5, 5, 0))
    with pytest.raises(ValueError, match="does not match LR size"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, train=False)
    with pytest.raises(ValueError, match="does not match LR size"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, train=False, cache=False)
    write_image(tmp_path / "lr" / "bx2.png", uint8_image(12, 10, 0))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, patch_size=11)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no HR images"):
        PairedFolderDataset(tmp_path / "empty", tmp_path / "lr", 2)
    (tmp_path / "hr" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "lr" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, train=False)


def test_paired_folder_skips_or_defers_unreadable_pairs(tmp_path):
    # One policy for every tool: the readable pairs are used, the others listed (training), or refused
    # when their item is read (evaluation goes on with the rest).
    write_image(tmp_path / "hr" / "a.png", uint8_image(20, 24, 0))
    write_image(tmp_path / "lr" / "ax2.png", uint8_image(10, 12, 1))
    write_image(tmp_path / "hr" / "b.png", uint8_image(20, 24, 2))
    (tmp_path / "lr" / "bx2.png").write_bytes(b"not a png")
    for cache in (True, False):
        data = PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, train=False, cache=cache,
                                   skip_unreadable=True)
        assert data.names == ["a"] and len(data) == 1 and data[0]["hr"].shape == (3, 20, 24)
        assert len(data.failed) == 1 and data.failed[0][0] == "lr/bx2.png"
        assert "cannot read image" in data.failed[0][1] and "bx2.png" in data.failed[0][1]
    deferred = PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, train=False, cache=False)
    assert deferred.names == ["a", "b"] and deferred.failed == []
    assert deferred[0]["name"] == "a"
    with pytest.raises(UserInputError, match="cannot read image .*bx2.png"):
        deferred[1]
    (tmp_path / "lr" / "ax2.png").write_bytes(b"nor this")
    with pytest.raises(UserInputError, match="no readable image pairs .*ax2.png .*bx2.png"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", 2, train=False, skip_unreadable=True)


# --------------------------------------------------------------------------------------------------
# Embedded samples


def test_sample_split_is_fixed_and_disjoint():
    train, val = train_val_split()
    assert list(train) == list(TRAIN_NAMES) and list(val) == list(VAL_NAMES) == ["coffee", "grace_hopper"]
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(SAMPLE_NAMES)
    assert len(SAMPLE_NAMES) == 10
    sizes = {"astronaut": (512, 512), "chelsea": (300, 451), "coffee": (400, 600), "ihc": (512, 512),
             "motorcycle_left": (500, 741), "motorcycle_right": (500, 741), "rocket": (427, 640),
             "hubble_deep_field": (872, 1000), "retina": (1411, 1411), "grace_hopper": (600, 512)}
    for name, image in {**train, **val}.items():
        assert image.dtype == np.uint8 and image.shape == (*sizes[name], 3), name
        assert not image.flags.writeable
        assert image.std() > 10  # a real photo, not a blank
    assert load_sample("coffee") is val["coffee"]  # decoded once


def test_samples_feed_the_data_sets():
    train, val = train_val_split(val_crop=96)
    val_data = HRImageDataset(val, 4, train=False)
    item = val_data[1]
    assert item["name"] == "grace_hopper"
    assert item["hr"].shape == (3, 96, 96) and item["lr"].shape == (3, 24, 24)
    train_data = HRImageDataset({"chelsea": train["chelsea"]}, 2, patch_size=24, repeat=2)
    assert train_data[1]["hr"].shape == (3, 48, 48)
    one_pixel = np.zeros((1, 1, 3), dtype=np.uint8)
    one_pixel.setflags(write=False)
    assert uint8_to_tensor(one_pixel).shape == (3, 1, 1)


def test_sample_val_crop():
    _, val = train_val_split(val_crop=128)
    assert all(image.shape == (128, 128, 3) for image in val.values())
    with pytest.raises(ValueError):
        load_sample("lena")


# --------------------------------------------------------------------------------------------------
# Image files


def test_image_round_trip_and_modes(tmp_path):
    rgb = uint8_image(9, 7, 1)
    write_image(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    grey = rgb[:, :, 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 10, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png")[:, :, 1], grey)


def test_tensor_conversions():
    image = uint8_image(5, 6, 2)
    tensor = uint8_to_tensor(image, rgb_range=255)
    assert tensor.shape == (3, 5, 6) and float(tensor.max()) == float(image.max())
    np.testing.assert_array_equal(tensor_to_uint8(tensor, rgb_range=255), image)
    out_of_range = torch.tensor([-0.2, 0.5 / 255 + 1e-6, 2.0]).reshape(3, 1, 1)
    np.testing.assert_array_equal(tensor_to_uint8(out_of_range), np.array([[[0, 1, 255]]], dtype=np.uint8))


def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="extension"):
        write_image(tmp_path / "out.txt", uint8_image(4, 4, 0))
    with pytest.raises(ValueError, match="uint8"):
        uint8_to_tensor(np.zeros((4, 4, 3), dtype=np.float32))
