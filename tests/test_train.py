"""Tests of ``python -m dlsn.train``: outputs, resume, interruption, bad input, torchrun, and its parts.

Runs use the ``tiny`` preset on a folder of five small crops of the embedded photos (two held out),
2-4 LR patches of 16x16 per step, so a run takes a few seconds on a busy 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlsn import train as cli
from dlsn import training as T
from dlsn.data import samples
from dlsn.data.degradations import degrade, quantize_8bit
from dlsn.images import read_image, tensor_to_uint8, uint8_to_tensor, write_image
from dlsn.models.checkpoint import load_checkpoint, load_model
from dlsn.models.presets import PRESETS
from dlsn.training import trainer as trainer_module
from tests.helpers import assert_each_default_once

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch-size", "2", "--patch-size", "16", "--val-crop", "48", "--no-progress"]


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory) -> Path:
    """Five 72x64 HR crops of different photos; the last two (by name) are held out."""
    folder = tmp_path_factory.mktemp("hr")
    for i, name in enumerate(("astronaut", "chelsea", "motorcycle_left", "coffee", "ihc")):
        image = samples.load_sample(name)
        write_image(folder / f"img{i}.png", image[100:164, 120:192].copy())
    return folder


def run(args: list[str], capsys=None) -> tuple[int, str]:
    """``main(args)`` in this process: (exit code, stdout)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr().out if capsys is not None else ""
    return code, out


def log_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# --------------------------------------------------------------------------------------------------
# Whole runs


def test_tiny_run_writes_checkpoints_log_plot_and_samples(hr_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", hr_folder, "--max-steps", 4, "--val-every", 2, "--out", out, *TINY]
    code, printed = run(args, capsys)
    assert code == 0
    for name in ("last.pt", "best.pt", "log.csv", "curves.png", "sample_img3_x2_sr.png",
                 "sample_img3_x2_bicubic.png", "sample_img3_x2_hr.png"):
        assert (out / name).is_file(), name
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 4 and last["optimizer"] is not None and last["scheduler"] is not None
    assert last["extra"]["settings"]["preset"] == "tiny"
    best = load_checkpoint(out / "best.pt")
    assert best["optimizer"] is None and best["step"] in (2, 4)
    assert best["extra"]["best_psnr"] == pytest.approx(last["extra"]["best_psnr"])
    # The checkpoint is a usable model for dlsn.eval / dlsn.upscale.
    model, config = load_model(out / "best.pt")
    assert config["arch"] == "dlsn" and model(torch.rand(1, 3, 8, 8) * 255).shape == (1, 3, 16, 16)

    rows = log_rows(out)
    assert [c for c in rows[0]] == list(T.LOG_COLUMNS)
    val_steps = [int(r["step"]) for r in rows if r["val_psnr"]]
    assert val_steps == [2, 4]
    assert all(math.isfinite(float(r["val_psnr"])) for r in rows if r["val_psnr"])
    assert "bicubic" in printed and "held-out Y-PSNR" in printed and str(out / "last.pt") in printed
    assert "img3" in printed and "img4" in printed  # the held-out images are scored
    trained = next(line for line in printed.splitlines() if line.startswith("trained 4 steps"))
    rate = float(trained.split(" min, ")[1].removesuffix(" steps/s"))  # the speed, to compare machines by
    assert rate > 0


def test_resume_continues_exactly_where_the_run_stopped(hr_folder, tmp_path, capsys):
    # The lr changes at almost every step (warm-up, then halved every epoch of a few steps): the weights
    # after 3 + 3 steps equal those after 6 only if the resumed run used the same lr at every step.
    common = ["--data", hr_folder, "--schedule", "step", "--epoch-steps", 2, "--decay-epochs", 1,
              "--warmup-steps", 2, "--lr", "1e-3", *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run([*common, "--max-steps", 6, "--out", straight], capsys)[0] == 0
    assert run([*common, "--max-steps", 3, "--out", split], capsys)[0] == 0
    code, printed = run(["--resume", "--out", split, "--max-steps", 6, "--no-progress"], capsys)
    assert code == 0
    assert "resumed at step 3" in printed
    resumed = load_checkpoint(split / "last.pt")
    assert resumed["step"] == 6
    assert resumed["extra"]["settings"]["lr"] == 1e-3  # settings come from the resumed run
    # Same data order, RNG, optimizer state, lr schedule: the same weights as the uninterrupted run.
    reference = load_checkpoint(straight / "last.pt")
    assert resumed["scheduler"] == reference["scheduler"]
    decay_steps = reference["scheduler"]["decay_steps"]
    assert decay_steps < 6  # the lr halved during the run
    assert resumed["scheduler"]["last_lr"] == pytest.approx(1e-3 * 0.5 ** (6 // decay_steps))
    for name, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    loss_steps = [int(r["step"]) for r in log_rows(split) if r["loss"]]
    assert loss_steps == sorted(loss_steps) and loss_steps[-1] == 6


def test_an_existing_run_is_not_overwritten_without_resume(hr_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--data", hr_folder, "--max-steps", 1, "--out", out, *TINY], capsys)[0] == 0
    code, _ = run(["--data", hr_folder, "--max-steps", 1, "--out", out, *TINY])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(T.TrainError, match="already holds a run"):
        T.run_folder(out, "tiny", 2, resuming=False, overwrite=False)
    assert T.run_folder(out, "tiny", 2, resuming=False, overwrite=True) == out


def test_interrupted_run_saves_last_and_resumes(hr_folder, tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dlsn.train", "--data", str(hr_folder), "--max-steps", "100000",
               "--val-every", "0", "--save-every", "0", "--out", str(out), *TINY]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        # Wait until at least 10 steps are logged (a log row every 10 steps), then press Ctrl-C.
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "log.csv").exists() and any(r["loss"] for r in log_rows(out)):
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        assert not (out / "last.pt").exists()  # --save-every 0: only the interruption writes it
        process.send_signal(signal.SIGINT)
        printed, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, printed
    assert "stopped by SIGINT" in printed
    saved = load_checkpoint(out / "last.pt")
    stopped_at = saved["step"]
    assert stopped_at >= 10

    code, printed = run(["--resume", out / "last.pt", "--max-steps", stopped_at + 2, "--no-progress"], capsys)
    assert code == 0
    assert f"resumed at step {stopped_at}" in printed
    assert load_checkpoint(out / "last.pt")["step"] == stopped_at + 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "--data folder not found"),
        (lambda root: root, "no images found"),
        (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "must be a folder"),
    ],
    ids=["missing", "empty", "file"],
)
def test_bad_data_folder_is_a_clear_error(tmp_path, capsys, make, message):
    data = make(tmp_path)
    code, _ = run(["--data", data, "--max-steps", 1, "--out", tmp_path / "out", *TINY])
    assert code == 2
    assert message in capsys.readouterr().err


def test_folder_with_too_few_images_is_a_clear_error(tmp_path, capsys):
    write_image(tmp_path / "only.png", samples.load_sample("astronaut")[:64, :64].copy())
    code, _ = run(["--data", tmp_path, "--max-steps", 1, "--out", tmp_path / "out", *TINY])
    assert code == 2
    assert "need more than the 1 held out" in capsys.readouterr().err


def test_time_limit_stops_the_run(hr_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed = run(["--data", hr_folder, "--time-limit", "0.01", "--out", out, *TINY], capsys)
    assert code == 0
    assert "budget: 0.01 min" in printed and "held-out Y-PSNR" in printed
    # 0.6 s: it stops before a step would overrun (a step of this size takes well under a second).
    steps = load_checkpoint(out / "last.pt")["step"]
    trained = [float(r["elapsed"]) for r in log_rows(out) if r["loss"]]
    assert steps < 1000 and (not trained or trained[-1] < 0.6 + 2.0)


def test_init_from_x2_weights_for_x3(hr_folder, tmp_path, capsys):
    x2 = tmp_path / "x2"
    assert run(["--data", hr_folder, "--max-steps", 1, "--out", x2, *TINY], capsys)[0] == 0
    code, printed = run(["--data", hr_folder, "--scale", 3, "--init-from", x2 / "last.pt", "--max-steps", 1,
                         "--out", tmp_path / "x3", *TINY], capsys)
    assert code == 0
    assert "keep their fresh init (tail.0.0.bias, tail.0.0.weight)" in printed
    x3 = load_checkpoint(tmp_path / "x3" / "last.pt")
    assert x3["config"]["scale"] == 3

    # A resumed run continues its own network: another scale, network setting or --init-from is one line.
    resume = ["--resume", tmp_path / "x3" / "last.pt", "--max-steps", 2, "--no-progress"]
    path = tmp_path / "x3" / "last.pt"
    for extra, message in (
        (["--preset", "tiny", "--scale", 2], f"--resume: {path} is an x3 run; it cannot continue at --scale 2 "
                                             f"(to train x2 from its weights, start a new run with --init-from "),
        (["--model-arg", "n_feats=8"], f"--resume: {path} holds a network with n_feats="),
        (["--model-arg", "colour=1"], f"--resume: {path} holds a network with no such settings"),
        (["--init-from", tmp_path / "elsewhere.pt"], "--resume: a resumed run continues from its own weights"),
        (["--preset", "cnn"], f"--resume: {path} is a 'tiny' run; it cannot continue as --preset cnn"),
    ):
        code, _ = run([*resume, *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"dlsn.train: error: {message}") and err.count("\n") == 1, err
    assert load_checkpoint(path)["step"] == 1
    # The run's own command repeated with --resume fits.
    code, printed = run([*resume, "--scale", 3, "--init-from", x2 / "last.pt", "--preset", "tiny"], capsys)
    assert code == 0 and "resumed at step 1" in printed and load_checkpoint(path)["step"] == 2


def test_div2k_layout_trains_on_stored_pairs_and_validates_on_valid(hr_folder, tmp_path, capsys):
    root = tmp_path / "DIV2K"
    for split, names in (("train", ["0001", "0002", "0003"]), ("valid", ["0801", "0802"])):
        for name, source in zip(names, sorted(hr_folder.iterdir()), strict=False):
            hr = read_image(source)
            write_image(root / f"DIV2K_{split}_HR" / f"{name}.png", hr)
            lr = tensor_to_uint8(quantize_8bit(degrade(uint8_to_tensor(hr), 2, "BI")))
            write_image(root / f"DIV2K_{split}_LR_bicubic" / "X2" / f"{name}x2.png", lr)
    out = tmp_path / "run"
    code, printed = run(["--data", root, "--max-steps", 2, "--out", out, *TINY], capsys)
    assert code == 0
    assert "DIV2K at" in printed and "validation on 2 of DIV2K_valid" in printed
    assert "0801" in printed and "0802" in printed
    assert load_checkpoint(out / "last.pt")["step"] == 2
    # An unreadable stored LR image: the other pairs train, it is listed, and the run exits with 1.
    (root / "DIV2K_train_LR_bicubic" / "X2" / "0002x2.png").write_bytes(b"not a png")
    code, _ = run(["--data", root, "--max-steps", 1, "--out", tmp_path / "run2", *TINY])
    printed, err = capsys.readouterr()
    assert code == 1 and "DIV2K at" in printed and "2 training images" in printed
    listed = "dlsn.train: failed: 1 of 5 images: X2/0002x2.png (cannot read image"
    failures = [line for line in err.splitlines() if line.startswith(listed)]
    assert len(failures) == 2, err


def test_two_process_torchrun_on_cpu(hr_folder, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "dlsn.train", "--data", str(hr_folder), "--max-steps", "3", "--val-every", "2",
               "--out", str(out), *TINY]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    assert result.stdout.count("held-out Y-PSNR") == 1  # only rank 0 prints
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == 3 and saved["extra"]["world_size"] == 2
    assert (out / "best.pt").is_file() and (out / "curves.png").is_file()


# --------------------------------------------------------------------------------------------------
# Parts


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_schedule_halves_every_decay_steps_after_warmup():
    schedule = T.LRSchedule(_optimizer(), "step", 1e-4, warmup_steps=2, decay_steps=10)
    assert schedule.apply(0, 0.0) == pytest.approx(0.5e-4)  # warm-up
    assert schedule.apply(9, 0.0) == pytest.approx(1e-4)
    assert schedule.apply(10, 0.0) == pytest.approx(0.5e-4)
    assert schedule.apply(25, 0.0) == pytest.approx(0.25e-4)
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-4)


def test_cosine_schedule_follows_the_budget():
    schedule = T.LRSchedule(_optimizer(), "cosine", 2e-3)
    assert schedule.apply(5, 0.0) == pytest.approx(2e-3)
    assert schedule.apply(5, 0.5) == pytest.approx(2e-3 * (T.COSINE_FLOOR + (1 - T.COSINE_FLOOR) / 2))
    assert schedule.apply(5, 1.0) == pytest.approx(2e-3 * T.COSINE_FLOOR)
    assert schedule.apply(5, 3.0) == pytest.approx(2e-3 * T.COSINE_FLOOR)
    restored = T.LRSchedule(_optimizer(), "constant", 1.0)
    restored.load_state_dict(schedule.state_dict())
    assert restored.kind == "cosine" and restored.last_lr == pytest.approx(schedule.last_lr)


def test_epoch_sampler_splits_an_epoch_between_processes_and_skips():
    parts = []
    for rank in range(3):
        sampler = T.EpochSampler(10, seed=1, procs=T.Processes(rank=rank, world=3))
        sampler.set_epoch(4)
        parts.append(list(sampler))
        assert len(parts[-1]) == len(sampler) == 4
    assert set(sum(parts, [])) == set(range(10))  # 12 slots: every index, two repeated
    again = T.EpochSampler(10, seed=1, procs=T.Processes(rank=1, world=3))
    again.set_epoch(4, skip=3)
    assert list(again) == parts[1][3:] and len(again) == 1
    again.set_epoch(5)
    assert list(again) != parts[1]


def test_settings_follow_the_preset_and_the_paper_schedule():
    parse = cli._parser().parse_args
    cpu = T.resolve_settings(parse([]), None)
    assert (cpu.preset, cpu.scale, cpu.schedule, cpu.max_steps) == ("cpu_default", 2, "cosine", None)
    assert cpu.time_limit is not None and cpu.time_limit < 10
    assert T.resolve_settings(parse(["--max-steps", "5"]), None).time_limit is None
    paper = T.resolve_settings(parse(["--preset", "paper"]), None)
    assert (paper.lr, paper.batch_size, paper.patch_size, paper.schedule) == (1e-4, 16, 48, "step")
    assert (paper.decay_epochs, paper.max_steps, paper.time_limit) == (300, 1500 * 1000, None)
    x3 = T.resolve_settings(parse(["--preset", "paper", "--scale", "3", "--init-from", "x2.pt"]), None)
    assert (x3.decay_epochs, x3.max_steps) == (50, 200 * 1000)
    resumed = T.resolve_settings(parse(["--batch-size", "3"]), {"preset": "tiny", "lr": 5e-4, "max_steps": 9,
                                                                "time_limit": None, "batch_size": 7})
    assert (resumed.preset, resumed.lr, resumed.max_steps, resumed.batch_size) == ("tiny", 5e-4, 9, 3)
    with pytest.raises(ValueError, match="--patch-size"):
        T.resolve_settings(parse(["--patch-size", "0"]), None)
    assert T.parse_model_args(["chunk_size=64", "n_hashes = 2"]) == {"chunk_size": 64, "n_hashes": 2}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        T.parse_model_args(["chunk_size"])
    assert isinstance(parse([]), argparse.Namespace)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_with_its_own_recipe(preset):
    recipe = PRESETS[preset].training
    settings = T.resolve_settings(cli._parser().parse_args(["--preset", preset]), None)
    assert (settings.lr, settings.batch_size, settings.patch_size, settings.schedule, settings.epoch_steps) == (
        recipe.lr, recipe.batch_size, recipe.patch_size, recipe.schedule, recipe.epoch_steps)
    assert (settings.warmup_steps, settings.min_detail, settings.pyramid) == (
        recipe.warmup_steps, recipe.min_detail, recipe.pyramid)


def test_a_resumed_run_of_an_unknown_preset_is_a_one_line_error():
    with pytest.raises(T.TrainError, match="--preset must be one of .*got 'retired'"):
        T.resolve_settings(cli._parser().parse_args([]), {"preset": "retired"})


def test_pyramid_setting_defaults_switches_off_and_is_checked():
    parse = cli._parser().parse_args
    assert T.resolve_settings(parse([]), None).pyramid == (0.75, 0.5, 0.35)
    assert T.resolve_settings(parse(["--preset", "paper"]), None).pyramid == ()
    assert T.resolve_settings(parse(["--pyramid"]), None).pyramid == ()
    assert T.resolve_settings(parse(["--pyramid", "0.6"]), None).pyramid == (0.6,)
    # a run saved before the setting existed resumes without a pyramid; a saved one is kept
    assert T.resolve_settings(parse([]), {"preset": "cpu_default"}).pyramid == ()
    assert T.resolve_settings(parse([]), {"preset": "cpu_default", "pyramid": [0.5]}).pyramid == (0.5,)
    with pytest.raises(ValueError, match="--pyramid"):
        T.resolve_settings(parse(["--pyramid", "1.5"]), None)


def test_detailed_patches_redraw_flat_patches():
    flat = {"lr": torch.zeros(3, 4, 4), "hr": torch.full((3, 8, 8), 0.5), "name": "flat"}
    edge = {"lr": torch.zeros(3, 4, 4), "hr": torch.zeros(3, 8, 8), "name": "edge"}
    edge["hr"][:, :, 4:] = 1.0
    draws = iter([flat, flat, edge, flat])

    class Source(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return next(draws)

    assert T.DetailedPatches.detail(edge["hr"]) > 10 and T.DetailedPatches.detail(flat["hr"]) == 0
    assert T.DetailedPatches(Source(), min_detail=2.0, tries=8)[0]["name"] == "edge"
    draws = iter([flat, flat])
    assert T.DetailedPatches(Source(), min_detail=2.0, tries=2)[0]["name"] == "flat"  # gives up


def test_thread_tuner_keeps_the_faster_thread_count_and_checks_again():
    before = torch.get_num_threads()
    try:
        tuner = T.ThreadTuner([2, 1], probe_steps=3, recheck_s=10.0)
        now, used = 0.0, []
        for step in range(400):
            # Two threads are slow while another process holds a core (steps < 100), then fast.
            slow = step < 100
            seconds = {2: 2.0 if slow else 0.1, 1: 0.2}[torch.get_num_threads()]
            now += seconds
            tuner.after_step(seconds, now)
            used.append(torch.get_num_threads())
        assert used[10:100].count(1) > 80  # one thread while two are slow
        assert used[-100:].count(2) > 90  # found again once two are fast
        assert tuner.best == 2 and tuner.interval > 10.0  # the choice stood: checks get rarer
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Resume keeps the lr schedule; kill -9 (even mid-save) leaves a last.pt to resume from


def test_resume_uses_the_saved_schedule_state_unless_given_anew(hr_folder, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", hr_folder, "--schedule", "step", "--epoch-steps", 2, "--decay-epochs", 1, *TINY]
    assert run([*common, "--max-steps", 2, "--val-every", 0, "--out", out], capsys)[0] == 0
    saved = load_checkpoint(out / "last.pt")
    # A run whose epochs were counted differently (another process count, images added since):
    # its schedule halves every 5 steps, which this setup would not derive.
    saved["scheduler"]["decay_steps"] = 5
    torch.save(saved, out / "last.pt")

    def resumed_trainer(*extra):
        args = cli._parser().parse_args(["--resume", str(out / "last.pt"), "--no-progress", *map(str, extra)])
        return T.Trainer(args, time.monotonic())

    trainer = resumed_trainer()
    assert trainer.schedule.state_dict() == saved["scheduler"]
    assert trainer.state.step == 2 and trainer.optimizer.state_dict()["state"]  # Adam's moments are back
    trainer.close()  # releases the folder's lock for the next one
    capsys.readouterr()
    rebuilt = resumed_trainer("--lr", "5e-4")
    assert rebuilt.schedule.base_lr == 5e-4 and rebuilt.schedule.decay_steps == rebuilt.steps_per_epoch
    assert "schedule: rebuilt from --lr given anew" in capsys.readouterr().out


def _kill_during_a_save_script(out: Path, marker: Path, hr_folder: Path) -> str:
    """A training run whose torch.save, from the third last.pt on, writes half the file and then waits
    to be killed: ``kill -9`` lands while a checkpoint is being written."""
    args = ["--data", str(hr_folder), "--max-steps", "1000", "--val-every", "0", "--save-every", "1",
            "--out", str(out), *TINY]
    return f"""
import io, sys, time, torch
real_save = torch.save
def half_then_hang(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("optimizer") is not None and obj["step"] >= 3:
        buffer = io.BytesIO()
        real_save(obj, buffer, *a, **k)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        open({str(marker)!r}, "w").write(str(obj["step"]))
        time.sleep(600)
    return real_save(obj, f, *a, **k)
torch.save = half_then_hang
from dlsn import train
sys.exit(train.main({args!r}))
"""


def test_kill_9_during_a_checkpoint_write_leaves_a_last_pt_that_resumes(hr_folder, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", _kill_during_a_save_script(out, marker, hr_folder)],
                               cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), process.stdout.read() if process.poll() is not None else "timed out"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    writing = int(marker.read_text())
    unfinished = list(out.glob(".last.pt.*.tmp"))
    assert len(unfinished) == 1  # the half-written file is where the kill left it, under its own name
    saved = load_checkpoint(out / "last.pt")  # the previous save is whole
    assert saved["step"] == writing - 1  # one --save-every interval lost, no more

    code, printed = run(["--resume", out, "--max-steps", writing + 1, "--no-progress"], capsys)
    assert code == 0
    assert f"resumed at step {writing - 1}" in printed and "unfinished checkpoint write" in printed
    assert load_checkpoint(out / "last.pt")["step"] == writing + 1
    assert not list(out.glob(".*.tmp"))
    steps = [int(r["step"]) for r in log_rows(out)]
    assert steps == sorted(steps)  # rows the killed run logged past its last save are gone


# --------------------------------------------------------------------------------------------------
# A careless user's inputs


def test_bad_images_in_the_data_folder_are_left_out_listed_and_exit_1(hr_folder, tmp_path, capsys):
    # The policy of eval and upscale: go on with the readable images, list the others, exit with 1.
    data = tmp_path / "data"
    data.mkdir()
    for source in sorted(hr_folder.iterdir()):
        (data / source.name).write_bytes(source.read_bytes())
    (data / "img1.png").write_bytes(b"not a png")
    (data / "img2.png").write_text("nor this")
    code, _ = run(["--data", data, "--max-steps", 2, "--out", tmp_path / "out", *TINY])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dlsn.train:")]
    listed = "dlsn.train: failed: 2 of 5 images: img1.png (cannot read image"
    assert len(lines) == 2 and all(line.startswith(listed) for line in lines), err
    assert "img2.png (cannot read image" in lines[0] and lines[0].endswith("; training on the others")
    assert "2 HR images for training" in out and "held out img4" in out
    assert (tmp_path / "out" / "last.pt").is_file()
    assert load_checkpoint(tmp_path / "out" / "last.pt")["step"] == 2


def test_a_folder_without_enough_readable_images_is_one_line(hr_folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(b"not a png")
    code, _ = run(["--data", data, "--max-steps", 1, "--out", tmp_path / "out", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"dlsn.train: error: --data {data}: no readable image: failed: 2 of 2 images: a.png")
    (data / "c.png").write_bytes((hr_folder / "img0.png").read_bytes())
    code, _ = run(["--data", data, "--max-steps", 1, "--out", tmp_path / "out", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"dlsn.train: error: --data {data}: 1 image(s) readable (of 3); need "
                                        "more than the 1 held out")
    assert not (tmp_path / "out").exists()


def test_conversions_of_the_training_images_are_stated(hr_folder, tmp_path):
    from PIL import Image

    from dlsn.cli import format_conversions

    data = tmp_path / "data"
    data.mkdir()
    for source in sorted(hr_folder.iterdir()):
        (data / source.name).write_bytes(source.read_bytes())
    Image.open(hr_folder / "img0.png").convert("L").save(data / "img0.png")
    Image.open(hr_folder / "img4.png").convert("RGBA").save(data / "img4.png")
    settings = T.resolve_settings(cli._parser().parse_args(["--data", str(data), *map(str, TINY)]), None)
    conversions = T.build_data(settings).conversions
    assert conversions == [("img0.png", "greyscale"), ("img4.png", "RGBA, alpha dropped")]
    # Trainer prints this line before training.
    assert format_conversions(conversions) == ("converted to 8-bit RGB on reading: img0.png (greyscale), "
                                               "img4.png (RGBA, alpha dropped)")


@pytest.mark.parametrize(
    ("flag", "content", "message"),
    [
        ("--resume", b"just some text\n", "--resume: {path} is not a readable checkpoint"),
        ("--init-from", bytes(range(256)) * 8, "--init-from: {path} is not a readable checkpoint"),
    ],
    ids=["resume-text", "init-from-binary"],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line(hr_folder, tmp_path, capsys, flag, content, message):
    path = tmp_path / "given" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(content)
    out = path.parent if flag == "--resume" else tmp_path / "run"
    code, _ = run(["--data", hr_folder, flag, path, "--max-steps", 1, "--out", out, *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dlsn.train: error: " + message.format(path=path)) and err.count("\n") == 1


def test_bad_settings_are_one_line(hr_folder, tmp_path, capsys):
    for extra, message in ((["--model-arg", "n_feats=0"], "--model-arg n_feats=0: config n_feats = 0 is impossible"),
                           (["--model-arg", "rgb_range=-255"], "--model-arg rgb_range=-255: config rgb_range"),
                           (["--model-arg", "colour=1"], "--model-arg colour=1: preset 'tiny' has no settings"),
                           (["--backend", "fastest"], "--backend 'fastest' is not a backend"),
                           (["--threads", "0"], "--threads must be >= 1"),
                           (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device")):
        out = tmp_path / "out"
        code, _ = run(["--data", hr_folder, "--max-steps", 1, "--out", out, *TINY, *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"dlsn.train: error: {message}") and err.count("\n") == 1, err
        assert not out.exists()  # a failed start leaves no run folder behind


def test_a_bug_keeps_its_traceback_and_leaves_no_empty_folder(hr_folder, tmp_path, monkeypatch):
    def broken_step(self, batch):
        raise ValueError("a bug that happens to be a ValueError")

    monkeypatch.setattr(T.Trainer, "train_step", broken_step)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="a bug that happens"):
        cli.main([str(a) for a in ["--data", hr_folder, "--max-steps", 3, "--out", out, *TINY]])
    assert not out.exists()


def test_ctrl_c_while_setting_up_is_one_line(hr_folder, tmp_path, capsys, monkeypatch):
    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "build_data", interrupted)
    code, _ = run(["--data", hr_folder, "--max-steps", 1, "--out", tmp_path / "out", *TINY])
    assert code == 130
    assert capsys.readouterr().err.strip() == "dlsn.train: interrupted; nothing saved"


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "(default 2)" in text
    assert_each_default_once(text)


@pytest.mark.parametrize("start", [9.0, 1.0, 300.0], ids=["decade", "narrow", "two-decades"])
def test_curves_have_readable_loss_ticks_and_a_legend_clear_of_the_lines(tmp_path, start):
    log = T.RunLog(tmp_path / "log.csv", None)
    for step in range(10, 2010, 10):  # a loss from 3.5 + start down to about 3.5
        log.add(step, step // 100, start * math.exp(-step / 500) + 3.5, 1e-3, None, step / 4)
        if step % 200 == 0:
            log.add(step, step // 100, None, 1e-3, 29.5 + 3 * (1 - math.exp(-step / 600)), step / 4)
    fig = log.figure(30.53, "tiny x2")
    fig.canvas.draw()
    ax_loss, ax_psnr = fig.axes
    low, high = ax_loss.get_ylim()
    labelled = [t for t in ax_loss.yaxis.get_major_ticks()
                if t.label1.get_text() and low <= t.get_loc() <= high]
    assert len(labelled) >= 4, [t.label1.get_text() for t in labelled]
    assert all(float(t.label1.get_text()) == pytest.approx(t.get_loc()) for t in labelled)  # plain numbers
    legend = ax_psnr.get_legend().get_window_extent()
    assert [text.get_text() for text in ax_psnr.get_legend().get_texts()] == ["model", "bicubic"]
    assert not legend.overlaps(ax_psnr.get_window_extent())  # outside the plot: covers no line
    path = log.plot(tmp_path / "curves.png", 30.53, "tiny x2")
    assert path.stat().st_size > 0
