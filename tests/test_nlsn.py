"""NLSA / NLSN on the GLA kernels (dlsn.models.nlsn).

The parity tests compare the whole NLSN network against the authors' NonLocalSparseAttention
(HarukiYqM/Non-Local-Sparse-Attention, src/model/attention.py) re-written here their way: one sort over
all rounds with offsets, gather, pad with the last sorted rows, chunks, adjacent chunks by concatenation,
einsum scores, logsumexp, unsort, softmax over rounds. Only two changes, both to make a comparison
possible: the rotations are given (theirs are drawn inside), and the sort is stable (theirs is not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import dlsn_kernels
from dlsn.models import GLA, LFFB, NLSA, NLSN, build_model, load_model, set_backend, set_inference
from dlsn.models.checkpoint import from_state_dict
from dlsn_kernels import spherical_rotations

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    dlsn_kernels.available_backends("cpu")["cpu"].reason is not None, reason="CPU extension not built"))]


# ---------------------------------------------------------------------------------------------------------
# The authors' code, their way (see the module docstring).


def authors_lsh(x: Tensor, rot_half: Tensor, hash_buckets: int) -> Tensor:
    """Their LSH with given rotations: codes [N, R*L] with round offsets."""
    n = x.shape[0]
    n_hashes = rot_half.shape[1]
    rotations = rot_half.to(x.dtype)[None].expand(n, -1, -1, -1)
    rotated = torch.einsum("btf,bfhi->bhti", x, rotations)
    rotated = torch.cat([rotated, -rotated], dim=-1)
    codes = torch.argmax(rotated, dim=-1)
    offsets = (torch.arange(n_hashes) * hash_buckets).reshape(1, -1, 1)
    return (codes + offsets).reshape(n, -1)


def authors_nlsa(block: NLSA, inp: Tensor, rot_half: Tensor) -> Tensor:
    """NonLocalSparseAttention.forward with ``rot_half`` as its rotations and a stable sort."""
    n, _, h, w = inp.shape
    k, reduction = block.chunk_size, block.reduction
    n_hashes = rot_half.shape[1]
    x_embed = block.conv_match(inp).view(n, -1, h * w).contiguous().permute(0, 2, 1)
    y_embed = block.conv_assembly(inp).view(n, -1, h * w).contiguous().permute(0, 2, 1)
    length, c = x_embed.shape[-2:]
    hash_buckets = min(length // k + (length // k) % 2, 128)
    codes = authors_lsh(x_embed, rot_half, hash_buckets).detach()
    _, indices = codes.sort(dim=-1, stable=True)
    _, undo_sort = indices.sort(dim=-1)
    mod_indices = indices % length

    def select(values: Tensor, idx: Tensor) -> Tensor:
        return values.gather(1, idx[:, :, None].expand(-1, -1, values.shape[-1]))

    x_sorted, y_sorted = select(x_embed, mod_indices), select(y_embed, mod_indices)
    padding = k - length % k if length % k != 0 else 0
    x_b = x_sorted.reshape(n, n_hashes, -1, c)
    y_b = y_sorted.reshape(n, n_hashes, -1, c * reduction)
    if padding:
        x_b = torch.cat([x_b, x_b[:, :, -padding:, :].clone()], dim=2)
        y_b = torch.cat([y_b, y_b[:, :, -padding:, :].clone()], dim=2)
    x_b = x_b.reshape(n, n_hashes, -1, k, c)
    y_b = y_b.reshape(n, n_hashes, -1, k, c * reduction)
    x_match = F.normalize(x_b, p=2, dim=-1, eps=5e-5)

    def adjacent(t: Tensor) -> Tensor:
        back = torch.cat([t[:, :, -1:, ...], t[:, :, :-1, ...]], dim=2)
        forward = torch.cat([t[:, :, 1:, ...], t[:, :, :1, ...]], dim=2)
        return torch.cat([t, back, forward], dim=3)

    x_match, y_b = adjacent(x_match), adjacent(y_b)
    raw = torch.einsum("bhkie,bhkje->bhkij", x_b, x_match)
    bucket_score = torch.logsumexp(raw, dim=-1, keepdim=True)
    score = torch.exp(raw - bucket_score)
    bucket_score = bucket_score.reshape(n, n_hashes, -1)
    ret = torch.einsum("bukij,bukje->bukie", score, y_b).reshape(n, n_hashes, -1, c * reduction)
    if padding:
        ret, bucket_score = ret[:, :, :-padding, :].clone(), bucket_score[:, :, :-padding].clone()
    ret = select(ret.reshape(n, -1, c * reduction), undo_sort)
    bucket_score = bucket_score.reshape(n, -1).gather(1, undo_sort)
    ret = ret.reshape(n, n_hashes, length, c * reduction)
    probs = F.softmax(bucket_score.reshape(n, n_hashes, length, 1), dim=1)
    ret = torch.sum(ret * probs, dim=1)
    return ret.permute(0, 2, 1).view(n, -1, h, w).contiguous() * block.res_scale + inp


def authors_nlsn(model: NLSN, x: Tensor, rotations: list[Tensor]) -> Tensor:
    """NLSN.forward with our model's weights: their ResBlock (body * res_scale, += x), their NLSA."""
    x = model.head(model.sub_mean(x))
    res = x
    attention = iter(rotations)
    for layer in model.body:
        if isinstance(layer, NLSA):
            res = authors_nlsa(layer, res, next(attention))
        elif isinstance(layer, LFFB):
            out = layer.body(res).mul(layer.res_scale)
            out += res
            res = out
        else:
            res = layer(res)
    res = res + x
    return model.add_mean(model.tail(res))


def fixed_rotations(model: NLSN, length: int, seed: int) -> list[Tensor]:
    """Gaussian ``[Cm, R, B/2]`` per NLSA block, installed as the blocks' rotations (their override point)."""
    generator = torch.Generator().manual_seed(seed)
    rotations = []
    for block in (m for m in model.modules() if isinstance(m, NLSA)):
        half = dlsn_kernels.n_buckets_for(length, block.chunk_size) // 2
        rot = torch.randn(block.channels // block.reduction, block.n_hashes, half, generator=generator,
                          dtype=torch.float64)
        block.rotations = lambda length, device, generator=None, rot=rot: rot.to(device)
        rotations.append(rot)
    return rotations


# ---------------------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(2, 7, 7), (1, 3, 5), (1, 4, 4)],
    ids=["L49-K8-padded-nc7", "L15-K8-padded-nc2", "L16-K8-nc2"],
)
def test_nlsn_equals_the_authors_network_in_float64(backend, batch, height, width):
    torch.manual_seed(0)
    model = NLSN(2, n_resblocks=8, n_feats=16, chunk_size=8, n_hashes=3, reduction=4, res_scale=0.1,
                 backend=backend).double().eval()
    assert sum(isinstance(m, NLSA) for m in model.modules()) == 2
    length = height * width
    rotations = fixed_rotations(model, length, seed=1)
    x = torch.rand(batch, 3, height, width, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        theirs = authors_nlsn(model, x, rotations)
    error = ((ours - theirs).norm() / theirs.norm()).item()
    assert error <= 1e-10, error
    # The network's output is mostly its skip paths; the attention itself (block output minus input) must
    # match as closely, and must move its input.
    with torch.no_grad():
        features = model.head(model.sub_mean(x))
        ours_attention = model.body[0](features) - features
        theirs_attention = authors_nlsa(model.body[0], features, rotations[0]) - features
    error = ((ours_attention - theirs_attention).norm() / theirs_attention.norm()).item()
    assert error <= 1e-10, error
    assert ours_attention.norm() / features.norm() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_nlsa_block_gradients_match_the_authors(backend):
    """Training: the gradients of input and weights through the block equal those of their code (float64)."""
    torch.manual_seed(2)
    block = NLSA(8, reduction=2, chunk_size=4, n_hashes=2, res_scale=0.5, backend=backend).double()
    rot = torch.randn(4, 2, dlsn_kernels.n_buckets_for(30, 4) // 2, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    grads = []
    for run in (lambda: block.attend(x, rot), lambda: authors_nlsa(block, x, rot)):
        block.zero_grad()
        x.grad = None
        (run() * weight).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for ours, theirs in zip(*grads):
        assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-10


# ---------------------------------------------------------------------------------------------------------
# The hash: spherical LSH as SB-LSH with cat[R, -R].


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spherical_hash_ties_resolve_like_the_authors_argmax(backend, dtype):
    """Small integers make every dot product exact in any summation order, so ties are real ties: the
    first maximum wins on both sides (torch.argmax documents the first index, sblsh_hash the lowest)."""
    generator = torch.Generator().manual_seed(3)
    xm = torch.randint(-2, 3, (2, 64, 4), generator=generator).to(dtype)
    xm[0, :5] = 0  # all projections 0 and -0: bucket 0
    rot_half = torch.randint(-1, 2, (4, 3, 3), generator=generator).to(dtype)
    rot_half[:, 0, 1] = rot_half[:, 0, 0]  # duplicate columns: ties between b and b + 1, and their negations
    rotated = torch.einsum("ntf,fhi->nhti", xm, rot_half)
    theirs = torch.argmax(torch.cat([rotated, -rotated], dim=-1), dim=-1)
    ties = (torch.cat([rotated, -rotated], dim=-1) == rotated.abs().amax(-1, keepdim=True)).sum(-1) > 1
    assert ties.float().mean() > 0.3  # the test does test ties
    ours = dlsn_kernels.sblsh_hash(xm, spherical_rotations(rot_half), backend=backend)
    assert torch.equal(ours, theirs)


def test_spherical_rotation_shapes():
    rot = torch.randn(4, 2, 3)
    assert torch.equal(spherical_rotations(rot), torch.cat([rot, -rot], 2))
    assert torch.equal(spherical_rotations(torch.empty(4, 2, 0)), torch.zeros(4, 2, 1))
    with pytest.raises(ValueError, match="rot_half"):
        spherical_rotations(torch.empty(4, 2))


# ---------------------------------------------------------------------------------------------------------
# Block behaviour: rotations, seeds, controls.


def test_rotations_shape_and_eval_repeatability():
    block = NLSA(16, chunk_size=8, n_hashes=3)
    assert (block.reduction, block.chunk_size, block.n_hashes, block.res_scale) == (4, 8, 3, 1.0)
    assert block.rotations(100, torch.device("cpu")).shape == (4, 3, 6)  # 100 // 8 = 12 buckets, 6 columns
    block.eval()
    first = block.rotations(100, torch.device("cpu"))
    assert torch.equal(first, block.rotations(100, torch.device("cpu")))
    block.set_inference(n_hashes=2, seed=7)
    assert block.rotations(100, torch.device("cpu")).shape == (4, 2, 6)
    assert not torch.equal(block.rotations(100, torch.device("cpu")), first[:, :2])
    block.set_inference(seed=None)
    assert not torch.equal(block.rotations(100, torch.device("cpu")), block.rotations(100, torch.device("cpu")))
    assert block.rotations(10, torch.device("cpu")).shape == (4, 3, 1)  # 10 // 8 = 1, rounded up: 2 buckets
    assert block.rotations(7, torch.device("cpu")).shape == (4, 3, 0)  # L < K: one bucket, no column
    torch.manual_seed(0)
    block.train()
    assert not torch.equal(block.rotations(100, torch.device("cpu")), block.rotations(100, torch.device("cpu")))


def test_seeded_gaussian_rotations_op():
    """The eval-mode draw is a registered custom op (torch.compile sees one opaque call) and is NLSN's law:
    ``torch.randn`` from a generator seeded with the block's seed."""
    from dlsn.models.nlsn import seeded_gaussian_rotations

    torch.library.opcheck(seeded_gaussian_rotations, (3, 4, 2, 5))
    expected = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seeded_gaussian_rotations(3, 4, 2, 5), expected)
    block = NLSA(16, chunk_size=8, n_hashes=2).eval()
    block.set_inference(seed=3)
    assert torch.equal(block.rotations(100, torch.device("cpu")), torch.randn(
        4, 2, 6, generator=torch.Generator().manual_seed(3)))


def test_network_eval_is_repeatable_and_seed_none_is_random():
    torch.manual_seed(0)
    model = build_model("nlsn_small", 2, backend="reference", n_resblocks=8).eval()
    blocks = [m for m in model.modules() if isinstance(m, NLSA)]
    assert len(blocks) == 2 and blocks[0].inference_seed != blocks[1].inference_seed
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(first, model(x))
        model.set_inference(seed=None)
        assert not torch.equal(model(x), model(x))
    assert first.shape == (1, 3, 24, 20)


def test_set_backend_and_set_inference_reach_nlsa_blocks():
    model = build_model("nlsn_small", 3)
    set_backend(model, "reference")
    blocks = [m for m in model.modules() if isinstance(m, NLSA)]
    assert {b.backend for b in blocks} == {"reference"}
    set_inference(model, n_hashes=1, seed=4)
    assert [b.inference_n_hashes for b in blocks] == [1, 1]
    assert len({b.inference_seed for b in blocks}) == 2
    assert not any(isinstance(m, GLA) for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS)
def test_smaller_than_one_chunk_runs(backend):
    """L < K: one bucket (the authors' code gets 0 buckets and fails); every backend gives the reference's."""
    torch.manual_seed(0)
    block = NLSA(8, chunk_size=32, n_hashes=2).eval()
    x = torch.randn(1, 8, 3, 4)
    with torch.no_grad():
        block.backend = backend
        ours = block(x)
        block.backend = "reference"
        reference = block(x)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_training_step_gives_gradients_to_every_weight():
    torch.manual_seed(0)
    model = build_model("nlsn_small", 2, backend="reference", n_resblocks=2).train()
    out = model(torch.rand(2, 3, 9, 8))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_constructor_checks():
    with pytest.raises(ValueError, match="n_colors"):
        NLSN(2, n_colors=1)
    with pytest.raises(ValueError, match="divisible"):
        NLSA(10, reduction=4)
    with pytest.raises(ValueError, match="scale"):
        NLSN(5)
    with pytest.raises(ValueError, match="rot_half"):
        NLSA(8, chunk_size=4).attend(torch.randn(1, 8, 4, 4), torch.randn(2, 1, 1))


def test_presets():
    paper = build_model("nlsn", 2)
    assert paper.config == {"arch": "nlsn", "scale": 2, "n_resblocks": 32, "n_feats": 256, "chunk_size": 144,
                            "n_hashes": 4, "reduction": 4, "res_scale": 0.1, "rgb_range": 1.0, "n_colors": 3}
    assert sum(isinstance(m, NLSA) for m in paper.modules()) == 5
    assert sum(p.numel() for p in paper.parameters() if p.requires_grad) == 41_796_163
    small = build_model("nlsn_small", 4)
    assert sum(isinstance(m, NLSA) for m in small.modules()) == 2


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and tools.


def authors_state_dict(model: NLSN) -> dict[str, Tensor]:
    """What the authors' torch.save(model.state_dict()) holds: the same names, no config entry."""
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("nlsn_small", 2, chunk_size=144, n_hashes=4, res_scale=0.1)
    path = tmp_path_factory.mktemp("nlsn") / "model_x2.pt"
    torch.save(authors_state_dict(model), path)
    return path, model


def test_load_model_reads_the_authors_nlsn_state_dict(authors_checkpoint):
    path, original = authors_checkpoint
    model, config = load_model(path, backend="reference")
    assert isinstance(model, NLSN) and not model.training
    assert config == {**original.config}
    assert "144, 4, 0.1" in from_state_dict(authors_state_dict(original))["extra"]["source"]
    original.set_backend("reference")
    x = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        assert torch.equal(model(x), original.eval()(x))


def test_spandrel_detects_and_loads_nlsn(authors_checkpoint):
    pytest.importorskip("spandrel")
    from spandrel import ModelLoader

    from dlsn.integrations import spandrel as integration

    path, original = authors_checkpoint
    state = authors_state_dict(original)
    assert integration.detect(state)
    descriptor = ModelLoader().load_from_state_dict(state)
    assert descriptor.scale == 2 and isinstance(descriptor.model, NLSN)
    assert descriptor.model.config == original.config


def write_png(path, width: int, height: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_upscale_and_eval_with_an_nlsn_checkpoint_and_chop(tmp_path, capsys):
    from dlsn.eval import main as eval_main
    from dlsn.images import read_image
    from dlsn.models import save_checkpoint
    from dlsn.upscale import main as upscale_main

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "nlsn_small_x2.pt", build_model("nlsn_small", 2))
    bare = tmp_path / "authors_x2.pt"
    torch.save(authors_state_dict(build_model("nlsn_small", 2, chunk_size=144, n_hashes=4)), bare)
    source = write_png(tmp_path / "photo.png", 40, 34)
    common = ["--backend", "reference", "--device", "cpu", "--dtype", "float32"]
    for ckpt in (checkpoint, bare):
        for extra in ([], ["--chop"]):
            target = tmp_path / f"out_{ckpt.stem}_{len(extra)}.png"
            assert upscale_main([str(source), str(target), "--checkpoint", str(ckpt), *extra, *common]) == 0
            assert read_image(target).shape == (68, 80, 3)
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "a.png", 96, 80, seed=1)
    capsys.readouterr()
    assert eval_main(["--data", str(hr), "--checkpoint", str(checkpoint), "--chop", "--no-progress", *common]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("hr ")]
    assert len(rows) == 1 and rows[0][1] == "1" and 5.0 < float(rows[0][2]) < 60.0  # one image, a finite PSNR


# ---------------------------------------------------------------------------------------------------------
# The whole-network bench's NLSN-style swap (bench/network.py).


def test_nlsn_style_network_is_ours_with_the_authors_attention():
    """The swap keeps every weight, and with a stable sort and the same global-generator draws (both take
    their Gaussian rotations from it in training mode, in block order) gives our output (float32)."""
    from bench import network

    torch.manual_seed(0)
    ours = build_model("nlsn_small", 2, backend="reference")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = network.nlsn_style_network(build_model("nlsn_small", 2, backend="reference"), stable=True)
    theirs.load_state_dict(before)
    assert not any(isinstance(m, NLSA) for m in theirs.modules())
    assert sum(isinstance(m, network.NLSNStyleNLSA) for m in theirs.modules()) == 2
    assert theirs.state_dict().keys() == before.keys()
    x = torch.rand(1, 3, 11, 9)
    with torch.no_grad():
        torch.manual_seed(5)
        a = ours.train()(x)
        torch.manual_seed(5)
        b = theirs.train()(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_nlsn_network_cases_run(train):
    from bench import cases, network

    for impl in ("fused-reference", "nlsn-style"):
        cases.network_case(impl, "nlsn_small", 12, n=1, train=train)()
    assert network.estimate_network_bytes("nlsn-style", "nlsn", 128) > network.estimate_network_bytes(
        "fused-cpu", "nlsn", 128)


def test_train_nlsn_small_a_few_steps(tmp_path, capsys):
    from dlsn.data import samples
    from dlsn.images import write_image
    from dlsn.train import main as train_main

    data = tmp_path / "hr"
    data.mkdir()
    image = samples.load_sample("astronaut")
    for i in range(4):
        write_image(data / f"img{i}.png", image[60 * i:60 * i + 64, 100:172].copy())
    out = tmp_path / "run"
    code = train_main(["--data", str(data), "--preset", "nlsn_small", "--max-steps", "2", "--val-every", "2",
                     "--batch-size", "2", "--patch-size", "16", "--val-crop", "48", "--no-progress",
                     "--out", str(out)])
    assert code == 0
    model, config = load_model(out / "last.pt", backend="reference")
    assert isinstance(model, NLSN) and config["arch"] == "nlsn" and config["rgb_range"] == 1.0
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
