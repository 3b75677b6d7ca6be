"""Reading and writing images, and converting between uint8 arrays and float tensors.

Every image in the project travels as one of two things:
- a ``numpy.ndarray`` of shape ``[H, W, 3]``, dtype ``uint8`` (what files hold), or
- a ``torch.Tensor`` of shape ``[3, H, W]`` (or ``[N, 3, H, W]``), float, in ``[0, rgb_range]``
  (``rgb_range`` 1 for the data pipeline and metrics, 255 for the network, as in the authors' code).
Files are decoded by :mod:`dlsn.image_decoding` (greyscale, alpha, 16 bits and more to 8-bit RGB, exactly; the
size checked before decoding), whose ``decode_image`` and ``DEFAULT_MAX_PIXELS`` are also importable from here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dlsn.atomic_files import write_atomically
from dlsn.image_decoding import DEFAULT_MAX_PIXELS, PathLike, decode_image, describe_conversion

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "decode_image", "describe_conversion", "is_image_file",
           "list_images", "read_image", "tensor_to_uint8", "uint8_to_tensor", "write_image"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def is_image_file(path: PathLike) -> bool:
    """True when the file name ends in one of IMAGE_EXTENSIONS (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Raises FileNotFoundError when the folder does not exist and NotADirectoryError when it is a file.
    An empty list is returned for a folder without images (callers decide whether that is an error).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def read_image(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to a ``[H, W, 3]`` uint8 array (greyscale -> RGB, alpha dropped, 16 bits
    per channel -> 8; ``decode_image`` also says which of these happened).

    Raises FileNotFoundError for a missing file and :class:`~dlsn.errors.UserInputError` (a ValueError)
    naming the file when it cannot be decoded.
    """
    return decode_image(path, max_pixels)[0]


def write_image(path: PathLike, image: np.ndarray | torch.Tensor, rgb_range: float = 1.0) -> Path:
    """Write an image; the format follows the file extension. Parent folders are created.

    ``image`` is a ``[H, W, 3]`` uint8 array, or a float tensor ``[3, H, W]`` / ``[1, 3, H, W]`` in
    ``[0, rgb_range]`` (rounded to 8-bit levels, values outside the range clipped).
    """
    path = Path(path)
    if not is_image_file(path):
        raise ValueError(f"unsupported image extension for {path}; use one of {', '.join(IMAGE_EXTENSIONS)}")
    array = tensor_to_uint8(image, rgb_range) if isinstance(image, torch.Tensor) else image
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"image must be a [H, W, 3] uint8 array or a float tensor, got {dtype} {shape}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    # an interrupted run never leaves a partial image
    return write_atomically(path, lambda handle: Image.fromarray(array).save(handle, format=fmt))


def uint8_to_tensor(image: np.ndarray, rgb_range: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[H, W, 3]`` (or ``[H, W]`` grey) uint8 array -> ``[3, H, W]`` float tensor in ``[0, rgb_range]``."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {type(image).__name__} "
                         f"{getattr(image, 'dtype', '')}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must have shape [H, W, 3], got {list(image.shape)}")
    chw = np.ascontiguousarray(image[:, :, :3].transpose(2, 0, 1))
    if not chw.flags.writeable:  # torch warns on read-only arrays (e.g. the cached samples)
        chw = chw.copy()
    return torch.from_numpy(chw).to(dtype).mul_(rgb_range / 255.0)


def tensor_to_uint8(image: torch.Tensor, rgb_range: float = 1.0) -> np.ndarray:
    """``[3, H, W]`` (or ``[1, 3, H, W]``) float tensor in ``[0, rgb_range]`` -> ``[H, W, 3]`` uint8 array.

    Values are scaled to 0..255, clipped and rounded to the nearest level (the rounding SR evaluation uses).
    """
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must have shape [3, H, W] or [1, 3, H, W], got {list(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image tensor must be floating point, got {image.dtype}")
    levels = (image.detach().to("cpu", torch.float64) * (255.0 / rgb_range)).clamp_(0, 255).round_()
    return levels.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
