"""Tests of dlsn.evaluation and dlsn.eval: self-ensemble, scoring, and the ``python -m dlsn.eval`` command line."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from dlsn import evaluation
from dlsn.data import PairedFolderDataset, degrade, imresize
from dlsn.eval import main
from dlsn.evaluation import (
    bicubic_upscaler,
    evaluate_dataset,
    find_test_sets,
    model_upscaler,
    self_ensemble,
    sr_forward,
)
from dlsn.images import tensor_to_uint8, uint8_to_tensor, write_image
from dlsn.metrics import bicubic_baseline, psnr_y, ssim_y
from tests.helpers import assert_each_default_once


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 [H, W, 3] image with smooth structure plus some texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 6, width // 6, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")[0]
    return tensor_to_uint8((0.85 * image + 0.15 * torch.rand(3, height, width, generator=g)).clamp(0, 1))


def make_test_set(root, name="Tiny", scales=(2,), sizes=((36, 48), (42, 30)), suffix=True):
    """``root/name/HR/*.png`` and ``LR_bicubic/X{s}/*.png`` made with the BI degradation."""
    for i, (height, width) in enumerate(sizes):
        hr = photo(height, width, seed=10 * i + len(name))
        write_image(root / name / "HR" / f"img{i}.png", hr)
        for s in scales:
            cropped = uint8_to_tensor(hr[: height - height % s, : width - width % s])
            lr_name = f"img{i}x{s}.png" if suffix else f"img{i}.png"
            write_image(root / name / "LR_bicubic" / f"X{s}" / lr_name, degrade(cropped, s))
    return root / name


class RecordingUpscaler(nn.Module):
    """Stand-in network in [0, 255]: bicubic upscaling; remembers the largest input value it saw."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.largest_input = 0.0
        self.n_hashes = None
        self.seed = None

    def set_inference(self, n_hashes=None, seed=None):
        self.n_hashes, self.seed = n_hashes, seed

    def forward(self, x):
        self.largest_input = max(self.largest_input, float(x.max()))
        return imresize(x, scale=float(self.scale))


# --------------------------------------------------------------------------------------------------
# Building blocks


def test_sr_forward_scales_to_and_from_rgb_range():
    model = RecordingUpscaler(2)
    lr = torch.rand(1, 3, 6, 5)
    lr[0, 0, 0, 0] = 1.0
    out = sr_forward(model, lr, 255.0)
    assert model.largest_input == pytest.approx(255.0)
    torch.testing.assert_close(out, imresize(lr, scale=2.0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        sr_forward(model, lr, 0)


def test_self_ensemble_undoes_every_transform():
    lr = torch.rand(2, 3, 5, 7)
    calls = []

    def identity(x):
        calls.append(tuple(x.shape))
        return x

    torch.testing.assert_close(self_ensemble(identity, lr), lr)  # a wrong inverse would move pixels
    assert len(calls) == 8 and (2, 3, 7, 5) in calls and (2, 3, 5, 7) in calls


def test_self_ensemble_averages_a_position_dependent_output():
    # f(x) = x + column index: over the 8 symmetries the ramp averages to (W - 1) / 2 for a square.
    lr = torch.rand(1, 3, 6, 6, dtype=torch.float64)

    def add_ramp(x):
        return x + torch.arange(x.shape[-1], dtype=x.dtype)

    torch.testing.assert_close(self_ensemble(add_ramp, lr), lr + 2.5)


def test_self_ensemble_of_bicubic_is_bicubic():
    # MATLAB bicubic commutes with flips and transposes, so its ensemble equals one pass.
    lr = torch.rand(1, 3, 7, 9, dtype=torch.float64)
    up = bicubic_upscaler(3)
    torch.testing.assert_close(self_ensemble(up, lr), up(lr))


def test_evaluate_dataset_scores_each_image(tmp_path):
    set_dir = make_test_set(tmp_path, scales=(3,))
    dataset = PairedFolderDataset.from_test_set(set_dir, 3)
    result = evaluate_dataset(bicubic_upscaler(3), dataset, 3, set_name="Tiny", method="bicubic",
                              progress=False)
    assert result.n_images == 2 and [s.name for s in result.images] == ["img0", "img1"]
    for score, item in zip(result.images, dataset, strict=True):
        sr = bicubic_baseline(item["lr"], 3)
        assert score.psnr == pytest.approx(psnr_y(sr, item["hr"], 3), abs=1e-9)
        assert score.ssim == pytest.approx(ssim_y(sr, item["hr"], 3), abs=1e-12)
    assert result.psnr == pytest.approx(np.mean([s.psnr for s in result.images]))
    assert 20 < result.psnr < 60 and 0.5 < result.ssim < 1


def test_evaluate_dataset_rejects_wrong_output_size(tmp_path):
    dataset = PairedFolderDataset.from_test_set(make_test_set(tmp_path), 2)
    with pytest.raises(evaluation.EvalError, match="returned shape"):
        evaluate_dataset(bicubic_upscaler(3), dataset, 2, progress=False)


def test_find_test_sets(tmp_path):
    make_test_set(tmp_path, "SetA")
    make_test_set(tmp_path, "SetB")
    (tmp_path / "notes").mkdir()
    assert list(find_test_sets(tmp_path)) == ["SetA", "SetB"]
    assert list(find_test_sets(tmp_path, ["SetB"])) == ["SetB"]
    assert list(find_test_sets(tmp_path / "SetA")) == ["SetA"]  # a set folder on its own
    with pytest.raises(FileNotFoundError, match="Urban100"):
        find_test_sets(tmp_path, ["Urban100"])
    with pytest.raises(FileNotFoundError, match="no test sets"):
        find_test_sets(tmp_path / "notes")
    with pytest.raises(FileNotFoundError, match="not found"):
        find_test_sets(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_bicubic_tables_csv_and_json(tmp_path, capsys):
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2, 3))
    make_test_set(data, "SetB", scales=(2, 3), sizes=((24, 24),), suffix=False)
    out_csv, out_json = tmp_path / "out" / "r.csv", tmp_path / "out" / "r.json"
    code = main(["--data", str(data), "--scale", "2", "3", "--bicubic", "--no-progress",
                 "--csv", str(out_csv), "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bicubic x2" in printed and "bicubic x3" in printed and "SetA" in printed and "SetB" in printed

    report = json.loads(out_json.read_text())
    results = {(r["set"], r["scale"]): r for r in report["results"]}
    assert set(results) == {("SetA", 2), ("SetB", 2), ("SetA", 3), ("SetB", 3)}
    assert results[("SetA", 2)]["n_images"] == 2 and results[("SetB", 3)]["n_images"] == 1
    # The numbers are those of metrics on bicubic upscaling, computed directly.
    direct = PairedFolderDataset.from_test_set(data / "SetA", 3)[1]
    sr = bicubic_baseline(direct["lr"], 3)
    image = results[("SetA", 3)]["images"][1]
    assert image["name"] == "img1"
    assert image["psnr"] == pytest.approx(psnr_y(sr, direct["hr"], 3), abs=1e-9)
    assert image["ssim"] == pytest.approx(ssim_y(sr, direct["hr"], 3), abs=1e-12)
    assert f"{results[('SetA', 3)]['psnr']:.2f}" in printed

    with out_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (2 + 1 + 1 + 1)  # per scale: SetA 2 images + mean, SetB 1 image + mean
    means = [r for r in rows if r["image"] == "MEAN"]
    assert float(means[0]["psnr"]) == pytest.approx(results[("SetA", 2)]["psnr"], abs=1e-5)


def install_fake_checkpoints(monkeypatch, scales_by_path):
    """Replace dlsn.models.checkpoint.load_model with one returning RecordingUpscaler models."""
    import dlsn.models.presets  # noqa: F401  (imported for real first: eval names networks after presets)

    loaded = {}

    def load_model(path, map_location="cpu", *, scale=None, backend=None):
        model = RecordingUpscaler(scales_by_path[str(path)])
        model.backend = backend
        loaded[str(path)] = model
        return model, {"scale": model.scale, "arch": "fake_net", "rgb_range": 255.0}

    class CheckpointError(RuntimeError):
        pass

    module = types.ModuleType("dlsn.models.checkpoint")
    module.load_model = load_model
    module.CheckpointError = CheckpointError
    monkeypatch.setitem(sys.modules, "dlsn.models.checkpoint", module)
    return loaded


def test_cli_with_a_stand_in_model(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2, 4), sizes=((32, 40),))
    ckpt2, ckpt4 = tmp_path / "x2.pt", tmp_path / "x4.pt"
    ckpt2.write_bytes(b"")
    ckpt4.write_bytes(b"")
    loaded = install_fake_checkpoints(monkeypatch, {str(ckpt2): 2, str(ckpt4): 4})
    out_json = tmp_path / "r.json"
    code = main(["--data", str(data), "--checkpoint", str(ckpt4), str(ckpt2), "--self-ensemble",
                 "--n-hashes", "2", "--seed", "5", "--backend", "reference", "--device", "cpu",
                 "--json", str(out_json), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "FAKE-NET+ x2" in printed and "FAKE-NET+ x4" in printed
    model = loaded[str(ckpt2)]
    assert (model.n_hashes, model.seed, model.backend) == (2, 5, "reference")
    assert model.largest_input > 200  # the network saw [0, 255] input
    # The stand-in is bicubic, which self-ensembling leaves unchanged: scores equal the bicubic ones.
    results = json.loads(out_json.read_text())["results"]
    assert [r["scale"] for r in results] == [2, 4]
    for r in results:
        item = PairedFolderDataset.from_test_set(data / "SetA", r["scale"])[0]
        expected = psnr_y(bicubic_baseline(item["lr"], r["scale"]), item["hr"], r["scale"])
        assert r["psnr"] == pytest.approx(expected, abs=1e-3)


def test_cli_errors(tmp_path, monkeypatch, capsys):
    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

    fails(["--data", str(tmp_path / "nowhere"), "--scale", "2", "--bicubic"], "data folder not found")
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2,))
    fails(["--data", str(data), "--bicubic"], "--bicubic needs --scale")
    fails(["--data", str(data), "--scale", "2"], "give --checkpoint")
    fails(["--data", str(data), "--scale", "3", "--bicubic"], "LR_bicubic/X3")
    fails(["--data", str(data), "--scale", "2", "--bicubic", "--sets", "Set5"], "Set5")
    # A set whose HR folder is empty.
    (data / "Empty" / "HR").mkdir(parents=True)
    (data / "Empty" / "LR_bicubic" / "X2").mkdir(parents=True)
    fails(["--data", str(data), "--scale", "2", "--bicubic", "--sets", "Empty"], "no HR images")
    # LR and HR sizes that do not belong together.
    write_image(data / "SetA" / "LR_bicubic" / "X2" / "img1x2.png", photo(30, 30, 0))
    fails(["--data", str(data), "--scale", "2", "--bicubic", "--sets", "SetA"], "does not match LR size")
    # Checkpoint problems.
    fails(["--data", str(data), "--checkpoint", str(tmp_path / "none.pt")], "checkpoint not found")
    ckpt = tmp_path / "x4.pt"
    ckpt.write_bytes(b"")
    install_fake_checkpoints(monkeypatch, {str(ckpt): 4})
    fails(["--data", str(data), "--checkpoint", str(ckpt), "--scale", "2"], "no checkpoint for scale(s) x2")


def test_cli_with_a_real_tiny_checkpoint(tmp_path, capsys):
    """End to end with the real network (tiny preset, reference attention backend, CPU)."""
    from dlsn.models.checkpoint import save_checkpoint
    from dlsn.models.presets import build_model

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "tiny_x2.pt", build_model("tiny", 2, n_feats=16))
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2,), sizes=((24, 32),))
    out_json = tmp_path / "r.json"
    argv = ["--data", str(data), "--checkpoint", str(path), "--backend", "reference", "--device", "cpu",
            "--n-hashes", "1", "--no-progress", "--json", str(out_json)]
    assert main(argv) == 0
    first = json.loads(out_json.read_text())["results"][0]
    assert first["scale"] == 2 and first["n_images"] == 1 and first["method"] == "tiny (n_feats=16)"
    assert math.isfinite(first["psnr"]) and 0 < first["psnr"] < 100
    assert main(argv) == 0  # seeded hash rotations: the same numbers again
    assert json.loads(out_json.read_text())["results"][0]["psnr"] == first["psnr"]


def test_tables_name_networks_by_their_preset():
    from dlsn.eval import method_name
    from dlsn.models.presets import preset_config

    assert method_name(preset_config("cpu_default", 2)) == "cpu_default"
    assert method_name(preset_config("paper", 3)) == "paper"
    assert method_name(preset_config("tiny", 4, n_feats=16)) == "tiny (n_feats=16)"
    assert method_name({"arch": "fake_net", "scale": 2}) == "FAKE-NET"
    far = preset_config("small", 2, n_feats=8, n_resgroups=1, chunk_size=16)
    assert method_name(far) == "DLSN"  # three settings away from every preset: the architecture's name


def test_checkpoint_and_bicubic_in_one_table(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2,))
    make_test_set(data, "SetB", scales=(2,), sizes=((24, 24),))
    ckpt = tmp_path / "x2.pt"
    ckpt.write_bytes(b"")
    install_fake_checkpoints(monkeypatch, {str(ckpt): 2})
    out_json = tmp_path / "r.json"
    assert main(["--data", str(data), "--checkpoint", str(ckpt), "--bicubic", "--no-progress", "--per-image",
                 "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "x2: Y-PSNR (dB) / SSIM"
    assert lines[1].split() == ["Set", "Images", "bicubic", "FAKE-NET", "vs", "bicubic"]
    results = json.loads(out_json.read_text())["results"]
    assert [(r["method"], r["set"]) for r in results] == [("bicubic", "SetA"), ("bicubic", "SetB"),
                                                          ("FAKE-NET", "SetA"), ("FAKE-NET", "SetB")]
    set_a = next(line for line in lines if line.startswith("SetA"))
    bicubic_a = results[0]
    # The stand-in network is bicubic: the same scores, and a gain of 0.00 dB.
    assert set_a.split() == ["SetA", "2", f"{bicubic_a['psnr']:.2f}", "/", f"{bicubic_a['ssim']:.4f}",
                             f"{bicubic_a['psnr']:.2f}", "/", f"{bicubic_a['ssim']:.4f}", "+0.00", "dB"]
    assert any(line.startswith("  img1") for line in lines)  # --per-image rows
    # Scales outside 2, 3, 4 are refused, as train refuses them.
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(data), "--bicubic", "--scale", "5"])
    assert exit_.value.code == 2 and "invalid choice: 5 (choose from 2, 3, 4)" in capsys.readouterr().err


def test_an_unreadable_image_of_a_benchmark_set_is_listed_not_fatal(tmp_path, capsys):
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2,))
    (data / "SetA" / "LR_bicubic" / "X2" / "img1x2.png").write_bytes(b"not a png")
    assert main(["--data", str(data), "--bicubic", "--scale", "2", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert next(line for line in out.splitlines() if line.startswith("SetA")).split()[:2] == ["SetA", "1"]
    assert err.startswith("dlsn.eval: failed: 1 of 2 images: SetA/img1 (cannot read image") and "img1x2.png" in err


def test_model_upscaler_runs_without_gradients():
    model = nn.Conv2d(3, 3, 1)
    up = model_upscaler(nn.Sequential(model, nn.Upsample(scale_factor=2)), 255.0)
    out = up(torch.rand(1, 3, 4, 4))
    assert out.shape == (1, 3, 8, 8) and not out.requires_grad


# --------------------------------------------------------------------------------------------------
# Plain folders of HR photos, and a careless user's inputs


def plain_folder(root, sizes=((36, 48), (30, 42))):
    """``root/*.png``: HR photos only, no HR/ or LR_bicubic/ subfolders."""
    for i, (height, width) in enumerate(sizes):
        write_image(root / f"photo{i}.png", photo(height, width, seed=3 + i))
    return root


@pytest.mark.parametrize("degradation", ["BI", "BD", "DN"])
def test_plain_folder_of_hr_images_makes_lr_on_the_fly(tmp_path, capsys, degradation):
    from dlsn.images import read_image

    data = plain_folder(tmp_path / "photos")
    out_json = tmp_path / "r.json"
    code = main(["--data", str(data), "--bicubic", "--scale", "3", "--degradation", degradation.lower(),
                 "--no-progress", "--json", str(out_json), "--seed", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"LR images made from the HR images with {degradation}" in printed and "photos" in printed
    result = json.loads(out_json.read_text())["results"][0]
    assert result["set"] == "photos" and result["n_images"] == 2 and result["failed"] == []
    for index, image in enumerate(result["images"]):
        hr = uint8_to_tensor(read_image(data / f"photo{index}.png"))
        hr = hr[:, : hr.shape[1] // 3 * 3, : hr.shape[2] // 3 * 3]
        lr = degrade(hr, 3, degradation, noise_sigma=15.0, generator=torch.Generator().manual_seed(4 + index))
        assert image["psnr"] == pytest.approx(psnr_y(bicubic_baseline(lr, 3), hr, 3), abs=1e-9)


def test_benchmark_layout_with_bd_degrades_its_hr_images(tmp_path, capsys):
    data = tmp_path / "data"
    make_test_set(data, "SetA", scales=(2,))
    assert main(["--data", str(data), "--bicubic", "--scale", "2", "--no-progress"]) == 0
    stored = capsys.readouterr().out
    assert "made from the HR images" not in stored  # BI: the stored LR_bicubic images
    assert main(["--data", str(data), "--bicubic", "--scale", "2", "--degradation", "BD", "--no-progress"]) == 0
    blurred = capsys.readouterr().out
    assert "LR images made from the HR images with BD for SetA" in blurred
    assert blurred.splitlines()[-1] != stored.splitlines()[-1]  # other LR, other scores


def test_folder_run_scores_every_good_image_then_lists_the_bad_ones(tmp_path, capsys):
    data = plain_folder(tmp_path / "photos")
    (data / "broken.png").write_bytes(b"not a png")
    write_image(data / "tiny.png", photo(12, 12, seed=1)[:1, :5].copy())
    rgba = np.concatenate([photo(24, 24, seed=9), np.full((24, 24, 1), 128, np.uint8)], axis=2)
    from PIL import Image

    Image.fromarray(rgba).save(data / "with_alpha.png")
    out_csv = tmp_path / "r.csv"
    assert main(["--data", str(data), "--bicubic", "--scale", "2", "--no-progress", "--csv", str(out_csv)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "dlsn.eval: note: converted to 8-bit RGB on reading: photos/with_alpha.png (RGBA, alpha dropped)" \
        in captured.out
    failures = [line for line in captured.err.splitlines() if "failed" in line]
    assert len(failures) == 1 and failures[0].startswith("dlsn.eval: failed: 2 of 5 images: photos/broken")
    assert "cannot read image" in failures[0] and "smaller than the scale 2" in failures[0]
    with out_csv.open(newline="") as handle:
        scored = [r["image"] for r in csv.DictReader(handle)]
    assert scored == ["photo0", "photo1", "with_alpha", "MEAN"]  # the good images, all of them


def test_bad_inputs_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    data = plain_folder(tmp_path / "photos")
    for content in (b"plain text\n", bytes(range(256)) * 8):
        fake = tmp_path / "fake.pt"
        fake.write_bytes(content)
        assert main(["--data", str(data), "--checkpoint", str(fake), "--no-progress"]) == 2
        out, err = capsys.readouterr()
        assert err == (f"dlsn.eval: error: {fake} is not a readable checkpoint (not written "
                       "by torch.save, or corrupt or truncated)\n")
        assert out == ""  # no note line ("LR images made ...") before the error
    assert main(["--data", str(data), "--bicubic", "--scale", "2", "--noise-sigma", "5"]) == 2
    assert capsys.readouterr().err == "dlsn.eval: error: --noise-sigma is for --degradation DN, not BI\n"
    assert main(["--data", str(tmp_path / "empty_place"), "--bicubic", "--scale", "2"]) == 2
    assert "data folder not found" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the scoring")

    monkeypatch.setattr(evaluation, "psnr_y", bug)
    with pytest.raises(RuntimeError, match="a bug in the scoring"):
        main(["--data", str(data), "--bicubic", "--scale", "2", "--no-progress"])


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    data = plain_folder(tmp_path / "photos")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_dataset", interrupted)
    out_json = tmp_path / "r.json"
    assert main(["--data", str(data), "--bicubic", "--scale", "2", "--json", str(out_json)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "dlsn.eval: interrupted; nothing written (scores are written when every set is done)"
    assert not out_json.exists()


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert_each_default_once(capsys.readouterr().out)
