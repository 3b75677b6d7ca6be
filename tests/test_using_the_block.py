"""docs/using_the_block.md (README's "Using the block in your network"): its code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "using_the_block.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_documented_example_runs_as_written():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 1, "the section has one example"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # its asserts are the checks: eval repeats bitwise
    net, x = namespace["net"], namespace["x"]
    assert not net.training
    with torch.no_grad():
        assert net(x).shape == x.shape  # NCHW in, NCHW out
    gla = net[1]
    assert (gla.channels, gla.reduction, gla.chunk_size, gla.n_hashes) == (256, 4, 128, 3)  # the paper's values


def test_the_example_is_short():
    code = [line for line in python_blocks(DOC.read_text())[0].splitlines() if line.strip()]
    assert len(code) <= 16


def test_the_readme_example_runs_as_written():
    readme = DOC.parents[1] / "README.md"
    blocks = python_blocks(readme.read_text())
    assert len(blocks) == 1, "README has one Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(readme), "exec"), namespace)
    assert namespace["y"].shape == namespace["v"].shape  # [N, L, Cv]
    assert namespace["out"].shape == (2, 256, 40, 36)  # NCHW in, NCHW out
