"""Data for super-resolution: MATLAB-style resizing, degradations, data sets and the embedded samples."""

from dlsn.data.datasets import (
    DegradedFolderDataset,
    HRFolderDataset,
    HRImageDataset,
    PairedFolderDataset,
    dihedral,
    match_pairs,
    random_dihedral_pair,
    random_patch_pair,
)
from dlsn.data.degradations import (
    DEGRADATIONS,
    add_noise,
    degrade,
    degrade_bd,
    degrade_bi,
    degrade_dn,
    gaussian_blur,
    modcrop,
    quantize_8bit,
)
from dlsn.data.imresize import bicubic_downsample, bicubic_upsample, imresize
from dlsn.data.samples import SAMPLE_NAMES, TRAIN_NAMES, VAL_NAMES, load_sample, train_val_split

__all__ = [
    "DEGRADATIONS",
    "DegradedFolderDataset",
    "HRFolderDataset",
    "HRImageDataset",
    "PairedFolderDataset",
    "SAMPLE_NAMES",
    "TRAIN_NAMES",
    "VAL_NAMES",
    "add_noise",
    "bicubic_downsample",
    "bicubic_upsample",
    "degrade",
    "degrade_bd",
    "degrade_bi",
    "degrade_dn",
    "dihedral",
    "gaussian_blur",
    "imresize",
    "load_sample",
    "match_pairs",
    "modcrop",
    "quantize_8bit",
    "random_dihedral_pair",
    "random_patch_pair",
    "train_val_split",
]
