"""Networks of the project: the GLA block, DLSN, NLSA/NLSN, presets and checkpoints."""

from .checkpoint import (
    CheckpointError,
    infer_official_config,
    load_checkpoint,
    load_model,
    load_weights,
    resume,
    save_checkpoint,
)
from .cpu_nets import DLSNResidual, PlainSR
from .dlsn import DLSN, EDSRGLA, GLAFFM, LFFB, MeanShift, Upsampler
from .gla import GLA, set_backend, set_inference
from .nlsn import NLSA, NLSN, infer_nlsn_config
from .presets import PRESETS, Preset, TrainingRecipe, build_model, model_from_config, preset_config

__all__ = [
    "DLSN",
    "DLSNResidual",
    "EDSRGLA",
    "GLA",
    "GLAFFM",
    "LFFB",
    "NLSA",
    "NLSN",
    "PRESETS",
    "PlainSR",
    "Preset",
    "TrainingRecipe",
    "CheckpointError",
    "MeanShift",
    "Upsampler",
    "build_model",
    "infer_nlsn_config",
    "infer_official_config",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "model_from_config",
    "preset_config",
    "resume",
    "save_checkpoint",
    "set_backend",
    "set_inference",
]
