"""The CUDA kernels' argument checks, run without a GPU.

The checks of the CUDA ops run on the host (csrc/cuda/registration.cpp) before anything touches
the device, so calling the CUDA kernels through the dispatcher with CPU tensors exercises every
error path: a bad argument must raise a RuntimeError naming it, and good CPU arguments must be
refused as not being on CUDA (never launched).
"""

import pytest
import torch

import dlsn_kernels  # noqa: F401 - loads the extension

OPS = ("sblsh_hash", "bucket_sort", "chunk_attention", "gla_attention", "attention_backward")
if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dlsn::{op}", "CUDA") for op in OPS):
    pytest.skip("the extension was built without CUDA kernels", allow_module_level=True)

CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def call_cuda_kernel(op: str, *args):
    return getattr(torch.ops.dlsn, op).default.redispatch(CUDA_KEY, *args)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    n, length, k, cm, cv, r = 2, 10, 4, 5, 6, 2
    xm = torch.randn(n, length, cm, generator=gen)
    v = torch.randn(n, length, cv, generator=gen)
    lss = torch.randn(n, length, k, generator=gen)
    perm = torch.arange(length).repeat(n, r, 1).contiguous()
    rot = torch.randn(cm, r, 3, generator=gen)
    grad = torch.randn(n, 1, length, cv, generator=gen)
    stat = torch.randn(n, 1, length, generator=gen)
    return {"xm": xm, "v": v, "lss": lss, "perm": perm, "rot": rot, "k": k, "grad": grad, "stat": stat}


BAD_CALLS = {
    "chunk_attention lss": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"][..., :-1].contiguous(), a["perm"], a["k"]), "lss"),
    "chunk_attention v": (
        "chunk_attention", lambda a: (a["xm"], a["v"][:, :-1].contiguous(), a["lss"], a["perm"], a["k"]), "v must"),
    "chunk_attention perm dtype": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"], a["perm"].float(), a["k"]), "perm"),
    "chunk_attention xm rank": (
        "chunk_attention", lambda a: (a["xm"][0], a["v"], a["lss"], a["perm"], a["k"]), "xm"),
    "chunk_attention chunk_size": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"], a["perm"], 0), "chunk_size"),
    "gla_attention rot": (
        "gla_attention", lambda a: (a["xm"], a["v"], a["lss"], a["rot"][1:].contiguous(), a["k"]), "rot"),
    "sblsh_hash rot": ("sblsh_hash", lambda a: (a["xm"], a["rot"][1:].contiguous()), "rot"),
    "bucket_sort n_buckets": ("bucket_sort", lambda a: (a["perm"], 0), "n_buckets"),
    "attention_backward delta": (
        "attention_backward",
        lambda a: (a["grad"], a["stat"][..., :-1].contiguous(), a["xm"], a["v"], a["lss"], a["perm"], a["stat"],
                   a["k"]),
        "delta"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_naming_the_argument(inputs, case):
    op, make_args, name = BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=name):
        call_cuda_kernel(op, *make_args(inputs))


GOOD_CALLS = {
    "sblsh_hash": lambda a: (a["xm"], a["rot"]),
    "bucket_sort": lambda a: (a["perm"], 10),
    "chunk_attention": lambda a: (a["xm"], a["v"], a["lss"], a["perm"], a["k"]),
    "gla_attention": lambda a: (a["xm"], a["v"], a["lss"], a["rot"], a["k"]),
    "attention_backward": lambda a: (a["grad"], a["stat"], a["xm"], a["v"], a["lss"], a["perm"], a["stat"], a["k"]),
}


@pytest.mark.parametrize("op", list(GOOD_CALLS))
def test_cpu_tensors_are_refused_before_any_launch(inputs, op):
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel(op, *GOOD_CALLS[op](inputs))
