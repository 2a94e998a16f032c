"""GPU benchmark of the log-decay gradient's segmented reverse cumulative sum: the kernel
(:mod:`kernels.reverse_cumsum`, one launch) against the PyTorch doubling scan the op's backward runs
today (``kernels.mesa._log_decay_grad``: :func:`solvers.gates.segmented_cumsum_grad` on a transposed
copy, ``8 ceil(log2 T)`` operations), the scan alone and inside the op's forward + backward
(certified ``auto`` policy, tolerance 1e-4, certificate on), in one process; the two dg agree to
float32 rounding (printed). Medians of ``triton.testing.do_bench`` in ms; writes
``bench_dg_scan.csv`` to ``--out``. The first shape compiles every kernel of the op (about a minute).

    python benchmarks/bench_dg_scan.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_certificate import make_inputs  # noqa: E402
from mesa_stability.kernels import mesa, mesa_chunk  # noqa: E402
from mesa_stability.kernels.reverse_cumsum import segmented_reverse_cumsum  # noqa: E402
from mesa_stability.stability.production import git_commit  # noqa: E402

SHAPES = [(4, 4096, 16, 64), (4, 2048, 16, 128), (1, 32768, 16, 128)]


torch_scan = mesa._log_decay_grad


@contextlib.contextmanager
def scan_impl(fn):
    old = mesa._log_decay_grad
    mesa._log_decay_grad = fn
    try:
        yield
    finally:
        mesa._log_decay_grad = old


def main(argv=None) -> int:
    import pandas as pd
    import triton
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    kernel = segmented_reverse_cumsum
    for B, T, H, D in SHAPES:
        inp = make_inputs(B, T, H, D)
        e = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(B, T, H, device="cuda")
        g = inp[3].float()
        diff = ((kernel(a, g) - torch_scan(a, g)).abs().max() / a.abs().sum(1).max()).item()
        run = functools.partial(mesa_chunk, policy="auto", tol=1e-4, validate=False, check="warn")

        def fwd_bwd(run=run, inp=inp, e=e):
            leaves = [t.detach().requires_grad_() for t in inp]
            run(*leaves).backward(e.float())

        for name, fn in (("kernel", kernel), ("torch doubling scan", torch_scan)):
            scan_ms = do_bench(lambda fn=fn, a=a, g=g: fn(a, g), warmup=25, rep=100, return_mode="median")
            with scan_impl(fn):
                fwd_bwd()
                op_ms = do_bench(fwd_bwd, warmup=10, rep=200, return_mode="median")
            rows.append(dict(shape=f"({B},{T},{H},{D})", scan=name, scan_ms=scan_ms, fwd_bwd_ms=op_ms,
                             max_diff_over_sum_abs=diff, device=torch.cuda.get_device_name(),
                             torch=torch.__version__, triton=triton.__version__, commit=git_commit()))
            print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(os.path.join(args.out, "bench_dg_scan.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
