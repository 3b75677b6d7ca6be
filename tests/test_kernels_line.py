"""The tools say which backend runs each pass of the attention ops, and where that choice came from."""

import torch

import dlsn_kernels
from dlsn.cli import kernels_line
from dlsn.models.presets import build_model
from dlsn_kernels import _dispatch


def test_automatic_choice_names_both_passes_and_its_source():
    net = build_model("tiny", 2)
    line = kernels_line(net, None, torch.device("cpu"), torch.float32)
    assert line == f"kernels: {dlsn_kernels.backend_summary('cpu', torch.float32)}"
    assert line.startswith("kernels: forward cpu, backward cpu (")


def test_a_named_backend_says_where_it_was_named(monkeypatch):
    net = build_model("tiny", 2)
    assert kernels_line(net, "reference", torch.device("cpu"), torch.float32) == \
        "kernels: reference for every pass (--backend)"
    monkeypatch.setenv("DLSN_BACKEND", "reference")
    _dispatch.reset()  # $DLSN_BACKEND is read once per process
    try:
        assert kernels_line(net, None, torch.device("cpu"), torch.float32) == \
            "kernels: reference for every pass ($DLSN_BACKEND)"
    finally:
        monkeypatch.delenv("DLSN_BACKEND")
        _dispatch.reset()


def test_a_network_without_attention_blocks_has_no_kernels_line():
    assert kernels_line(build_model("cnn", 2), None, torch.device("cpu"), torch.float32) is None
