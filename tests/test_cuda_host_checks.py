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


def _with(perm, n, r, pos, value):
    bad = perm.clone()
    bad[n, r, pos] = value
    return bad


# Index values: checked with ATen ops before launch (an out-of-range perm would be an illegal memory
# access, an out-of-range code a device-side assert). Each must be a ValueError naming the first bad entry.
BAD_VALUES = {
    "chunk_attention perm all zeros": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"], torch.zeros_like(a["perm"]), a["k"]),
        r"perm must be a permutation of 0\.\.L-1 for each \(n, round\), but perm\[n=0, round=0, position=0\] = 0"),
    "chunk_attention perm repeated": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"], _with(a["perm"], 1, 1, 6, 2), a["k"]),
        r"perm\[n=1, round=1, position=2\] = 2 occurs more than once"),
    "chunk_attention perm one past the end": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"], _with(a["perm"], 1, 0, 3, 10), a["k"]),
        r"perm must hold positions in \[0, L=10\): perm\[n=1, round=0, position=3\] = 10"),
    "chunk_attention perm negative int32": (
        "chunk_attention", lambda a: (a["xm"], a["v"], a["lss"], _with(a["perm"], 0, 1, 9, -3).int(), a["k"]),
        r"perm\[n=0, round=1, position=9\] = -3"),
    "attention_backward perm repeated": (
        "attention_backward",
        lambda a: (a["grad"], a["stat"], a["xm"], a["v"], a["lss"], _with(a["perm"], 0, 0, 0, 5), a["stat"], a["k"]),
        r"perm\[n=0, round=0, position=0\] = 5 occurs more than once"),
    "attention_backward perm out of range": (
        "attention_backward",
        lambda a: (a["grad"], a["stat"], a["xm"], a["v"], a["lss"], _with(a["perm"], 1, 1, 1, 2**40), a["stat"],
                   a["k"]),
        r"perm must hold positions in \[0, L=10\): perm\[n=1, round=1, position=1\] = 1099511627776"),
    "bucket_sort codes too large": (
        "bucket_sort", lambda a: (_with(a["perm"], 1, 0, 4, 3), 3), r"codes must lie in \[0, n_buckets=3\): "
        r"codes\[n=0, round=0, position=3\] = 3"),
    "bucket_sort codes negative": (
        "bucket_sort", lambda a: (_with(torch.zeros_like(a["perm"]), 1, 1, 7, -1).int(), 2),
        r"codes\[n=1, round=1, position=7\] = -1"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_index_values_raise_value_error_before_launch(inputs, case):
    op, make_args, match = BAD_VALUES[case]
    with pytest.raises(ValueError, match=match):
        call_cuda_kernel(op, *make_args(inputs))


def test_grids_that_cannot_launch_are_refused_on_the_host():
    """Sizes beyond CUDA's grid limits (65535 along y): checked before launch, never in the .cu code."""
    xm, lss = torch.randn(1, 1, 1), torch.randn(1, 1, 1)
    wide = torch.randn(1, 1, 65535 * 128 + 1)  # one column slice of 128 channels too many
    perm = torch.zeros(1, 1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="v has too many channels .* chunk_attention"):
        call_cuda_kernel("chunk_attention", xm, wide, lss, perm, 1)
    stat = torch.zeros(1, 1, 1)
    with pytest.raises(RuntimeError, match="too many channels for the CUDA attention_backward kernel"):
        call_cuda_kernel("attention_backward", wide.unsqueeze(1), stat, xm, wide, lss, perm, stat, 1)
    rot = torch.randn(1, 65536, 1)
    with pytest.raises(RuntimeError, match="rot holds 65536 hash rounds"):
        call_cuda_kernel("sblsh_hash", xm, rot)
    with pytest.raises(RuntimeError, match="rot holds 65536 hash rounds"):
        call_cuda_kernel("gla_attention", xm, xm, lss, rot, 1)


def test_sizes_beyond_the_kernels_32_bit_slot_indices_are_refused_on_the_host():
    """The tensor-core kernels index slots and keys in 32-bit ints: L + chunk_size and 3 * chunk_size must fit
    (empty batches carry the huge chunk size without memory)."""
    chunk = 2**31 - 1
    xm, v = torch.zeros(0, 1, 1), torch.zeros(0, 1, 1)
    lss = torch.zeros(0, 1, chunk)
    perm = torch.zeros(0, 1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"L \+ chunk_size and 3 \* chunk_size must be at most .* chunk_attention"):
        call_cuda_kernel("chunk_attention", xm, v, lss, perm, chunk)
    grad, stat = torch.zeros(0, 1, 1, 1), torch.zeros(0, 1, 1)
    with pytest.raises(RuntimeError, match="must be at most .* attention_backward kernel, got L = 1"):
        call_cuda_kernel("attention_backward", grad, stat, xm, v, lss, perm, stat, chunk)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_naming_the_argument(inputs, case):
    op, make_args, name = BAD_CALLS[case]
    # shapes and dtypes are RuntimeErrors; an out-of-range value (n_buckets) is a ValueError, as in Python
    with pytest.raises(ValueError if case == "bucket_sort n_buckets" else RuntimeError, match=name):
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
