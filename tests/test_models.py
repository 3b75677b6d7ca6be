"""The GLA block, DLSN, EDSR+GLA and the presets (CPU, reference attention backend)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dlsn_kernels
from dlsn.models import DLSN, GLA, PRESETS, Preset, TrainingRecipe, build_model, model_from_config
from dlsn_kernels import reference

ROOT = Path(__file__).resolve().parents[1]
# The authors' parameter lists: tests/data in the repository, else the shared reference folder.
REFERENCE_DIRS = [
    Path(os.environ.get("DLSN_REFERENCE_DIR", ROOT / "tests" / "data")),
    ROOT / "tests" / "data",
    ROOT.parent / "shared" / "reference",
]
# Header lines of reference/official_dlsn_x*_state_dict.txt: parameters of the authors' models,
# their unused scalar ``a`` included.
OFFICIAL_PARAMETERS = {2: 69_842_588, 3: 72_792_988, 4: 72_202_908}
OFFICIAL_TAIL = {
    2: {"tail.0.0.weight": (1024, 256, 3, 3)},
    3: {"tail.0.0.weight": (2304, 256, 3, 3)},
    4: {"tail.0.0.weight": (1024, 256, 3, 3), "tail.0.2.weight": (1024, 256, 3, 3)},
}


def official_list(scale: int) -> dict[str, tuple[int, ...]] | None:
    """``name -> shape`` from the authors' list for ``scale``, or None when the file is not here."""
    for folder in REFERENCE_DIRS:
        path = folder / f"official_dlsn_x{scale}_state_dict.txt"
        if path.is_file():
            entries = {}
            for line in path.read_text().splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                name, shape = line.split(" ", 1)
                entries[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
            return entries
    return None


def meta_model(preset: str, scale: int, **overrides):
    with torch.device("meta"):
        return build_model(preset, scale, **overrides)


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Names and sizes.


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paper_parameter_count_equals_official_minus_unused_scalar(scale):
    assert n_parameters(meta_model("paper", scale)) == OFFICIAL_PARAMETERS[scale] - 1


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paper_tail_and_head_shapes(scale):
    shapes = {k: tuple(v.shape) for k, v in meta_model("paper", scale).state_dict().items()}
    for name, shape in OFFICIAL_TAIL[scale].items():
        assert shapes[name] == shape
    assert shapes["head.0.weight"] == (256, 3, 3, 3)
    assert shapes["body.10.weight"] == (256, 256, 3, 3)
    assert shapes["body.9.body.4.fc.2.weight"] == (128, 128)
    assert shapes["body.0.body.4.conv_match.0.weight"] == (64, 256, 3, 3)
    assert "a" not in shapes


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paper_names_and_shapes_equal_official_list(scale):
    official = official_list(scale)
    if official is None:
        pytest.skip("needs reference/official_dlsn_x*_state_dict.txt (tests/data or ../shared/reference)")
    assert official.pop("a") == (1,)
    ours = {k: tuple(v.shape) for k, v in meta_model("paper", scale).state_dict().items()}
    assert list(ours) == list(official)  # same names in the same order
    assert ours == official


def test_small_preset_is_the_papers_18_27m_model():
    # The paper: "DLSN (C=128, about 18.27M parameters)", compared on Manga109 x4.
    assert n_parameters(meta_model("small", 4)) == 18_268_763
    assert n_parameters(meta_model("small", 3)) == 18_416_347


def test_edsr_gla_is_edsr_baseline_plus_one_gla():
    model = meta_model("edsr_gla", 2)
    assert isinstance(model.body[8], GLA)
    assert sum(isinstance(m, GLA) for m in model.modules()) == 1
    gla = sum(p.numel() for p in model.body[8].parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # EDSR-baseline x2 without the frozen mean shifts: head 1,792 + 32 convs x 36,928 + body conv
    # 36,928 + upsampler 147,712 + last conv 1,731 = 1,369,859 (the "1.37M" of the EDSR paper).
    assert trainable - gla == 1_369_859


def test_every_gla_has_the_authors_layers():
    gla = GLA(32, reduction=4, chunk_size=16)
    names = {k: tuple(v.shape) for k, v in gla.state_dict().items()}
    assert names == {
        "conv_match.0.weight": (8, 32, 3, 3),
        "conv_match.0.bias": (8,),
        "conv_assembly.0.weight": (32, 32, 3, 3),
        "conv_assembly.0.bias": (32,),
        "conv_assembly_fc.0.weight": (32, 32, 3, 3),
        "conv_assembly_fc.0.bias": (32,),
        "fc.0.weight": (16, 32),
        "fc.0.bias": (16,),
        "fc.2.weight": (16, 16),
        "fc.2.bias": (16,),
    }


# ----------------------------------------------------------------------------------------------
# Forward passes.


def test_a_preset_is_a_model_config_and_its_training_recipe():
    for name, preset in PRESETS.items():
        assert isinstance(preset.training, TrainingRecipe), name
        assert "scale" not in preset.model, name
    with pytest.raises(TypeError, match="training"):
        Preset(model={"arch": "dlsn"})  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="training must be a TrainingRecipe"):
        Preset(model={"arch": "dlsn"}, training={"lr": 1e-3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="arch"):
        Preset(model={"arch": "unet"}, training=PRESETS["tiny"].training)
    with pytest.raises(TypeError):  # the table cannot be edited through a preset
        PRESETS["tiny"].model["n_feats"] = 8  # type: ignore[index]


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_forward_shape_of_every_preset(preset, scale):
    torch.manual_seed(0)
    # The big presets keep their width (what the shapes depend on) but run one group / few blocks.
    depth = {
        "paper": {"n_resgroups": 1, "n_resblocks": 1},
        "small": {"n_resgroups": 1, "n_resblocks": 1},
        "edsr_gla": {"n_resblocks": 2, "gla_position": 1},
    }.get(preset, {})
    model = build_model(preset, scale, backend="reference", **depth).eval()
    x = torch.rand(1, 3, 7, 5) * 255
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 7 * scale, 5 * scale)
    assert torch.isfinite(y).all()


def test_dlsn_output_range_convention():
    # With zero weights everywhere the network is sub_mean -> 0 -> add_mean: the DIV2K mean * 255.
    model = build_model("tiny", 2, backend="reference").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mean" not in name:
                p.zero_()
        y = model(torch.rand(1, 3, 4, 4) * 255)
    expected = torch.tensor([0.4488, 0.4371, 0.4040]) * 255
    assert torch.allclose(y[0, :, 0, 0], expected, atol=1e-4)


def test_gla_equals_composition_of_reference_functions():
    torch.manual_seed(1)
    gla = GLA(16, reduction=4, chunk_size=8, n_hashes=2, backend="reference").double().eval()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)  # L = 35: not a multiple of K, so padding
    y = gla(x, generator=torch.Generator().manual_seed(123))

    n, c, h, w = x.shape
    length = h * w
    # Authors' layout: view(N, C, H*W).permute(0, 2, 1).
    xm = gla.conv_match(x).view(n, -1, length).permute(0, 2, 1).contiguous()
    v = gla.conv_assembly(x).view(n, c, length).permute(0, 2, 1).contiguous()
    f = gla.conv_assembly_fc(x).view(n, c, length).permute(0, 2, 1)
    lss = gla.fc(f).contiguous()
    n_buckets = dlsn_kernels.n_buckets_for(length, 8)
    assert n_buckets == 4
    rot = dlsn_kernels.random_rotations(4, 2, n_buckets, generator=torch.Generator().manual_seed(123))
    attention = reference.gla_attention(xm, v, lss, rot.double(), 8)
    expected = attention.permute(0, 2, 1).view(n, c, h, w) + x
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_gla_gradients_reach_all_four_layers():
    torch.manual_seed(2)
    gla = GLA(8, reduction=2, chunk_size=4, n_hashes=2, backend="reference")
    x = torch.randn(1, 8, 4, 5, requires_grad=True)
    gla(x).square().mean().backward()
    for name, p in gla.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eval_is_reproducible_with_a_seed_and_fresh_without():
    torch.manual_seed(3)
    model = build_model("tiny", 2, backend="reference", chunk_size=8).eval()
    x = torch.rand(1, 3, 9, 8) * 255  # L = 72 positions, 8 buckets: rotations matter
    with torch.no_grad():
        model.set_inference(seed=7)
        first, again = model(x), model(x)
        model.set_inference(seed=8)
        other = model(x)
        model.set_inference(seed=None)  # the authors' behaviour: fresh rotations per call
        fresh_a, fresh_b = model(x), model(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(fresh_a, fresh_b)


@pytest.mark.parametrize("backend", ["reference", None])
def test_eval_mode_is_bitwise_repeatable_by_default(backend):
    """Issue 32.2: no set_inference call, two eval-mode calls give bitwise the same output, for the block alone,
    for a network of the user's own and for DLSN; a rebuilt network with the same weights gives the same too.
    backend None: the automatic choice (the compiled CPU kernels here)."""
    if backend is None:
        try:
            import dlsn_kernels._C  # noqa: F401
        except ImportError as error:
            pytest.skip(f"compiled kernels not built: {error}")
    torch.manual_seed(11)
    x = torch.randn(2, 16, 9, 10)  # L = 90, 10 buckets: the rotations matter
    gla = GLA(16, reduction=4, chunk_size=8, n_hashes=2, backend=backend).eval()
    own = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), GLA(16, 4, 8, 2, backend=backend)).eval()
    model = build_model("tiny", 2, backend=backend, chunk_size=8).eval()
    image = torch.rand(1, 3, 9, 8) * 255
    with torch.no_grad():
        assert torch.equal(gla(x), gla(x))
        assert torch.equal(own(x), own(x))
        first = model(image)
        assert torch.equal(first, model(image))
        rebuilt = build_model("tiny", 2, backend=backend, chunk_size=8).eval()
        rebuilt.load_state_dict(model.state_dict())
        assert torch.equal(first, rebuilt(image))
        # The default is the tools' --seed default: set_inference(seed=0).
        model.set_inference(seed=0)
        assert torch.equal(first, model(image))
        # Fresh draws on request differ from call to call, and from the default.
        model.set_inference(seed=None)
        fresh_a, fresh_b = model(image), model(image)
    assert not torch.equal(fresh_a, fresh_b) and not torch.equal(fresh_a, first)


def test_training_rotations_still_come_from_the_global_generator():
    """Train mode is unchanged: every call draws from torch's global generator (the inference seed is unused)."""
    gla = GLA(16, reduction=4, chunk_size=8, n_hashes=2, backend="reference").train()
    assert gla.inference_seed == 0
    x = torch.randn(1, 16, 8, 9)
    torch.manual_seed(5)
    global_draw = gla(x)
    again = gla(x)  # the global generator moved on
    explicit = gla(x, generator=torch.Generator().manual_seed(5))  # the same mt19937 stream as manual_seed(5)
    assert torch.equal(global_draw, explicit)
    assert not torch.equal(global_draw, again)


def test_inference_draw_is_the_documented_function_of_block_seed_and_bucket_count():
    """gla.py's docstring states the eval-mode draw (exporters rebuild it): block i of a network under base seed
    S uses Generator().manual_seed(block_seed(S, i)) and random_rotations(Cm, R, n_buckets_for(L, K))."""
    from dlsn.models.gla import block_seed

    model = build_model("tiny", 2, backend="reference", chunk_size=8).eval()
    blocks = [m for m in model.modules() if isinstance(m, GLA)]
    assert [b.inference_seed for b in blocks] == [block_seed(0, i) for i in range(len(blocks))] == [0, 1]
    model.set_inference(n_hashes=1, seed=123)
    for index, block in enumerate(blocks):
        for length in (7, 40, 100):
            expected = dlsn_kernels.random_rotations(
                block.channels // block.reduction, 1, dlsn_kernels.n_buckets_for(length, 8),
                generator=torch.Generator().manual_seed(block_seed(123, index)))
            assert torch.equal(block.rotations(length, torch.device("cpu")), expected)
            assert torch.equal(block.rotations(length, torch.device("cpu")), expected)  # every call
    # Seeds keep manual_seed's range and meaning: s and s - 2**64 seed the generator alike.
    blocks[0].set_inference(seed=2**64 - 1)
    high = blocks[0].rotations(50, torch.device("cpu"))
    blocks[0].set_inference(seed=-1)
    assert torch.equal(high, blocks[0].rotations(50, torch.device("cpu")))
    with pytest.raises(ValueError, match="seed"):
        blocks[0].set_inference(seed=2**64)


def test_eval_mode_with_a_seed_traces_without_graph_breaks():
    """The seeded draw is an opaque custom op, so the default (seeded) evaluation does not break the graph."""
    gla = GLA(16, reduction=4, chunk_size=8, n_hashes=2, backend="reference").eval()
    x = torch.randn(1, 16, 6, 6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gla)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    with torch.no_grad():
        assert torch.equal(torch.compile(gla, backend="eager", fullgraph=True)(x), gla(x))


def test_gla_defaults_are_the_papers():
    gla = GLA(64)
    assert (gla.reduction, gla.chunk_size, gla.n_hashes) == (4, 128, 3)
    assert tuple(gla.fc[2].weight.shape) == (128, 128)  # the authors' released weights: fc is 128 wide


def nlsn_state_dict(n_resblocks: int = 32, n_feats: int = 256) -> dict[str, torch.Tensor]:
    """Names and shapes (meta tensors) of the authors' NLSN (HarukiYqM/Non-Local-Sparse-Attention, nlsn.py):
    an attention block before the residual blocks and one after every 8th, x2 tail."""
    state = {"sub_mean.weight": (3, 3, 1, 1), "sub_mean.bias": (3,), "add_mean.weight": (3, 3, 1, 1),
             "add_mean.bias": (3,), "head.0.weight": (n_feats, 3, 3, 3), "head.0.bias": (n_feats,)}

    def attention(i: int) -> None:  # BasicBlock (a Sequential): conv_match 3x3, conv_assembly 1x1
        for part, out, size in (("conv_match", n_feats // 4, 3), ("conv_assembly", n_feats, 1)):
            state[f"body.{i}.{part}.0.weight"] = (out, n_feats, size, size)
            state[f"body.{i}.{part}.0.bias"] = (out,)

    index = 0
    attention(index)
    for block in range(n_resblocks):
        index += 1
        for conv in (0, 2):
            state[f"body.{index}.body.{conv}.weight"] = (n_feats, n_feats, 3, 3)
            state[f"body.{index}.body.{conv}.bias"] = (n_feats,)
        if (block + 1) % 8 == 0:
            index += 1
            attention(index)
    state[f"body.{index + 1}.weight"] = (n_feats, n_feats, 3, 3)
    state[f"body.{index + 1}.bias"] = (n_feats,)
    state.update({"tail.0.0.weight": (4 * n_feats, n_feats, 3, 3), "tail.0.0.bias": (4 * n_feats,),
                  "tail.1.weight": (3, n_feats, 3, 3), "tail.1.bias": (3,)})
    return {k: torch.empty(v, device="meta") for k, v in state.items()}


def test_nlsn_weights_are_recognised_and_load():
    """NLSN's state dicts are read as NLSN (not DLSN) by their key layout, the README run's settings assumed,
    and every key and shape fits the network built from that config."""
    from dlsn.models import CheckpointError, infer_official_config
    from dlsn.models.checkpoint import from_state_dict
    from dlsn.models.presets import model_from_config

    state = nlsn_state_dict()
    with pytest.raises(CheckpointError, match="not a DLSN state dict"):
        infer_official_config(state)
    config = from_state_dict(state)["config"]
    assert config == {"arch": "nlsn", "scale": 2, "n_resblocks": 32, "n_feats": 256, "chunk_size": 144,
                      "n_hashes": 4, "res_scale": 0.1, "reduction": 4, "rgb_range": 255.0, "n_colors": 3}
    with torch.device("meta"):
        model = model_from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in state.items()}


def test_seed_does_not_fix_training_rotations_and_blocks_get_distinct_seeds():
    model = build_model("tiny", 2, backend="reference")
    model.set_inference(n_hashes=1, seed=5)
    blocks = [m for m in model.modules() if isinstance(m, GLA)]
    assert len(blocks) == 2
    assert blocks[0].inference_seed != blocks[1].inference_seed
    assert [b.rounds() for b in blocks] == [2, 2]  # training mode keeps the preset's rounds
    model.eval()
    assert [b.rounds() for b in blocks] == [1, 1]
    assert blocks[0].rotations(100, torch.device("cpu")).shape == (8, 1, 2)


def test_inference_hash_rounds_change_the_output():
    torch.manual_seed(4)
    model = build_model("tiny", 2, backend="reference", chunk_size=8).eval()
    x = torch.rand(1, 3, 8, 8) * 255
    with torch.no_grad():
        model.set_inference(n_hashes=1, seed=0)
        one = model(x)
        model.set_inference(n_hashes=4, seed=0)
        four = model(x)
    assert one.shape == four.shape and not torch.equal(one, four)


def test_set_backend_reaches_every_gla():
    model = build_model("tiny", 3)
    model.set_backend("reference")
    assert {m.backend for m in model.modules() if isinstance(m, GLA)} == {"reference"}


def test_autocast_bfloat16_on_cpu_runs_through_gla():
    torch.manual_seed(5)
    model = build_model("tiny", 2, backend="reference").eval()
    x = torch.rand(1, 3, 6, 6) * 255
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    with torch.no_grad():
        y32 = model.float()(x)
    assert y.shape == y32.shape and torch.isfinite(y).all()


def test_config_round_trip_and_bad_configs():
    model = build_model("tiny", 3, n_hashes=1)
    config = model.config
    assert config["arch"] == "dlsn" and config["scale"] == 3 and config["n_hashes"] == 1
    rebuilt = model_from_config(config)
    assert isinstance(rebuilt, DLSN) and rebuilt.config == config
    assert DLSN.from_config(config).config == config
    with pytest.raises(ValueError, match="does not take"):
        model_from_config({**config, "n_colours": 3})
    with pytest.raises(ValueError, match="arch"):
        model_from_config({**config, "arch": "rcan"})
    with pytest.raises(ValueError, match="scale"):
        build_model("tiny", 5)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge", 2)
    with pytest.raises(ValueError, match="no settings"):
        build_model("tiny", 2, n_feat=3)


def test_bad_inputs_name_the_problem():
    model = build_model("tiny", 2, backend="reference")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        GLA(10, reduction=4)
    with pytest.raises(ValueError, match="chunk_size"):
        GLA(8, chunk_size=0)
    with pytest.raises(ValueError, match="seed"):
        model.set_inference(seed=1.5)


def test_default_backend_follows_the_kernel_package(monkeypatch):
    """backend=None leaves the choice to dlsn_kernels: the compiled CPU kernels when they are built, else an error
    that points to the reference."""
    monkeypatch.delenv("DLSN_BACKEND", raising=False)
    gla = GLA(8, reduction=2, chunk_size=4, n_hashes=1)
    x = torch.randn(1, 8, 3, 3)
    cpu_missing = dlsn_kernels.available_backends("cpu")["cpu"].reason
    if cpu_missing is not None:
        with pytest.raises(dlsn_kernels.BackendUnavailableError, match="backend='reference'"):
            gla(x)
        return
    y = gla(x, generator=torch.Generator().manual_seed(3))
    gla.backend = "cpu"
    assert torch.equal(y, gla(x, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_gla_compiled_backend_matches_reference(backend):
    device = "cuda" if backend in ("triton", "cuda") else "cpu"
    reason = (
        dlsn_kernels.available_backends(device)[backend].reason
        if device == "cpu" or torch.cuda.is_available()
        else "needs a GPU"
    )
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    torch.manual_seed(7)
    dtype = torch.float64 if device == "cpu" else torch.float32
    gla = GLA(16, reduction=4, chunk_size=8, n_hashes=2).to(device, dtype)
    x = torch.randn(2, 16, 5, 7, dtype=dtype, device=device, requires_grad=True)
    results = []
    for name in ("reference", backend):
        gla.backend = name
        gla.zero_grad()
        x.grad = None
        y = gla(x, generator=torch.Generator().manual_seed(11))
        (y * torch.linspace(-1, 1, y.numel(), device=device, dtype=dtype).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in gla.parameters()]))
    (y_ref, gx_ref, gp_ref), (y_k, gx_k, gp_k) = results
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y_k, y_ref, **tol)
    torch.testing.assert_close(gx_k, gx_ref, **tol)
    for a, b in zip(gp_k, gp_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
