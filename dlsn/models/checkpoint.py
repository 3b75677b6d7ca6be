"""Checkpoints: our training format, and the authors' bare state dicts.

Our format is one ``torch.save`` file holding only plain containers (dicts, lists, numbers,
strings, tensors), so it loads with ``torch.load(weights_only=True)`` and no code runs on load::

    {"format": "dlsn-checkpoint", "version": 1,
     "config": model.config,            # plain dict, rebuilds the network (presets.model_from_config)
     "model": state_dict,
     "optimizer": state_dict or None, "scheduler": state_dict or None,
     "step": int, "extra": dict}        # extra: anything plain the trainer wants back (epoch, RNG, ...)

The model's state also holds ``dlsn_config`` (``CONFIG_KEY``), its config as UTF-8 JSON bytes in a uint8
tensor, so that a loader that keeps only the weights (spandrel unwraps ``"model"``) still knows the
network; :func:`load_checkpoint` takes it out again.

``model.safetensors`` (:func:`save_safetensors`) holds the weights for inference only: the tensors, the same
``dlsn_config`` tensor, and string metadata ``{"format": "dlsn-safetensors", "config": JSON, "arch", "scale",
"preset"}``. :func:`load_checkpoint` reads it, a ``.pt``/``.pth`` of ours, and bare state dicts in either
container (recognised by their first bytes, not by their names).

Files are written atomically: a temporary file in the same folder, flushed and fsync'ed, then
renamed over the target, so a crash mid-write leaves the previous checkpoint intact.

The authors' checkpoints are bare ``state_dict``s of their DLSN, loaded here too: their architecture
is read off the tensor shapes (``dlsn.models.official``); their unused scalar ``a`` is dropped. The NLSN
authors' bare state dicts (HarukiYqM/Non-Local-Sparse-Attention) load too, recognised by their key layout
(``dlsn.models.nlsn.infer_nlsn_config``); the weights cannot tell chunk_size, n_hashes or res_scale, so their
README run's 144, 4 and 0.1 are assumed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dlsn.atomic_files import write_atomically
from dlsn.errors import CheckpointError, CheckpointNotFoundError, one_line

from .nlsn import infer_nlsn_config
from .official import OFFICIAL_UNUSED_KEYS, infer_official_config
from .presets import model_from_config

__all__ = [
    "CONFIG_KEY",
    "FORMAT",
    "SAFETENSORS_FORMAT",
    "VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "check_weights",
    "from_state_dict",
    "infer_official_config",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "restore",
    "resume",
    "save_checkpoint",
    "save_safetensors",
]

FORMAT = "dlsn-checkpoint"
VERSION = 1
SAFETENSORS_FORMAT = "dlsn-safetensors"
CONFIG_KEY = "dlsn_config"

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Saving.


_PLAIN_LEAVES = (
    str,
    bytes,
    int,
    float,
    bool,
    complex,
    type(None),
    Tensor,
    torch.dtype,
    torch.device,
    torch.Size,
)


def _check_plain(value: Any, where: str) -> None:
    """Refuses anything ``torch.load(weights_only=True)`` would not load back."""
    if isinstance(value, _PLAIN_LEAVES):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain containers "
        "(dict, list, tuple, str, numbers, None) so that they load with weights_only=True"
    )


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    # torch.compile wraps the module as ``_orig_mod``, DataParallel/DDP as ``module``.
    state = _strip_prefix(model.state_dict(), "_orig_mod.")
    return _strip_prefix(state, "module.")


def config_tensor(config: Mapping[str, Any]) -> Tensor:
    """``config`` as UTF-8 JSON bytes in a uint8 tensor (the ``dlsn_config`` entry of a state dict)."""
    data = json.dumps(dict(config), sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def config_from_tensor(value: Tensor) -> dict[str, Any]:
    """The config a :func:`config_tensor` holds; :class:`CheckpointError` when it is not one."""
    try:
        config = json.loads(bytes(value.cpu().to(torch.uint8).tolist()).decode())
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"its {CONFIG_KEY} entry is not a JSON config ({error})") from error
    if not isinstance(config, dict) or "arch" not in config:
        raise CheckpointError(f"its {CONFIG_KEY} entry is not a network config: {config!r}")
    return config


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written ``path``."""
    return write_atomically(Path(path), lambda handle: torch.save(obj, handle), durable=True)


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes ``model`` (and optionally the optimizer/scheduler states) to ``path`` atomically.

    ``config`` defaults to ``model.config``; it must rebuild the model with
    ``presets.model_from_config``. ``extra`` holds anything plain to get back on resume.
    Returns the path written.
    """
    if config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("config is required for a model without a .config property")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(config),
        "model": {**_model_state(model), CONFIG_KEY: config_tensor(config)},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": step,
        "extra": {} if extra is None else dict(extra),
    }
    for key in ("config", "optimizer", "scheduler", "extra"):
        _check_plain(checkpoint[key], key)
    return atomic_torch_save(checkpoint, path)


def save_safetensors(
    path: PathLike,
    state: nn.Module | Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
) -> Path:
    """Writes inference weights to ``path`` in the safetensors format, atomically (see the module docstring).

    ``state``: a model (its config is the default ``config``) or a state dict. The tensors are stored in
    float32 on the CPU, each with its own memory (safetensors refuses shared storage).
    """
    from safetensors.torch import save

    if isinstance(state, nn.Module):
        config = getattr(state, "config", None) if config is None else config
        state = _model_state(state)
    if config is None:
        raise ValueError("config is required for a state dict")
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
               for k, v in state.items() if k != CONFIG_KEY}
    tensors[CONFIG_KEY] = config_tensor(config)
    metadata = {"format": SAFETENSORS_FORMAT, "version": str(VERSION), "config": json.dumps(dict(config)),
                "arch": str(config.get("arch")), "scale": str(config.get("scale"))}
    if preset is not None:
        metadata["preset"] = preset
    data = save(tensors, metadata=metadata)
    return write_atomically(Path(path), lambda handle: handle.write(data), durable=True)


# ----------------------------------------------------------------------------------------------
# Loading.


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= path.stat().st_size - 8


def _read_safetensors(path: Path, map_location: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    device = map_location if isinstance(map_location, str) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # the reader's errors for damaged files are of several types
        raise CheckpointError(f"{path} is not a readable safetensors file: {_first_line(error)}") from error
    if isinstance(map_location, torch.device):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, metadata


# What torch.save files start with: a zip archive (torch >= 1.6) or a pickle (the legacy format,
# protocol 2 and up start with 0x80). Anything else is not a checkpoint, and is refused before torch
# tries to unpickle it (a text file fails there with an IndexError or KeyError of no meaning).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def _looks_like_torch_file(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def _unsupported_global(error: BaseException) -> str | None:
    """The class or function a weights_only load refused, from torch's (long) message: "Unsupported global:
    GLOBAL os.system" (torch < 2.14) or "Trying to load unsupported GLOBAL posix.system whose module posix is
    blocked" (torch 2.14)."""
    match = re.search(r"unsupported\s+(?:global|class)[:\s]*(?:GLOBAL\s+)?([\w.]+)", str(error), re.IGNORECASE)
    return match.group(1) if match else None


def _torch_load(path: Path, map_location: Any) -> Any:
    not_readable = f"{path} is not a readable checkpoint (not written by torch.save, or corrupt or truncated)"
    if not _looks_like_torch_file(path):
        raise CheckpointError(not_readable)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # "Unsupported global": a class or function in the pickle; anything else is damage.
        name = _unsupported_global(error)
        if name is not None:
            raise CheckpointError(
                f"{path} holds Python objects ({name}), which "
                f"are not unpickled because that could run code; if you trust the file, load it with "
                f"torch.load(weights_only=False) yourself and torch.save its state_dict()"
            ) from error
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        reason = detail.group(1).splitlines()[0] if detail else _first_line(error)
        raise CheckpointError(f"{not_readable}: {reason}") from error
    except Exception as error:
        # Whatever torch's unpickler trips over in a damaged file (EOFError, RuntimeError from the
        # zip reader, IndexError, KeyError, ...) means the same thing to the user.
        raise CheckpointError(f"{not_readable}: {type(error).__name__}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    """The first sentence of the error's message (torch's run on for several more)."""
    text = one_line(error)
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= 200 else sentence[:197] + "..."


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def from_state_dict(state: Mapping[str, Tensor], source: str = "bare state_dict") -> dict[str, Any]:
    """A bare state dict in our checkpoint format: its config from its ``dlsn_config`` entry, else inferred
    from its shapes (the authors' DLSN); :class:`CheckpointError` when it is neither."""
    state = _strip_prefix(_strip_prefix(state, "_orig_mod."), "module.")
    if CONFIG_KEY in state:  # written here: the config travels with the weights
        config = config_from_tensor(state[CONFIG_KEY])
        how = "config stored with the weights"
    elif any(k.endswith(".conv_assembly_fc.0.weight") for k in state) or "body.0.conv_match.0.weight" not in state:
        config = infer_official_config(state)
        how = "architecture inferred from shapes"
    else:  # the authors' NLSN: NLSA at body.0; chunk_size 144, n_hashes 4, res_scale 0.1 assumed (their README)
        config = infer_nlsn_config(state)
        how = "NLSN architecture inferred from shapes; chunk_size, n_hashes, res_scale assumed 144, 4, 0.1"
    weights = {k: v for k, v in state.items() if k not in OFFICIAL_UNUSED_KEYS and k != CONFIG_KEY}
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "model": weights,
        "optimizer": None,
        "scheduler": None,
        "step": 0,
        "extra": {"source": f"{source} ({how})"},
    }


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint into our format (see the module docstring).

    An authors' bare state dict comes back in the same format: config inferred from its shapes,
    ``a`` dropped, no optimizer, step 0. Raises :class:`CheckpointNotFoundError` (a
    FileNotFoundError) for a missing file and :class:`CheckpointError` for anything unreadable or
    unrecognised; both are :class:`~dlsn.errors.UserInputError`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if _looks_like_safetensors(path):
        tensors, metadata = _read_safetensors(path, map_location)
        if not tensors:
            raise CheckpointError(f"{path} is a safetensors file without tensors")
        try:
            checkpoint = from_state_dict(tensors, "safetensors")
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from error
        if "preset" in metadata:
            checkpoint["extra"]["preset"] = metadata["preset"]
        return checkpoint
    obj = _torch_load(path, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise CheckpointError(
                f"{path} has checkpoint version {obj.get('version')!r}; this code reads {VERSION}"
            )
        missing = [k for k in ("config", "model") if not isinstance(obj.get(k), Mapping)]
        if missing:
            raise CheckpointError(f"{path} is a damaged dlsn checkpoint: no {', '.join(missing)}")
        checkpoint = dict(obj)
        checkpoint["model"] = {k: v for k, v in obj["model"].items() if k != CONFIG_KEY}
        return checkpoint
    # Common wrappers of bare state dicts in SR code bases.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            obj = obj[key]
            break
    if _is_state_dict(obj):
        try:
            return from_state_dict(obj)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from error
    raise CheckpointError(
        f"{path} is neither a dlsn checkpoint nor a DLSN state dict (found {type(obj).__name__})"
    )


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def check_weights(state: Mapping[str, Tensor], source: str = "state dict",
                  expected: Mapping[str, Tensor] | None = None) -> None:
    """Refuses weights no network should run with, as one-line :class:`CheckpointError`: a NaN or inf
    value (a diverged training: the network would write black images), or an integer or bool tensor where
    ``expected`` (the model's state) holds a floating one. One pass over the tensors, no copy."""
    wrong_type = [f"{k} ({v.dtype})" for k, v in state.items() if expected is not None and k in expected
                  and expected[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if wrong_type:
        raise CheckpointError(f"{source} holds integer weights where the network has floating ones: "
                              f"{_listing(wrong_type, 4)}")
    floating = [(k, v) for k, v in state.items() if v.is_floating_point() and v.device.type != "meta"]
    if not floating:
        return
    finite = torch.stack([v.isfinite().all() for _, v in floating]).cpu()
    if not bool(finite.all()):
        bad = [k for (k, _), ok in zip(floating, finite.tolist()) if not ok]
        raise CheckpointError(f"{source} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                              f"{_listing(bad, 4)}; it is the state of a diverged training, not a model to use")


def load_weights(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    strict: bool = True,
    source: str = "state dict",
    assign: bool = False,
) -> list[str]:
    """Copies ``state`` into ``model``.

    ``strict``: every name and shape must match, else :class:`CheckpointError` lists the missing,
    unexpected and mis-shaped entries. Not strict: the entries that match are loaded and the names
    left out are returned (e.g. the tail when starting x3 training from x2 weights).
    ``assign``: use the state's tensors as the parameters (no copy; for a model built on "meta").
    Weights holding NaN or inf, or integers where the model has floats, are refused (:func:`check_weights`).
    """
    state = _strip_prefix(_strip_prefix(state, "_orig_mod."), "module.")
    state = {k: v for k, v in state.items() if k not in OFFICIAL_UNUSED_KEYS and k != CONFIG_KEY}
    expected = model.state_dict()
    check_weights({k: v for k, v in state.items() if k in expected}, source, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if strict and (missing or unexpected or mis_shaped):
        arch = getattr(model, "config", type(model).__name__)
        lines = [f"{source} does not fit the model {arch}:"]
        if missing:
            lines.append(f"  missing keys: {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_listing(unexpected)}")
        if mis_shaped:
            lines.append(f"  shape mismatches (file vs model): {_listing(mis_shaped, 4)}")
        raise CheckpointError("\n".join(lines))
    skipped = set(unexpected) | {s.split(" ", 1)[0] for s in mis_shaped}
    loadable = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict(loadable, strict=strict, assign=assign)
    return sorted(missing + sorted(skipped))


def load_model(
    path: PathLike,
    map_location: Any = "cpu",
    *,
    scale: int | None = None,
    backend: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the model a checkpoint describes and loads its weights: ``(model, config)``.

    Works for our checkpoints (``.pt``, ``model.safetensors``) and the authors' bare state dicts (in a
    torch file or a safetensors file). The model is on
    ``map_location`` and in eval mode. ``scale``: raise :class:`CheckpointError` unless the file
    holds a model of this scale. ``backend``: kernel backend of its GLA blocks. A config no network
    should be built from (``dlsn.models.presets.check_config``: sizes that are not positive or absurdly
    large, ``rgb_range`` <= 0) and non-finite or integer weights are refused as :class:`CheckpointError`.
    """
    checkpoint = load_checkpoint(path, map_location)
    config = dict(checkpoint["config"])
    if scale is not None and config.get("scale") != scale:
        raise CheckpointError(f"{path} holds a x{config.get('scale')} model, but x{scale} was asked for")
    try:
        # Built without memory and filled with the file's tensors: no random init of 70M weights.
        with torch.device("meta"):
            model = model_from_config(config, backend=backend)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has a config this code cannot build ({error}): {config}") from error
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    load_weights(model, state, source=str(path), assign=True)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model.eval(), config


def resume(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Restores a training run from ``path``: :func:`load_checkpoint`, then :func:`restore`.

    Returns the checkpoint dict (``step``, ``extra``, ...).
    """
    checkpoint = load_checkpoint(path, map_location)
    restore(checkpoint, model, optimizer, scheduler, source=str(path))
    return checkpoint


def restore(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    source: str = "checkpoint",
) -> None:
    """Puts a loaded checkpoint back: weights into ``model``, states into ``optimizer``/``scheduler``.

    For a checkpoint already read with :func:`load_checkpoint` (read once: the file may be replaced
    by a newer save in between). The checkpoint's config must equal ``model.config`` (else
    :class:`CheckpointError` names the settings that differ). Optimizer state tensors follow the
    parameters' device.
    """
    model_config = getattr(model, "config", None)
    if model_config is not None and dict(checkpoint["config"]) != dict(model_config):
        keys = sorted(set(checkpoint["config"]) | set(model_config))
        differ = {
            k: (checkpoint["config"].get(k), model_config.get(k))
            for k in keys
            if checkpoint["config"].get(k) != model_config.get(k)
        }
        raise CheckpointError(
            f"{source} is a checkpoint of another architecture; (file, model) differ in {differ}"
        )
    load_weights(model, checkpoint["model"], source=source)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if checkpoint.get(name) is None:
            raise CheckpointError(f"{source} holds no {name} state to resume from")
        try:
            target.load_state_dict(checkpoint[name])
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"{source}: its {name} state does not fit this run ({error})") from error
