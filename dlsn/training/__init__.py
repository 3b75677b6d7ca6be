"""Training an SR network: the library behind ``python -m dlsn.train`` (``dlsn/train.py``, the command line).

``settings`` resolves a run's settings (command line, resumed run, the preset's recipe), ``data`` builds
its data sets and patch order, ``schedule`` its learning rate, ``run_folder`` its folder, ``log.csv`` and
``curves.png``, ``processes`` its processes, threads and signals, ``trainer`` runs it and ``report``
says what it scored.
"""

from .data import Data, DetailedPatches, EpochSampler, build_data
from .processes import Processes, StopFlag, ThreadTuner
from .report import validate
from .run_folder import LOG_COLUMNS, RunLog, find_resume_file, run_folder
from .schedule import COSINE_FLOOR, SCHEDULES, LRSchedule
from .settings import DEFAULT_PRESET, LOSSES, Settings, TrainError, parse_model_args, resolve_settings
from .trainer import Progress, Trainer

__all__ = [
    "COSINE_FLOOR",
    "DEFAULT_PRESET",
    "LOG_COLUMNS",
    "LOSSES",
    "SCHEDULES",
    "Data",
    "DetailedPatches",
    "EpochSampler",
    "LRSchedule",
    "Processes",
    "Progress",
    "RunLog",
    "Settings",
    "StopFlag",
    "ThreadTuner",
    "TrainError",
    "Trainer",
    "build_data",
    "find_resume_file",
    "parse_model_args",
    "resolve_settings",
    "run_folder",
    "validate",
]
