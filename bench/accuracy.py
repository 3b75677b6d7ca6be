"""Worst relative error of a backend against the reference, forward and backward, per dtype.

    python -m bench.accuracy --backend cpu            # float64 and float32 on the CPU
    python -m bench.accuracy --backend triton --device cuda --dtypes float32 float16 bfloat16

Errors are ``max|a - b| / max|b|`` over the test size matrix (tests/helpers.py) plus the paper's
channel counts, against the reference run in float64 (half-precision results are compared with a
float64 reference, so the numbers show the real error of the kernel, not of the oracle).
"""

from __future__ import annotations

import argparse

import torch

import dlsn_kernels as dk
from dlsn_kernels import reference as ref
from tests.helpers import CASES, Case, make_inputs, rel_err

PAPER = Case(2, 24 * 24, 128, 3, 64, 256)


def worst_errors(backend: str, dtype: torch.dtype, device: str) -> dict[str, float]:
    worst = {"gla fwd": 0.0, "gla bwd": 0.0, "chunk fwd": 0.0, "chunk bwd": 0.0}
    for case in [*CASES, PAPER]:
        xm, v, lss, rot, perm = make_inputs(case, torch.float64)
        if case is PAPER:
            xm = xm.relu()  # conv_match ends with a ReLU: realistic magnitudes
        gen = torch.Generator().manual_seed(11)
        inputs64 = [t.requires_grad_() for t in (xm, v, lss)]
        inputs = [t.detach().to(device, dtype).requires_grad_() for t in inputs64]

        rot_d = rot.to(device, dtype)
        y = dk.gla_attention(*inputs, rot_d, case.chunk, backend=backend)
        # The reference attends with the backend's own hash codes: in half precision a near-tie may
        # hash differently from float64, which is not an error of the attention.
        codes = dk.sblsh_hash(inputs[0].detach(), rot_d, backend=backend)
        hashed = dk.bucket_sort(codes, rot.shape[-1], backend=backend).cpu()
        want = ref.combine_rounds(*ref.chunk_attention(*inputs64, hashed, case.chunk))
        g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        got_g = torch.autograd.grad((y.double() * g.to(device)).sum(), inputs)
        want_g = torch.autograd.grad((want * g).sum(), inputs64)
        worst["gla fwd"] = max(worst["gla fwd"], rel_err(y.cpu(), want))
        worst["gla bwd"] = max(worst["gla bwd"], *(rel_err(a.cpu(), b) for a, b in zip(got_g, want_g)))

        out, lse = dk.chunk_attention(*inputs, perm.to(device), case.chunk, backend=backend)
        want_out, want_lse = ref.chunk_attention(*inputs64, perm, case.chunk)
        g = torch.randn(want_out.shape, generator=gen, dtype=torch.float64)
        got_g = torch.autograd.grad((out.double() * g.to(device)).sum() + lse.double().sum(), inputs)
        want_g = torch.autograd.grad((want_out * g).sum() + want_lse.sum(), inputs64)
        worst["chunk fwd"] = max(worst["chunk fwd"], rel_err(out.cpu(), want_out), rel_err(lse.cpu(), want_lse))
        worst["chunk bwd"] = max(worst["chunk bwd"], *(rel_err(a.cpu(), b) for a, b in zip(got_g, want_g)))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", choices=dk.BACKENDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    args = parser.parse_args(argv)
    print(f"backend {args.backend} on {args.device}: worst relative error vs float64 reference")
    print(f"{'dtype':10s} " + " ".join(f"{k:>10s}" for k in ("gla fwd", "gla bwd", "chunk fwd", "chunk bwd")))
    for name in args.dtypes:
        errs = worst_errors(args.backend, getattr(torch, name), args.device)
        print(f"{name:10s} " + " ".join(f"{e:10.2e}" for e in errs.values()))


if __name__ == "__main__":
    main()
