"""``--ema``: the moving average of the weights, in checkpoints, kept by exact resume, used for best.pt."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from dlsn.models.checkpoint import load_checkpoint, load_model
from dlsn.models.presets import PRESETS
from dlsn.training import settings as settings_module
from dlsn.training.ema import EMA, check_decay
from tests.test_train import TINY, hr_folder, run  # noqa: F401 (hr_folder is a fixture)


def test_average_follows_the_formula_with_its_warm_up():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.9)
    start = net.weight.detach().clone()
    expected = start.clone()
    for n in range(5):
        with torch.no_grad():
            net.weight.add_(1.0)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * net.weight.detach()
        ema.update(net)
    torch.testing.assert_close(ema.model.weight, expected)
    assert not ema.model.weight.requires_grad and not ema.model.training
    clone = EMA(net, 0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.decay == 0.9 and clone.updates == 5
    torch.testing.assert_close(clone.model.weight, ema.model.weight)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            check_decay(bad)


def test_preset_defaults():
    # long paper runs average as BasicSR does; the short CPU recipe runs without
    assert PRESETS["paper"].training.ema == 0.999 and PRESETS["small"].training.ema == 0.999
    assert PRESETS["cpu_default"].training.ema == 0.0 and PRESETS["tiny"].training.ema == 0.0
    parser = __import__("dlsn.train", fromlist=["_parser"])._parser()
    with pytest.raises(settings_module.TrainError, match=r"--ema must lie in \[0, 1\)"):
        settings_module.resolve_settings(parser.parse_args(["--ema", "1.5"]), None)


def test_ema_run_saves_it_resumes_it_exactly_and_best_pt_holds_it(hr_folder, tmp_path, capsys):  # noqa: F811
    common = ["--data", hr_folder, "--val-every", 2, "--ema", 0.9, "--lr", 1e-3, "--schedule", "step",
              "--epoch-steps", 2, "--decay-epochs", 1, *TINY]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run([*common, "--max-steps", 4, "--out", whole], capsys)[0] == 0
    assert run([*common, "--max-steps", 2, "--out", split], capsys)[0] == 0
    code, printed = run(["--resume", "--out", split, "--max-steps", 4, "--no-progress"], capsys)
    assert code == 0 and "EMA" in printed
    reference, resumed = load_checkpoint(whole / "last.pt"), load_checkpoint(split / "last.pt")
    assert resumed["extra"]["ema"]["updates"] == 4 and resumed["extra"]["settings"]["ema"] == 0.9
    for name, value in reference["extra"]["ema"]["weights"].items():
        torch.testing.assert_close(resumed["extra"]["ema"]["weights"][name], value, rtol=1e-4, atol=1e-5)
    # best.pt and model.safetensors hold the average, not the live weights
    best = load_checkpoint(whole / "best.pt")
    ema_at_best = reference["extra"]["ema"]["weights"] if best["step"] == 4 else None
    live = reference["model"]
    differs = any(not torch.equal(best["model"][k], live[k]) for k in live if live[k].is_floating_point())
    assert differs
    if ema_at_best is not None:
        for name, value in ema_at_best.items():
            torch.testing.assert_close(best["model"][name], value)
    with safe_open(str(whole / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["preset"] == "tiny"
        for name in handle.keys():  # noqa: SIM118
            if name in best["model"]:
                torch.testing.assert_close(handle.get_tensor(name), best["model"][name])
    assert load_model(whole / "model.safetensors")[1] == load_model(whole / "best.pt")[1]
