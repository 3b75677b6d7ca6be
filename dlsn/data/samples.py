"""The embedded default data set: real colour photos that ship inside installed wheels.

scikit-image bundles nine colour photos and matplotlib bundles ``grace_hopper.jpg``; together they
let ``python -m dlsn.train`` run with no download. The split is fixed:

- training (8): astronaut, chelsea, ihc, motorcycle_left, motorcycle_right, rocket, hubble_deep_field, retina
  (portrait, animal, microscopy, street scene, sky/launch, deep-space, medical fundus: varied content;
  the two motorcycle views are a stereo pair, so they stay on the same side of the split);
- validation (2): coffee (still life, 600x400) and grace_hopper (portrait, 512x600), never trained on.

Files are decoded once per process and cached; callers get read-only ``[H, W, 3]`` uint8 arrays.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dlsn.images import read_image

SKIMAGE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "ihc": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
}
MATPLOTLIB_FILES: dict[str, str] = {"grace_hopper": "grace_hopper.jpg"}

SAMPLE_NAMES: tuple[str, ...] = (*SKIMAGE_FILES, *MATPLOTLIB_FILES)
VAL_NAMES: tuple[str, ...] = ("coffee", "grace_hopper")
TRAIN_NAMES: tuple[str, ...] = tuple(name for name in SAMPLE_NAMES if name not in VAL_NAMES)


def _skimage_data_dir() -> Path:
    try:
        import skimage
    except ImportError as error:  # pragma: no cover - scikit-image is a dependency
        raise RuntimeError("the embedded sample images need scikit-image") from error
    return Path(skimage.__file__).parent / "data"


def _matplotlib_sample_dir() -> Path:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - matplotlib is a dependency
        raise RuntimeError("the embedded sample images need matplotlib") from error
    return Path(matplotlib.get_data_path()) / "sample_data"


def sample_path(name: str) -> Path:
    """Where the file of sample image ``name`` lies in the installed scikit-image / matplotlib."""
    if name in SKIMAGE_FILES:
        path = _skimage_data_dir() / SKIMAGE_FILES[name]
    elif name in MATPLOTLIB_FILES:
        path = _matplotlib_sample_dir() / MATPLOTLIB_FILES[name]
        if not path.is_file():
            # Older layouts: ask matplotlib itself.
            from matplotlib import cbook

            path = Path(cbook.get_sample_data(MATPLOTLIB_FILES[name], asfileobj=False))
    else:
        raise ValueError(f"unknown sample image {name!r}; known: {', '.join(SAMPLE_NAMES)}")
    if not path.is_file():
        raise FileNotFoundError(f"sample image {name!r} not found at {path}; "
                                "is the package installed completely?")
    return path


@functools.cache
def load_sample(name: str) -> np.ndarray:
    """The sample image ``name`` as a read-only ``[H, W, 3]`` uint8 array (decoded once per process)."""
    image = read_image(sample_path(name))
    image.setflags(write=False)
    return image


def load_samples(names: tuple[str, ...] | list[str] = SAMPLE_NAMES) -> dict[str, np.ndarray]:
    """``{name: image}`` for the given sample names, in the given order."""
    return {name: load_sample(name) for name in names}


def train_val_split(val_crop: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The fixed split ``(train_images, val_images)``, each an ordered ``{name: [H, W, 3] uint8}``.

    val_crop: if given, each validation image is centre-cropped to at most ``val_crop x val_crop``
        (whole-image validation of a 600x400 photo is slow on a CPU).
    """
    train = load_samples(TRAIN_NAMES)
    val = load_samples(VAL_NAMES)
    if val_crop is not None:
        if val_crop < 1:
            raise ValueError(f"val_crop must be a positive size, got {val_crop}")
        val = {name: center_crop(image, val_crop) for name, image in val.items()}
    return train, val


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of ``[H, W, ...]`` to at most ``size x size`` (a view)."""
    height, width = image.shape[:2]
    crop_h, crop_w = min(size, height), min(size, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top:top + crop_h, left:left + crop_w]
