"""The precision of CPU training: bfloat16 autocast where the CPU has bfloat16 instructions (mocked here, so
the tests run on any CPU), float32 with ``--no-amp`` or without them; validation in ``dlsn.eval``'s default."""

from __future__ import annotations

import pytest
import torch

from dlsn.models import precision
from dlsn.models.checkpoint import load_checkpoint
from dlsn.training import trainer as trainer_module
from tests.test_train import TINY, hr_folder, run  # noqa: F401 (hr_folder: the fixture)


@pytest.fixture
def forward_calls(monkeypatch) -> list[tuple[bool, bool, str]]:
    """(grad enabled, cpu autocast in bfloat16, the network's compute_dtype) at every forward of the network."""
    calls: list[tuple[bool, bool, str]] = []
    build = trainer_module.model_from_config

    def record(module, _inputs) -> None:
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        calls.append((torch.is_grad_enabled(), bf16, module.compute_dtype))

    def build_and_watch(*args, **kwargs):
        net = build(*args, **kwargs)
        net.register_forward_pre_hook(record)
        return net

    monkeypatch.setattr(trainer_module, "model_from_config", build_and_watch)
    return calls


@pytest.mark.parametrize(("fast_bf16", "no_amp", "want"), [(True, False, "bfloat16"), (True, True, "float32"),
                                                            (False, False, "float32")])
def test_cpu_training_precision(hr_folder, tmp_path, capsys, monkeypatch, forward_calls,  # noqa: F811
                                fast_bf16, no_amp, want):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    out = tmp_path / "run"
    args = ["--data", hr_folder, "--max-steps", 2, "--val-every", 1, "--out", out, "--device", "cpu", *TINY]
    code, printed = run([*args, "--no-amp"] if no_amp else args, capsys)
    assert code == 0
    opening = printed.splitlines()[0]
    assert ("training in bfloat16 autocast" in opening) == (want == "bfloat16"), opening
    assert ("training in float32" in opening) == (want == "float32"), opening
    assert f"(epoch 0, {want}) in" in printed  # the final report
    last = load_checkpoint(out / "last.pt")
    assert last["extra"]["precision"] == want
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())
    training = [c for c in forward_calls if c[0]]
    validation = [c for c in forward_calls if not c[0]]
    assert len(training) == 2 and len(validation) >= 2
    # The steps run in the trainer's precision, with the network's own dtype left at float32 ...
    assert all(bf16 == (want == "bfloat16") and dtype == "float32" for _, bf16, dtype in training)
    # ... and validation in eval's default: bfloat16 on a CPU with bfloat16 instructions, whatever --no-amp says.
    assert all(dtype == ("bfloat16" if fast_bf16 else "float32") for _, _, dtype in validation), validation


def test_training_precision_per_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert trainer_module.training_precision(torch.device("cpu")) == "bfloat16"
    assert trainer_module.training_precision(torch.device("cuda")) == "bfloat16"
    assert trainer_module.training_precision(torch.device("cuda"), no_amp=True) == "float32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert trainer_module.training_precision(torch.device("cpu")) == "float32"
    assert trainer_module.training_precision(torch.device("cuda")) == "bfloat16"
