"""What an adversarial but fair user hits (issue 31): diverged training, NaN weights, impossible configs, two
runs in one folder, a full or read-only disk, hostile images, and backends that refuse a call.

Each test runs the tools as a user does (``main(argv)``, or a subprocess where a second process is the point)
and checks the exit status, the one-line message and that no traceback is printed.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlsn import eval as eval_cli
from dlsn import train as train_cli
from dlsn import upscale as upscale_cli
from dlsn.cli import BACKEND_HELP, check_backend, kernel_refusal
from dlsn.data import samples
from dlsn.errors import CheckpointError, UserInputError
from dlsn.evaluation import ImageScore, SetScore, evaluate_dataset, format_tables
from dlsn.images import decode_image, write_image
from dlsn.metrics import psnr_y, ssim_y
from dlsn.models import build_model, save_checkpoint
from dlsn.models.checkpoint import load_checkpoint, load_model, save_safetensors
from dlsn.models.presets import check_config, preset_config
from dlsn.training.run_folder import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch-size", "2", "--patch-size", "16", "--val-crop", "48", "--no-progress"]


def _main(main, args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)


def one_error_line(err: str, prog: str) -> str:
    """The single ``<prog>: error: ...`` line of ``err``; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory) -> Path:
    """Five 72x64 HR crops of different photos; the last two (by name) are held out."""
    folder = tmp_path_factory.mktemp("hr")
    for i, name in enumerate(("astronaut", "chelsea", "motorcycle_left", "coffee", "ihc")):
        image = samples.load_sample(name)
        write_image(folder / f"img{i}.png", image[100:164, 120:192].copy())
    return folder


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", 2, chunk_size=16)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_x2.pt", tiny_model)


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def upscale(*args) -> int:
    return _main(upscale_cli.main, [*args, "--backend", "reference", "--device", "cpu"])


def train(*args) -> int:
    return _main(train_cli.main, args)


# --------------------------------------------------------------------------------------------------
# 1. Non-finite is never a score


def test_psnr_and_ssim_of_a_non_finite_output_are_nan_not_inf():
    hr = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    for bad in (math.nan, math.inf, -math.inf):
        sr = hr.clone()
        sr[1, 5, 7] = bad
        assert math.isnan(psnr_y(sr, hr, 2)) and math.isnan(ssim_y(sr, hr, 2)), bad
    assert psnr_y(hr, hr, 2) == math.inf  # identical images keep their inf
    batch = torch.stack([hr, hr.clone().fill_(math.nan), hr * 0.9])
    scores = psnr_y(batch, torch.stack([hr] * 3), 2)
    assert scores[0] == math.inf and math.isnan(scores[1]) and math.isfinite(scores[2])
    assert math.isnan(ssim_y(batch, torch.stack([hr] * 3), 2)[1])


def test_tables_print_a_nan_score_as_non_finite_output():
    bad = SetScore("Set5", 2, "model", [ImageScore("a", math.nan, math.nan), ImageScore("b", 30.0, 0.9)])
    table = format_tables([bad], per_image=True)
    assert table.count("NaN (non-finite output)") == 2  # the set's mean and image a
    assert "30.00" in table and "inf" not in table
    evaluated = evaluate_dataset(lambda lr: torch.full((1, 3, 32, 32), math.nan),
                                 [{"lr": torch.rand(3, 16, 16), "hr": torch.rand(3, 32, 32), "name": "x"}], 2,
                                 progress=False)
    assert math.isnan(evaluated.psnr) and math.isnan(evaluated.images[0].ssim)


def test_eval_side_by_side_table_says_non_finite_output(tmp_path):
    from dlsn.eval import format_side_by_side

    results = [SetScore("S", 2, "bicubic", [ImageScore("a", 25.0, 0.8)]),
               SetScore("S", 2, "model", [ImageScore("a", math.nan, math.nan)])]
    table = format_side_by_side(results)
    assert "NaN (non-finite output)" in table and "+inf" not in table and "nan dB" not in table


@pytest.fixture(scope="module")
def good_run(hr_folder, tmp_path_factory) -> Path:
    """A finished tiny run: last.pt at step 4, best.pt / model.safetensors from a finite validation."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert train("--data", hr_folder, "--max-steps", 4, "--val-every", 2, "--out", out, *TINY) == 0
    return out


def _copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for path in run.iterdir():
        if path.is_file():
            (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize("val_every", [1, 100], ids=["diverged-validation", "diverged-loss"])
def test_a_diverging_resume_keeps_best_and_last_and_stops_in_one_line(good_run, tmp_path, capsys, val_every):
    out = _copy_run(good_run, tmp_path / "run")
    before = {name: (out / name).read_bytes() for name in ("best.pt", "model.safetensors", "last.pt")}
    best_before = load_checkpoint(out / "last.pt")["extra"]["best_psnr"]
    code = train("--resume", "--out", out, "--lr", "1e30", "--val-every", val_every, "--max-steps", 8,
                 "--no-progress")
    err = capsys.readouterr().err
    line = one_error_line(err, "dlsn.train")
    assert code == 1
    assert "training diverged at step" in line and "kept last.pt (step 4)" in line and "best.pt (step" in line
    assert f"--resume {out / 'last.pt'}" in line
    for name, data in before.items():  # no non-finite model replaced the good ones
        assert (out / name).read_bytes() == data, name
    assert load_checkpoint(out / "last.pt")["extra"]["best_psnr"] == best_before
    assert load_checkpoint(out / "diverged.pt")["step"] in (5, 6)  # the diverged state, for inspection
    print(line)
    # The kept last.pt resumes.
    assert train("--resume", "--out", out, "--max-steps", 5, "--no-progress") == 0


def test_a_resumed_infinite_best_score_is_replaced(good_run, tmp_path, capsys):
    out = _copy_run(good_run, tmp_path / "run")
    last = torch.load(out / "last.pt", weights_only=True)
    last["extra"]["best_psnr"] = math.inf  # what an older version stored after scoring a NaN model
    torch.save(last, out / "last.pt")
    assert train("--resume", "--out", out, "--max-steps", 5, "--val-every", 1, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "best validation score is inf" in printed
    best = load_checkpoint(out / "last.pt")["extra"]["best_psnr"]
    assert math.isfinite(best) and load_checkpoint(out / "best.pt")["step"] == 5


# --------------------------------------------------------------------------------------------------
# 2. Models checked before use


def _state_with(tiny_model, name: str, value) -> dict:
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state[name].view(-1)[0] = value
    return state


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_non_finite_weights_are_refused_by_upscale_in_one_line(tiny_model, tmp_path, capsys, value, container):
    net = build_model("tiny", 2, chunk_size=16)
    net.load_state_dict(_state_with(tiny_model, "head.0.weight", value))
    path = (save_checkpoint(tmp_path / "bad.pt", net) if container == "pt"
            else save_safetensors(tmp_path / "model.safetensors", net))
    image = write_png(tmp_path / "in.png", 12, 10)
    assert upscale(image, tmp_path / "out.png", "--checkpoint", path) == 2
    line = one_error_line(capsys.readouterr().err, "dlsn.upscale")
    assert "non-finite weights (NaN or inf) in 1 tensor(s): head.0.weight" in line
    assert not (tmp_path / "out.png").exists()


def _with_config(checkpoint: Path, to: Path, **changes) -> Path:
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"].update(changes)
    torch.save(saved, to)
    return to


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_feats": 10**9}, "n_feats = 1000000000 is impossible"),
        ({"n_feats": 1e9}, "n_feats = 1000000000.0 is impossible: it must be an int"),
        ({"rgb_range": 0.0}, "rgb_range = 0.0 is impossible"),
        ({"rgb_range": -255.0}, "rgb_range = -255.0 is impossible"),
        ({"rgb_range": math.nan}, "rgb_range = nan is impossible"),
        ({"n_hashes": 0}, "n_hashes = 0 is impossible"),
        ({"chunk_size": -4}, "chunk_size = -4 is impossible"),
    ],
    ids=["n_feats-1e9", "n_feats-float", "rgb_range-0", "rgb_range-negative", "rgb_range-nan", "n_hashes-0",
         "chunk_size-negative"],
)
def test_impossible_configs_are_one_line(tiny_checkpoint, tmp_path, capsys, changes, message):
    bad = _with_config(tiny_checkpoint, tmp_path / "bad.pt", **changes)
    assert upscale(write_png(tmp_path / "in.png", 12, 10), tmp_path / "out.png", "--checkpoint", bad) == 2
    line = one_error_line(capsys.readouterr().err, "dlsn.upscale")
    assert message in line, line
    with pytest.raises(CheckpointError, match="has a config this code cannot build"):
        load_model(bad)


def test_integer_weights_where_floats_belong_are_one_line(tiny_model, tmp_path, capsys):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["head.0.weight"] = state["head.0.weight"].to(torch.int32)
    saved = torch.load(save_checkpoint(tmp_path / "ok.pt", tiny_model), weights_only=True)
    saved["model"].update(state)
    torch.save(saved, tmp_path / "int.pt")
    write_png(tmp_path / "photo.png", 20, 20)
    code = _main(eval_cli.main, ["--data", tmp_path, "--checkpoint", tmp_path / "int.pt", "--device", "cpu",
                                 "--no-progress"])
    line = one_error_line(capsys.readouterr().err, "dlsn.eval")
    assert code == 2 and "integer weights where the network has floating ones: head.0.weight (torch.int32)" in line


def test_check_config_accepts_every_preset():
    from dlsn.models.presets import PRESETS

    for name in PRESETS:
        for scale in (2, 3, 4):
            check_config(preset_config(name, scale))


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_pickle_naming_os_system_says_it_holds_python_objects(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"model": _RunsShell()}, handle, protocol=2)
    torch.save({"model": _RunsShell()}, tmp_path / "evil_zip.pt")
    for file in (path, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError, match=r"holds Python objects \((posix|os|nt)\.system\)"):
            load_checkpoint(file)
    assert upscale(write_png(tmp_path / "in.png", 8, 8), tmp_path / "o.png", "--checkpoint", path) == 2
    assert "holds Python objects" in one_error_line(capsys.readouterr().err, "dlsn.upscale")


def test_spandrel_refuses_nan_weights_in_one_line(tiny_model):
    pytest.importorskip("spandrel")
    from dlsn.integrations.spandrel import DLSNArch
    from dlsn.models.checkpoint import CONFIG_KEY, config_tensor

    state = _state_with(tiny_model, "tail.1.weight", math.nan)
    state[CONFIG_KEY] = config_tensor(tiny_model.config)
    with pytest.raises(CheckpointError, match="non-finite weights .* tail.1.weight"):
        DLSNArch().load(state)


# --------------------------------------------------------------------------------------------------
# 3. One run per folder


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s training lock, as a running ``dlsn.train`` does."""
    script = ("import sys, time; from pathlib import Path; from dlsn.training.run_folder import RunLock; "
              "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_running_ones_folder_is_refused_and_a_killed_ones_lock_is_not(
        hr_folder, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            code = train("--data", hr_folder, "--max-steps", 1, "--out", out, *extra, *TINY)
            line = one_error_line(capsys.readouterr().err, "dlsn.train")
            assert code == 2
            assert line == (f"dlsn.train: error: --out {out} is in use by another training run (pid {holder.pid}); "
                            "wait for it to end, or choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of the refused runs
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder left its lock file; it does not block.
    assert (out / LOCK_NAME).exists()
    assert train("--data", hr_folder, "--max-steps", 1, "--out", out, *TINY) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 1


def test_default_folders_skip_one_a_running_training_holds(tmp_path, monkeypatch):
    from dlsn.training.run_folder import run_folder

    monkeypatch.chdir(tmp_path)
    lock = RunLock(Path("runs/tiny_x2"))
    lock.acquire()
    try:
        assert run_folder(None, "tiny", 2, resuming=False, overwrite=False) == Path("runs/tiny_x2_2")
    finally:
        lock.release()
    assert run_folder(None, "tiny", 2, resuming=False, overwrite=False) == Path("runs/tiny_x2")


def test_an_unwritable_out_is_found_at_the_start(hr_folder, tmp_path, capsys, monkeypatch):
    # As root a chmod'ed folder stays writable, so the refusal of the file system is simulated.
    run_folder_module = sys.modules["dlsn.training.run_folder"]  # the package's run_folder is the function

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_folder_module.tempfile, "mkstemp", read_only)
    out = tmp_path / "run"
    code = train("--data", hr_folder, "--max-steps", 1, "--out", out, *TINY)
    line = one_error_line(capsys.readouterr().err, "dlsn.train")
    assert code == 2 and line == f"dlsn.train: error: --out {out} is not writable (Read-only file system)"
    assert not out.exists()  # the folder this command created is removed again


# --------------------------------------------------------------------------------------------------
# 4. Saving errors are one line


@pytest.mark.parametrize("failure", ["enospc", "torch-zip-writer", "read-only"])
def test_a_failed_save_is_one_line_and_keeps_the_previous_last_pt(hr_folder, tmp_path, capsys, monkeypatch,
                                                                   failure):
    import dlsn.atomic_files as atomic_files

    real_save, real_mkstemp = torch.save, atomic_files.tempfile.mkstemp
    calls = {"n": 0}

    def failing_save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 2 or not isinstance(obj, dict) or obj.get("optimizer") is None:
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04 half a checkpoint")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")

    def failing_mkstemp(*args, **kwargs):  # the folder turns read-only after the first last.pt
        if str(kwargs.get("prefix", "")).startswith(".last.pt."):
            calls["n"] += 1
            if calls["n"] >= 2:
                raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, **kwargs)

    if failure == "read-only":
        monkeypatch.setattr(atomic_files.tempfile, "mkstemp", failing_mkstemp)
    else:
        monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    code = train("--data", hr_folder, "--max-steps", 4, "--val-every", 0, "--save-every", 2, "--out", out, *TINY)
    line = one_error_line(capsys.readouterr().err, "dlsn.train")
    assert code == 1
    reason = {"enospc": "No space left on device", "torch-zip-writer": "unexpected pos 4160 vs 4096",
              "read-only": "Read-only file system"}[failure]
    assert line.startswith(f"dlsn.train: error: cannot write {out / 'last.pt'} (") and reason in line
    assert f"the previous {out / 'last.pt'} (step 2) is intact" in line
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert not list(out.glob(".last.pt.*.tmp"))  # the failed write's temporary is gone


# --------------------------------------------------------------------------------------------------
# 5. Images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG header declaring ``side`` x ``side`` pixels (900 Mpx by default), and no pixels at all."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    return path


def rgb16_png(path: Path, values: np.ndarray) -> Path:
    """A 48-bit RGB PNG of ``values`` ([H, W, 3] uint16), rows alternately unfiltered and 'Sub' filtered
    (the Sub filter depends on the 6-byte pixel, so a decoder with the wrong pixel size reads garbage)."""
    height, width, _ = values.shape
    raw = values.astype(">u2").tobytes()
    stride = width * 6
    rows = []
    for y in range(height):
        row = np.frombuffer(raw[y * stride:(y + 1) * stride], dtype=np.uint8).astype(np.int32)
        if y % 2:
            left = np.concatenate([np.zeros(6, np.int32), row[:-6]])
            rows.append(b"\x01" + ((row - left) % 256).astype(np.uint8).tobytes())
        else:
            rows.append(b"\x00" + row.astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"".join(rows))) + _png_chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_and_an_oversize_image_are_one_line_each(tmp_path):
    with pytest.raises(UserInputError, match=r"cannot read image .*bomb\.png: Image size \(900000000 pixels\)"):
        decode_image(bomb_png(tmp_path / "bomb.png"))
    write_png(tmp_path / "big.png", 40, 30)
    with pytest.raises(UserInputError, match=r"big\.png is 40x30 = 0\.0 Mpx, over the limit of 0\.001 Mpx"):
        decode_image(tmp_path / "big.png", max_pixels=1000)
    assert decode_image(tmp_path / "big.png", max_pixels=1200)[0].shape == (30, 40, 3)
    # A limit above PIL's own bomb check is honoured from the header too (the size is all that is read).
    with pytest.raises(UserInputError, match="900.0 Mpx, over the limit of 800 Mpx"):
        decode_image(tmp_path / "bomb.png", max_pixels=800_000_000)


def test_upscale_folder_lists_bombs_and_oversize_images_and_goes_on(tiny_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bomb_png(inputs / "a_bomb.png")
    write_png(inputs / "b_big.png", 40, 30)
    write_png(inputs / "c_good.png", 12, 10)
    code = upscale(inputs, tmp_path / "out", "--checkpoint", tiny_checkpoint, "--max-megapixels", "0.001")
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert (tmp_path / "out" / "c_good_x2.png").is_file()
    failed = [line for line in captured.err.splitlines() if "failed:" in line]
    assert len(failed) == 1 and failed[0].startswith("dlsn.upscale: failed: 2 of 3 images: a_bomb.png (cannot read")
    assert "b_big.png (image" in failed[0] and "over the limit of 0.001 Mpx" in failed[0]
    # One file: one line, exit 2; the default limit (64 Mpx) lets the small image through.
    assert upscale(inputs / "a_bomb.png", tmp_path / "x.png", "--checkpoint", tiny_checkpoint) == 2
    assert "decompression bomb" in one_error_line(capsys.readouterr().err, "dlsn.upscale")
    assert upscale(inputs / "b_big.png", tmp_path / "x.png", "--checkpoint", tiny_checkpoint) == 0


def test_exif_orientation_is_applied_and_said(tiny_checkpoint, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    array, conversion = decode_image(tmp_path / "turned.png")
    assert conversion == "EXIF orientation 6 applied"
    np.testing.assert_array_equal(array, np.rot90(pixels, k=-1))
    assert upscale(tmp_path / "turned.png", tmp_path / "out.png", "--checkpoint", tiny_checkpoint) == 0
    assert "turned.png (EXIF orientation 6 applied)" in capsys.readouterr().out
    assert Image.open(tmp_path / "out.png").size == (20, 32)


def test_16_bit_rgb_is_rounded_like_16_bit_grey(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (7, 9, 3), dtype=np.uint16)
    values[0, :3, 0] = [128, 383, 65535]  # 0.498 -> 0, 1.49 -> 1, 255
    array, conversion = decode_image(rgb16_png(tmp_path / "rgb16.png", values))
    assert conversion == "16-bit RGB"
    np.testing.assert_array_equal(array, np.round(values / 257.0).astype(np.uint8))
    grey = Image.fromarray(values[:, :, 0])
    grey.save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "grey16.png")[0][:, :, 0], array[:, :, 0])


def test_eval_skips_images_too_small_to_score_and_scores_the_rest(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_png(photos / "a_tiny.png", 2, 2)
    write_png(photos / "b_small.png", 14, 40)  # 14 - 2 * 2 = 10 < the 11x11 SSIM window at x2
    write_png(photos / "c_ok.png", 16, 16, seed=1)
    write_png(photos / "d_ok.png", 24, 20, seed=2)
    code = _main(eval_cli.main, ["--data", photos, "--bicubic", "--scale", "2", "--no-progress", "--per-image"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert skipped == ["dlsn.eval: skipped 2 image(s) too small to score, the others are scored: "
                       "photos/a_tiny at x2 (HR 2x2; x2 scoring needs 15x15 or more); "
                       "photos/b_small at x2 (HR 14x40; x2 scoring needs 15x15 or more)"]
    row = next(line for line in captured.out.splitlines() if line.startswith("photos"))
    assert row.split()[1] == "2"
    assert "c_ok" in captured.out and "d_ok" in captured.out and "a_tiny" not in captured.out


# --------------------------------------------------------------------------------------------------
# 6. and 7. Backends: every choice in --help; the kernels' refusals are one line


@pytest.mark.parametrize("main", [train_cli.main, eval_cli.main, upscale_cli.main], ids=["train", "eval", "upscale"])
def test_backend_help_lists_every_choice(main, capsys):
    import dlsn_kernels

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(BACKEND_HELP.split()) in text
    for name in dlsn_kernels.BACKENDS:
        assert f" {name}" in BACKEND_HELP
    assert "automatic" in BACKEND_HELP


def _refuse_in_kernels(*args, **kwargs):
    import dlsn_kernels

    dlsn_kernels.bucket_sort(torch.zeros(1, 1, 4, dtype=torch.int64), 0)  # a ValueError from the kernels' checks


@pytest.mark.parametrize("kind", ["unavailable", "kernel-check"])
def test_a_kernel_refusal_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch, kind):
    import dlsn_kernels

    def unavailable(self, x):
        raise dlsn_kernels.BackendUnavailableError("flex cannot run L = 135300 positions within memory on the CPU")

    from dlsn.models.dlsn import _GLANetwork

    monkeypatch.setattr(_GLANetwork, "forward", unavailable if kind == "unavailable" else _refuse_in_kernels)
    code = upscale(write_png(tmp_path / "photo.png", 12, 10), tmp_path / "out.png", "--checkpoint", tiny_checkpoint)
    line = one_error_line(capsys.readouterr().err, "dlsn.upscale")
    assert code == 2
    assert ("flex cannot run L = 135300" in line) if kind == "unavailable" else ("n_buckets" in line)


def test_a_value_error_outside_the_kernels_keeps_its_traceback(tiny_checkpoint, tmp_path, monkeypatch):
    from dlsn.models.dlsn import _GLANetwork

    def bug(self, x):
        raise ValueError("a bug in the network code")

    monkeypatch.setattr(_GLANetwork, "forward", bug)
    with pytest.raises(ValueError, match="a bug in the network code"):
        upscale(write_png(tmp_path / "photo.png", 12, 10), tmp_path / "out.png", "--checkpoint", tiny_checkpoint)
    assert not kernel_refusal(ValueError("made here"))


def test_a_non_finite_output_is_not_written_as_a_black_image(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from dlsn.models.dlsn import _GLANetwork

    monkeypatch.setattr(_GLANetwork, "forward", lambda self, x: torch.full(
        (x.shape[0], 3, x.shape[2] * 2, x.shape[3] * 2), math.nan))
    code = upscale(write_png(tmp_path / "photo.png", 12, 10), tmp_path / "out.png", "--checkpoint", tiny_checkpoint)
    assert code == 2 and not (tmp_path / "out.png").exists()
    assert "output is not finite" in one_error_line(capsys.readouterr().err, "dlsn.upscale")


def test_backend_names_are_checked_in_one_line():
    import dlsn_kernels

    cpu = torch.device("cpu")
    assert check_backend(" CPU ", cpu) == "cpu" and check_backend(None, cpu) is None
    for bad in ("fastest", "flex:cpu"):
        with pytest.raises(UserInputError, match=f"--backend '{bad}' is not a backend; choose one of reference"):
            check_backend(bad, cpu)
    if dlsn_kernels.available_backends(cpu)["cuda"].reason is not None:
        with pytest.raises(UserInputError, match="--backend cuda cannot run on cpu here"):
            check_backend("cuda", cpu)
