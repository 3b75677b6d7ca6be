"""Invalid-input cases for the fuzz of tests/test_invalid_inputs.py, and the worker process that runs them.

A case is a JSON-able dict: which entry point (the public API on a backend, or the raw
``torch.ops.dlsn`` op), which op, which fault, the sizes and a seed. The worker builds valid
arguments, applies the fault, calls, and prints one JSON line per case saying whether the call
raised (and what) or returned. It runs as ``python -m tests.invalid_inputs CASES.json START``; the
test restarts it after the case in progress if it dies, so one crash is pinned to one case.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from collections.abc import Callable

import numpy as np
import torch

# Public ops and their tensor arguments in call order, then the trailing int argument if any.
PUBLIC_OPS = {
    "sblsh_hash": (("xm", "rot"), None),
    "bucket_sort": (("codes",), "n_buckets"),
    "chunk_attention": (("xm", "v", "lss", "perm"), "chunk_size"),
    "gla_attention": (("xm", "v", "lss", "rot"), "chunk_size"),
    "combine_rounds": (("out", "lse"), None),
}
RAW_OPS = {
    **PUBLIC_OPS,
    "attention_backward": (("grad_out", "delta", "xm", "v", "lss", "perm", "lse"), "chunk_size"),
}


def valid_arguments(op: str, sizes: dict, seed: int) -> dict:
    """Arguments of ``op`` that it accepts (float32 CPU tensors, a bucket-sorted perm)."""
    import dlsn_kernels as dk

    gen = torch.Generator().manual_seed(seed)
    n, length, k, cm, cv, rounds = (sizes[key] for key in ("n", "length", "chunk", "cm", "cv", "rounds"))
    xm = torch.randn(n, length, cm, generator=gen)
    rot = dk.random_rotations(cm, rounds, dk.n_buckets_for(length, k), generator=gen)
    codes = dk.reference.sblsh_hash(xm, rot)
    perm = dk.reference.bucket_sort(codes)
    args = {
        "xm": xm,
        "v": torch.randn(n, length, cv, generator=gen),
        "lss": torch.randn(n, length, k, generator=gen),
        "rot": rot,
        "codes": codes,
        "perm": perm,
        "n_buckets": rot.shape[2],
        "chunk_size": k,
        "out": torch.randn(n, rounds, length, cv, generator=gen),
        "lse": torch.randn(n, rounds, length, generator=gen),
        "grad_out": torch.randn(n, rounds, length, cv, generator=gen),
        "delta": torch.randn(n, rounds, length, generator=gen),
    }
    tensors, scalar = RAW_OPS[op]
    return {name: args[name] for name in (*tensors, *([scalar] if scalar else []))}


def _set(name: str, fn: Callable) -> Callable[[dict], None]:
    def mutate(args: dict) -> None:
        args[name] = fn(args[name])

    return mutate


def _entry(name: str, value: int, where: float = 0.5) -> Callable[[dict], None]:
    """Sets one entry of an index tensor (at a relative flat position) to ``value``."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[int(where * (t.numel() - 1))] = value
        return t

    return _set(name, fn)


def _repeat(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    row = t[-1, -1]
    row[-1] = row[0]  # position L-1 repeats position 0 (L >= 2 in every case)
    return t


def _length_of(args: dict) -> int:
    return args["xm"].shape[1] if "xm" in args else args["perm"].shape[2]


def _perm_value_length(index_dtype: torch.dtype) -> Callable[[dict], None]:
    def mutate(args: dict) -> None:
        _entry("perm", _length_of(args))(args)
        args["perm"] = args["perm"].to(index_dtype)

    return mutate


def _codes_value(value: int, index_dtype: torch.dtype = torch.int64) -> Callable[[dict], None]:
    def mutate(args: dict) -> None:
        codes = args["codes"].to(index_dtype)  # a copy: codes are int64
        codes.view(-1)[codes.numel() // 2] = args["n_buckets"] if value is None else value
        args["codes"] = codes

    return mutate


def _drop_dim(t: torch.Tensor) -> torch.Tensor:
    return t[0]


def _shorter(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.narrow(dim, 0, t.shape[dim] - 1).contiguous()


def _longer(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.cat([t, t.narrow(dim, 0, 1)], dim).contiguous()


# fault name -> (the argument it spoils, how). Index-value faults are the ones a kernel could crash on.
INDEX_FAULTS: dict[str, tuple[str, Callable[[dict], None]]] = {
    "perm all zeros": ("perm", _set("perm", torch.zeros_like)),
    "perm one repeat": ("perm", _set("perm", _repeat)),
    "perm value L": ("perm", _perm_value_length(torch.int64)),
    "perm int32 value L": ("perm", _perm_value_length(torch.int32)),
    "perm value -1": ("perm", _entry("perm", -1, 0.0)),
    "perm value 2**40": ("perm", _entry("perm", 2**40, 1.0)),
    "perm int32 repeat": ("perm", _set("perm", lambda t: _repeat(t).int())),
    "perm hole, reversed": ("perm", _set("perm", lambda t: torch.where(t == 0, 1, t).flip(-1).contiguous())),
    "codes value n_buckets": ("codes", _codes_value(None)),
    "codes value -1": ("codes", _codes_value(-1)),
    "codes value 2**40": ("codes", _codes_value(2**40)),
    "codes int32 value -5": ("codes", _codes_value(-5, torch.int32)),
}

OTHER_FAULTS: dict[str, tuple[str, Callable[[dict], None]]] = {}
for _name in ("xm", "v", "lss", "rot", "codes", "perm", "out", "lse", "grad_out", "delta"):
    OTHER_FAULTS[f"{_name} one dim fewer"] = (_name, _set(_name, _drop_dim))
    OTHER_FAULTS[f"{_name} last dim shorter"] = (_name, _set(_name, _shorter(-1)))
    OTHER_FAULTS[f"{_name} first dim longer"] = (_name, _set(_name, _longer(0)))
    OTHER_FAULTS[f"{_name} numpy"] = (_name, _set(_name, lambda t: t.numpy()))
    OTHER_FAULTS[f"{_name} list"] = (_name, _set(_name, lambda t: t.tolist()))
    if _name != "lss":  # lss=None is no fault: the attention without a learned score (NLSA, tests/test_no_lss.py)
        OTHER_FAULTS[f"{_name} None"] = (_name, _set(_name, lambda t: None))
    OTHER_FAULTS[f"{_name} on meta"] = (_name, _set(_name, lambda t: t.to("meta")))
# Strided tensors are no fault: every public op and raw CPU op takes any strides (tests/test_layouts.py).
for _name in ("xm", "v", "lss", "rot"):
    OTHER_FAULTS[f"{_name} float16"] = (_name, _set(_name, torch.Tensor.half))
    OTHER_FAULTS[f"{_name} float64 among float32"] = (_name, _set(_name, torch.Tensor.double))
    OTHER_FAULTS[f"{_name} int64"] = (_name, _set(_name, lambda t: t.long()))
    OTHER_FAULTS[f"{_name} complex"] = (_name, _set(_name, lambda t: t.to(torch.complex64)))
for _name in ("codes", "perm"):
    OTHER_FAULTS[f"{_name} float"] = (_name, _set(_name, torch.Tensor.float))
    OTHER_FAULTS[f"{_name} bool"] = (_name, _set(_name, lambda t: t > 0))
    OTHER_FAULTS[f"{_name} int16"] = (_name, _set(_name, lambda t: t.to(torch.int16)))
OTHER_FAULTS.update({
    "perm zero rounds": ("perm", _set("perm", lambda t: t[:, :0].contiguous())),
    "perm one position more": ("perm", _set("perm", _longer(2))),
    "rot zero buckets": ("rot", _set("rot", lambda t: t[..., :0].contiguous())),
    "rot one row more": ("rot", _set("rot", _longer(0))),
    "chunk_size 0": ("chunk_size", _set("chunk_size", lambda k: 0)),
    "chunk_size -3": ("chunk_size", _set("chunk_size", lambda k: -3)),
    "chunk_size float": ("chunk_size", _set("chunk_size", lambda k: k + 0.5)),
    "chunk_size tensor": ("chunk_size", _set("chunk_size", lambda k: torch.tensor(k))),
    "chunk_size one more": ("chunk_size", _set("chunk_size", lambda k: k + 1)),
    "n_buckets 0": ("n_buckets", _set("n_buckets", lambda b: 0)),
    "n_buckets -2": ("n_buckets", _set("n_buckets", lambda b: -2)),
    "n_buckets float": ("n_buckets", _set("n_buckets", lambda b: b + 0.5)),
    "n_buckets numpy array": ("n_buckets", _set("n_buckets", lambda b: np.array([b]))),
    "lse float64 (raw backward)": ("lse", _set("lse", torch.Tensor.double)),
    "delta two rounds too many": ("delta", _set("delta", lambda t: torch.cat([t, t, t], 1))),
    "everything empty (L = 0)": ("xm", None),
})
del _name


def _die(args: dict) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


# Not a fault of any op (build_cases never picks it): the runner's own test, a worker killed by SIGSEGV.
SELF_TEST_CRASH = "the worker dies (runner self-test)"
FAULTS = {**INDEX_FAULTS, **OTHER_FAULTS, SELF_TEST_CRASH: ("<none>", _die)}


def _empty_everything(args: dict) -> None:
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            dim = 2 if name in ("perm", "codes", "out", "lse", "grad_out", "delta") else 1
            if name != "rot":
                args[name] = value.narrow(dim, 0, 0).contiguous()


# Sizes an op leaves free: changing them alone is no fault (N of sblsh_hash's xm, Cv of v, B of rot...).
_FREE_SIZES = {
    ("sblsh_hash", "xm first dim longer"), ("bucket_sort", "codes first dim longer"),
    ("bucket_sort", "codes last dim shorter"), ("sblsh_hash", "rot last dim shorter"),
    ("gla_attention", "rot last dim shorter"), ("chunk_attention", "xm last dim shorter"),
    ("attention_backward", "xm last dim shorter"), ("chunk_attention", "v last dim shorter"),
    ("gla_attention", "v last dim shorter"), ("combine_rounds", "out last dim shorter"),
}

# Faults that are one op's own: whether they apply to (op, raw).
_SPECIAL = {
    "everything empty (L = 0)": lambda op, raw: op not in ("combine_rounds", "bucket_sort"),  # valid for those
    "chunk_size one more": lambda op, raw: op in ("chunk_attention", "gla_attention", "attention_backward"),
    "lse float64 (raw backward)": lambda op, raw: raw and op == "attention_backward",
}


def applies(op: str, raw: bool, backend: str, fault: str) -> bool:
    if fault in _SPECIAL:
        return _SPECIAL[fault](op, raw)
    target = FAULTS[fault][0]
    tensors, scalar = (RAW_OPS if raw else PUBLIC_OPS)[op]
    if (target not in tensors and target != scalar) or (op, fault) in _FREE_SIZES:
        return False
    if raw and (fault.endswith("on meta") or fault == "chunk_size tensor"):
        # The dispatcher turns a 0-dim tensor into an int, and a meta tensor sends the call to the
        # shape-only fake kernel (dlsn_kernels/_ops.py): neither reaches the kernels' checks.
        return False
    if op == "combine_rounds":
        # Plain PyTorch on any float dtype and layout: only shapes, devices and non-tensors are faults.
        return "dim" in fault or fault.endswith(("numpy", "list", "None", "on meta"))
    if fault == "codes on meta" and backend == "reference":
        return False  # meta in, meta out: the reference computes shapes, which is what meta tensors ask for
    return True


def build_cases(seed: int, backends: list[str]) -> list[dict]:
    """Every applicable (entry point, op, fault), each with its own random sizes."""
    rng = random.Random(seed)
    entries = [("public", b) for b in backends] + [("raw", "cpu")]
    cases = []
    for api, backend in entries:
        ops = RAW_OPS if api == "raw" else PUBLIC_OPS
        for op in ops:
            for fault in FAULTS:
                if not applies(op, api == "raw", backend, fault):
                    continue
                sizes = {"n": rng.randint(1, 3), "length": rng.randint(2, 20), "chunk": rng.randint(1, 8),
                         "cm": rng.randint(2, 6), "cv": rng.randint(2, 6), "rounds": rng.randint(1, 3)}
                cases.append({"api": api, "backend": backend, "op": op, "fault": fault, "sizes": sizes,
                              "seed": rng.randrange(2**31)})
    return cases


def run_case(case: dict) -> dict:
    import dlsn_kernels as dk

    args = valid_arguments(case["op"], case["sizes"], case["seed"])
    if case["fault"] == "everything empty (L = 0)":
        _empty_everything(args)
    else:
        FAULTS[case["fault"]][1](args)
    if case["api"] == "public":
        call = lambda: getattr(dk, case["op"])(*args.values(), backend=case["backend"])  # noqa: E731
    else:
        call = lambda: getattr(torch.ops.dlsn, case["op"])(*args.values())  # noqa: E731
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - the verdict records any Python exception
        message = str(exc).strip().splitlines()
        return {"outcome": "raised", "type": type(exc).__name__, "message": message[0] if message else ""}
    shapes = [tuple(t.shape) for t in (result if isinstance(result, tuple) else (result,))]
    return {"outcome": "returned", "shapes": shapes}


def main(path: str, start: int) -> None:
    with open(path) as f:
        cases = json.load(f)
    for i in range(start, len(cases)):
        print(json.dumps({"i": i, "started": True}), flush=True)
        verdict = run_case(cases[i])
        print(json.dumps({"i": i, **verdict}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
