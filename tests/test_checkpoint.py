"""Checkpoints: our format (round trip, resume, atomic writes, errors) and the authors' state dicts."""

from __future__ import annotations

import pytest
import torch

from dlsn.errors import UserInputError
from dlsn.models import build_model, checkpoint
from dlsn.models.checkpoint import (
    CheckpointError,
    infer_official_config,
    load_checkpoint,
    load_model,
    load_weights,
    resume,
    save_checkpoint,
)
from tests.test_models import OFFICIAL_TAIL, official_list


def tiny(scale: int = 2, **overrides):
    return build_model("tiny", scale, backend="reference", **overrides)


def seeded_output(model, x, seed=0):
    # Same weights in two module instances may differ in the last float32 bit (CPU convolution
    # paths depend on memory alignment), so outputs are compared with a tolerance.
    model.eval().set_inference(seed=seed)
    with torch.no_grad():
        return model(x)


def trained_run(tmp_path):
    """A tiny model after one Adam step, with a scheduler, saved at step 1."""
    torch.manual_seed(0)
    model = tiny()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    lr, hr = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 12, 12) * 255
    torch.nn.functional.l1_loss(model(lr), hr).backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "run" / "last.pt"
    extra = {"epoch": 3, "rng": torch.get_rng_state(), "history": [1.5, 1.25]}
    save_checkpoint(path, model, model.config, optimizer, scheduler, step=1, extra=extra)
    return model, optimizer, scheduler, path


# ----------------------------------------------------------------------------------------------
# Our format.


def test_round_trip_keeps_weights_and_resume_information(tmp_path):
    model, optimizer, scheduler, path = trained_run(tmp_path)
    x = torch.rand(1, 3, 7, 6) * 255

    loaded, config = load_model(path)
    assert config == model.config
    assert not loaded.training
    torch.testing.assert_close(seeded_output(loaded, x), seeded_output(model, x), rtol=0, atol=1e-3)

    fresh = tiny()
    fresh_optimizer = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=10, gamma=0.5)
    restored = resume(path, fresh, fresh_optimizer, fresh_scheduler)
    assert restored["step"] == 1
    assert restored["extra"]["epoch"] == 3 and restored["extra"]["history"] == [1.5, 1.25]
    assert restored["extra"]["rng"].dtype == torch.uint8 and restored["extra"]["rng"].numel() > 0
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    for group_a, group_b in zip(
        optimizer.state_dict()["state"].values(), fresh_optimizer.state_dict()["state"].values(), strict=True
    ):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(group_a[key], group_b[key])
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_file_holds_only_plain_containers(tmp_path):
    _, _, _, path = trained_run(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dlsn-checkpoint" and raw["version"] == 1
    assert set(raw) == {"format", "version", "config", "model", "optimizer", "scheduler", "step", "extra"}


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    model, _, _, path = trained_run(tmp_path)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_save_refuses_objects_that_would_not_load_back(tmp_path):
    model = tiny()
    path = tmp_path / "x.pt"
    with pytest.raises(TypeError, match=r"extra\['callback'\]"):
        save_checkpoint(path, model, extra={"callback": print})
    assert not path.exists()
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(path, model, step=-1)


def test_corrupt_truncated_and_missing_files(tmp_path):
    _, _, _, path = trained_run(tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_model(bad)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello, this is a text file\n", None),  # torch's unpickler: IndexError / KeyError before
        (bytes(range(256)) * 16, None),  # random bytes
        (b"\x80\x02garbage", "Unsupported operand"),  # a pickle header, then nothing valid
    ],
    ids=["text", "binary", "bad-pickle"],
)
def test_files_that_are_not_checkpoints_give_one_line(tmp_path, content, reason):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(bad)
    message = str(error.value)
    assert isinstance(error.value, UserInputError) and isinstance(error.value, RuntimeError)
    assert message.startswith(f"{bad} is not a readable checkpoint") and "\n" not in message
    assert "weights_only" not in message and "file an issue" not in message
    if reason:
        assert reason in message


class Arbitrary:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as error:
        load_checkpoint(path)
    assert "Arbitrary" in str(error.value) and "\n" not in str(error.value)


def test_scale_and_architecture_mismatches(tmp_path):
    _, _, _, path = trained_run(tmp_path)
    with pytest.raises(CheckpointError, match="x2 model, but x4"):
        load_model(path, scale=4)
    assert load_model(path, scale=2)[1]["scale"] == 2
    with pytest.raises(CheckpointError, match="another architecture.*n_feats"):
        resume(path, tiny(n_feats=16))
    with pytest.raises(CheckpointError, match="missing keys: body.2"):
        load_weights(tiny(n_resgroups=3), load_checkpoint(path)["model"])
    with pytest.raises(CheckpointError, match="shape mismatches.*tail.0.0.weight"):
        load_weights(tiny(scale=3), load_checkpoint(path)["model"])


def test_non_strict_load_skips_the_tail_for_a_new_scale(tmp_path):
    _, _, _, path = trained_run(tmp_path)
    x3 = tiny(scale=3)
    skipped = load_weights(x3, load_checkpoint(path)["model"], strict=False)
    assert skipped == ["tail.0.0.bias", "tail.0.0.weight"]


def test_resume_needs_the_states_it_is_asked_for(tmp_path):
    model = tiny()
    path = save_checkpoint(tmp_path / "weights_only.pt", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        resume(path, tiny(), optimizer)


# ----------------------------------------------------------------------------------------------
# The authors' bare state dicts.


def official_meta_state(scale: int) -> dict[str, torch.Tensor]:
    entries = official_list(scale)
    if entries is None:
        pytest.skip("needs reference/official_dlsn_x*_state_dict.txt (tests/data or ../shared/reference)")
    return {name: torch.empty(shape, device="meta") for name, shape in entries.items()}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_official_architecture_is_inferred_from_shapes(scale):
    state = official_meta_state(scale)
    config = infer_official_config(state)
    assert config == {
        "arch": "dlsn", "scale": scale, "n_feats": 256, "n_resgroups": 10, "n_resblocks": 4,
        "reduction": 4, "chunk_size": 128, "n_hashes": 3, "res_scale": 0.1, "rgb_range": 255.0,
    }  # fmt: skip
    with torch.device("meta"):
        model = build_model("paper", scale)
    assert load_weights(model, state) == []  # strict: every name and shape fits, `a` ignored


def test_official_tail_facts_without_the_reference_files():
    # Same inference on a state dict assembled from the tail shapes alone (always runs).
    with torch.device("meta"):
        for scale in (2, 3, 4):
            state = build_model("paper", scale).state_dict()
            state["a"] = torch.empty(1)
            assert {k: tuple(state[k].shape) for k in OFFICIAL_TAIL[scale]} == OFFICIAL_TAIL[scale]
            assert infer_official_config(state)["scale"] == scale


def test_official_state_dict_file_loads_without_renaming(tmp_path):
    torch.manual_seed(6)
    authors = tiny(n_hashes=3)  # the authors' rounds: a bare state dict cannot say n_hashes
    state = dict(authors.state_dict())
    state["a"] = torch.zeros(1)  # their unused scalar
    for name, wrapped in (
        ("bare", state),
        ("module", {f"module.{k}": v for k, v in state.items()}),
        ("wrapped", {"state_dict": state}),
    ):
        path = tmp_path / f"{name}.pt"
        torch.save(wrapped, path)
        model, config = load_model(path)
        assert config == authors.config, name
        x = torch.rand(1, 3, 6, 5) * 255
        torch.testing.assert_close(seeded_output(model, x), seeded_output(authors, x), rtol=0, atol=1e-3)
    assert load_checkpoint(tmp_path / "bare.pt")["optimizer"] is None


def test_rgb_range_is_read_from_the_mean_shift(tmp_path):
    model = tiny(rgb_range=1.0, n_hashes=3)
    torch.save(model.state_dict(), tmp_path / "range1.pt")
    assert load_model(tmp_path / "range1.pt")[1]["rgb_range"] == 1.0


def test_state_dict_of_another_network_is_refused(tmp_path):
    path = tmp_path / "rcan.pt"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a DLSN state dict.*head.0.weight"):
        load_model(path)
    state = dict(tiny(n_hashes=3).state_dict())
    state["body.0.extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected keys: body.0.extra.weight"):
        load_model(path)


# ----------------------------------------------------------------------------------------------
# safetensors, and the config stored with the weights.


def test_safetensors_round_trip_with_metadata(tmp_path):
    from safetensors import safe_open

    model, _, _, last = trained_run(tmp_path)
    path = checkpoint.save_safetensors(tmp_path / "model.safetensors", model, preset="tiny")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "dlsn-safetensors" and metadata["preset"] == "tiny"
    assert metadata["scale"] == "2" and checkpoint.json.loads(metadata["config"]) == model.config
    loaded, config = load_model(path)
    assert config == model.config
    x = torch.rand(1, 3, 7, 6) * 255
    torch.testing.assert_close(seeded_output(loaded, x), seeded_output(model, x), rtol=0, atol=1e-3)
    assert load_checkpoint(path)["extra"]["preset"] == "tiny"
    # the .pt carries its config inside the model state too (for loaders that keep only the weights),
    # and load_checkpoint takes it out again
    raw = torch.load(last, weights_only=True)["model"]
    assert checkpoint.config_from_tensor(raw[checkpoint.CONFIG_KEY]) == model.config
    assert checkpoint.CONFIG_KEY not in load_checkpoint(last)["model"]
    bare = tmp_path / "weights.pth"
    torch.save(raw, bare)  # what spandrel's unwrapping leaves: the config still says dlsn tiny
    assert load_model(bare)[1] == model.config


def test_authors_state_dict_in_safetensors_and_damaged_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    authors = tiny(n_hashes=3)
    state = {k: v.contiguous() for k, v in authors.state_dict().items()}
    state["a"] = torch.zeros(1)
    save_file(state, str(tmp_path / "official.safetensors"))
    model, config = load_model(tmp_path / "official.safetensors")
    assert config == authors.config
    x = torch.rand(1, 3, 6, 5) * 255
    torch.testing.assert_close(seeded_output(model, x), seeded_output(authors, x), rtol=0, atol=1e-3)
    # recognised by content, so the name does not matter; a truncated one is one line
    data = (tmp_path / "official.safetensors").read_bytes()
    (tmp_path / "renamed.pt").write_bytes(data)
    assert load_model(tmp_path / "renamed.pt")[1] == authors.config
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")
