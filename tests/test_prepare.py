"""``python -m dlsn.data.prepare``: the memory-mapped DIV2K copy gives the same items, and training uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dlsn.data import prepare as P
from dlsn.data import samples
from dlsn.data.datasets import PairedFolderDataset
from dlsn.images import write_image
from tests.test_train import TINY, run


def div2k(root, n_train=3, n_valid=2, scale=2):
    """A DIV2K-layout folder of crops of the embedded photos, LR made by striding (enough to test I/O)."""
    photo = samples.load_sample("astronaut")
    for split, count in (("train", n_train), ("valid", n_valid)):
        for i in range(count):
            stem = f"{i + 1 + (800 if split == 'valid' else 0):04d}"
            hr = np.ascontiguousarray(photo[i * 40:i * 40 + 70, i * 30:i * 30 + 84])  # 84x70: not cropped to x2
            write_image(root / f"DIV2K_{split}_HR" / f"{stem}.png", hr)
            write_image(root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}" / f"{stem}x{scale}.png",
                        np.ascontiguousarray(hr[::scale, ::scale]))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = div2k(tmp_path_factory.mktemp("div2k"))
    out = tmp_path_factory.mktemp("prepared")
    assert P.main([str(root), str(out)]) == 0
    return root, out


def test_prepared_items_equal_the_png_folder_items(prepared):
    root, out = prepared
    manifest = json.loads((out / "prepared.json").read_text())
    assert set(manifest["splits"]) == {"train", "valid"} and set(manifest["splits"]["train"]["lr"]) == {"2"}
    for split, train in (("train", True), ("valid", False), ("train", False)):
        ours = P.PreparedDataset(out, 2, split, train=train, patch_size=16)
        theirs = PairedFolderDataset.from_div2k(root, 2, split, train=train, patch_size=16)
        assert ours.names == theirs.names and len(ours) == len(theirs)
        for i in range(len(ours)):
            torch.manual_seed(i)  # the same random patch and flip
            a = ours[i]
            torch.manual_seed(i)
            b = theirs[i]
            assert a["name"] == b["name"]
            assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"]), (split, i)
    # a mapped data set pickles without its pixels (data-loader workers map the file themselves)
    import pickle

    copy = pickle.loads(pickle.dumps(P.PreparedDataset(out, 2, "train", patch_size=16)))
    assert copy.hr._map is None and copy[0]["hr"].shape == (3, 32, 32)


def test_training_detects_and_uses_the_prepared_folder(prepared, tmp_path, capsys):
    _, out = prepared
    code, printed = run(["--data", out, "--max-steps", 2, "--val-every", 2, "--val-images", 1, "--out",
                         tmp_path / "run", *TINY], capsys)
    assert code == 0
    assert "prepared DIV2K" in printed and "memory-mapped" in printed and "validation on 1 of valid" in printed
    with pytest.raises(P.PrepareError, match="no x3 LR images.*--scales 3"):
        P.PreparedDataset(out, 3)


def test_missing_layouts_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert P.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "DIV2K_train_HR" in capsys.readouterr().err
    code, _ = run(["--data", tmp_path / "empty", "--max-steps", 1, *TINY])
    error = capsys.readouterr().err
    assert code == 2 and "DIV2K_train_LR_bicubic/X<s>/" in error and "prepared.json" in error
    hr_only = tmp_path / "hr_only"
    write_image(hr_only / "DIV2K_train_HR" / "0001.png", np.zeros((8, 8, 3), np.uint8))
    assert P.main([str(hr_only), str(tmp_path / "out2"), "--scales", "2"]) == 2
    assert "DIV2K_train_LR_bicubic/X2" in capsys.readouterr().err
