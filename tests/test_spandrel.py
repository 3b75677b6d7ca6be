"""spandrel loads our files and the authors' state dicts once ``dlsn.integrations.spandrel`` is imported."""

from __future__ import annotations

import pytest
import spandrel
import torch
from safetensors.torch import save_file

import dlsn.integrations.spandrel as dlsn_spandrel
from dlsn.models import build_model
from dlsn.models.checkpoint import from_state_dict, load_model, save_checkpoint, save_safetensors
from dlsn.models.dlsn import DLSN
from tests.test_models import official_list


def ours(path):
    """load_model's network on a [0, 1] image, seeded as the descriptor is."""
    model, _ = load_model(path)
    model.set_inference(seed=0)
    rgb = float(model.config["rgb_range"])
    return model, lambda x: (model(x * rgb) / rgb).clamp(0, 1)


def files(tmp_path):
    """(path, config) of each kind of file spandrel should load."""
    torch.manual_seed(0)
    made = []
    for preset in ("tiny", "cpu_default"):
        net = build_model(preset, 2)
        for param in net.parameters():  # cpu_default starts with a zero last conv: make it do something
            param.data.add_(torch.randn_like(param) * 0.01)
        made.append((save_safetensors(tmp_path / f"{preset}.safetensors", net, preset=preset), net.config))
        made.append((save_checkpoint(tmp_path / f"{preset}_best.pt", net), net.config))
    authors = build_model("tiny", 3, n_hashes=3)  # a bare state dict says nothing of n_hashes: theirs is 3
    state = {**authors.state_dict(), "a": torch.zeros(1)}
    torch.save(state, tmp_path / "authors_x3.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "authors_x3.safetensors"))
    made += [(tmp_path / "authors_x3.pth", authors.config), (tmp_path / "authors_x3.safetensors", authors.config)]
    return made


# spandrel tries a .pt as TorchScript first, which torch now warns about
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_spandrel_runs_the_same_network_as_load_model(tmp_path):
    x = torch.rand(1, 3, 20, 18)
    for path, config in files(tmp_path):
        descriptor = spandrel.ModelLoader().load_from_file(path)
        assert isinstance(descriptor, spandrel.ImageModelDescriptor), path.name
        assert descriptor.architecture.id == "DLSN" and descriptor.purpose == "SR"
        assert descriptor.scale == config["scale"] and descriptor.model.config == config, path.name
        assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
        assert descriptor.supports_bfloat16 and descriptor.tiling == spandrel.ModelTiling.DISCOURAGED
        assert descriptor.size_requirements.minimum == 2
        model, run = ours(path)
        assert type(descriptor.model) is type(model)
        with torch.no_grad():
            torch.testing.assert_close(descriptor(x), run(x), rtol=0, atol=1e-5, msg=path.name)
        assert descriptor(x).shape == (1, 3, 20 * config["scale"], 18 * config["scale"])


def test_detection_reads_keys_and_shapes_of_the_authors_layout():
    for scale in (2, 3, 4):
        entries = official_list(scale)
        if entries is None:
            pytest.skip("needs tests/data/official_dlsn_x*_state_dict.txt")
        state = {name: torch.empty(shape, device="meta") for name, shape in entries.items()}
        assert dlsn_spandrel.detect(state)  # shapes only (meta tensors): no 70M weights to load
        assert from_state_dict(state)["config"]["scale"] == scale
    assert not dlsn_spandrel.detect({"conv.weight": torch.zeros(3, 3, 3, 3)})
    assert not dlsn_spandrel.detect({})


def test_registered_once_and_detected_first():
    registry = spandrel.MAIN_REGISTRY
    assert registry.architectures("detection")[0].architecture.id == "DLSN"
    assert dlsn_spandrel.register() is registry.get("DLSN")
    fresh = spandrel.ArchRegistry()
    dlsn_spandrel.register(fresh)
    net = DLSN(2, n_feats=8, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=1)
    descriptor = fresh.load({k: v for k, v in net.state_dict().items()})
    assert descriptor.model.config == {**net.config, "n_hashes": 3, "res_scale": 0.1}  # the authors' defaults
