"""GPU check: the two-level chunk-state scan against the sequential one and float64, at production length.

For each case, the chunk-boundary states ``H_c, G_c`` (``kernels.chunk_states``) with one segment
(sequential) and with the default segments (``kernels.chunk_state.scan_segments``), against the
float64 states of :class:`solvers.chunk_state.ChunkedSystem` (fp64 policy) on the same bf16 inputs.
Per state: the largest and the median normwise relative error over chunks, ``||S_c - S_c^64||_F /
||S_c^64||_F``, and the time of each scan. Cases:

- ``trained``: the gates of a trained layer (``bench_certificate.make_inputs``), (1, 65536, 16, 128);
- ``low_rank_gamma1``: rank-2 keys, gamma = 1, beta = 1 (the states grow like T), (1, 65536, 4, 128).

For every precision configuration of the scan (bf16x3 products with fp32 states, bf16 products with
fp32 states, fp16 products with fp16 states). Writes ``check_scan.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_certificate import make_inputs  # noqa: E402
from mesa_stability import solvers  # noqa: E402
from mesa_stability.kernels import chunk_state  # noqa: E402
from mesa_stability.solvers.chunk_state import ChunkedSystem  # noqa: E402
from mesa_stability.stability import cases  # noqa: E402
from mesa_stability.stability.production import git_commit  # noqa: E402

# (label, products split into bf16x3, input dtype of the products, state dtype)
SCANS = [("bf16x3 fp32state", True, torch.bfloat16, torch.float32),
         ("bf16 fp32state", False, torch.bfloat16, torch.float32),
         ("fp16 fp16state", False, torch.float16, torch.float16)]


def problems(T):
    q, k, v, g, beta, lam = make_inputs(1, T, 16, 128)
    yield "trained", k, v, g.float(), beta.float()
    p = cases.random_problem(1, T, 4, 128, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                             lam_range=(0.25, 0.25), key_rank=2)
    yield "low_rank_gamma1", p.k.bfloat16().cuda(), p.v.bfloat16().cuda(), p.g.float().cuda(), p.beta.float().cuda()


def rel(a, ref):
    """(max, median) over chunks of the normwise relative error of states ``[B,H,N,.,D]``."""
    err = (a.double() - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    return float(err.max()), float(err.median())


def main(argv=None) -> int:
    import pandas as pd
    import triton
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--chunk-size", type=int, default=64)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this check needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    C, rows = args.chunk_size, []
    for case, k, v, g, beta in problems(args.T):
        p64 = solvers.MesaProblem(torch.zeros_like(k, dtype=torch.float64), k.double(), v.double(), g.double(),
                                  beta.double(), torch.ones(k.shape[2], k.shape[3], dtype=torch.float64, device="cuda"))
        t0 = time.time()
        ref = ChunkedSystem.build(p64, solvers.get_policy("fp64"), C)
        print(f"{case}: float64 states in {time.time() - t0:.1f} s", flush=True)
        for label, split, in_dt, state_dt in SCANS:
            kk, vv = k.to(in_dt), v.to(in_dt)
            if in_dt != torch.bfloat16:  # the float64 reference reads the same rounded inputs
                ref = ChunkedSystem.build(p64.replace(k=kk.double(), v=vv.double()), solvers.get_policy("fp64"), C)
            for segments in (1, None):
                def run(segments=segments, kk=kk, vv=vv, g=g, beta=beta, split=split, state_dt=state_dt):
                    return chunk_state.chunk_states(kk, vv, g, beta, chunk_size=C, state_dtype=state_dt,
                                                    split=split, check_values=False, segments=segments)

                Hc, Gc, _ = run()
                ms = do_bench(run, warmup=10, rep=100, return_mode="median")
                S = chunk_state.segment_layout(Hc.shape[2], 4 * k.shape[2], k.device, segments)[0]
                for name, a, r in (("H", Hc, ref.Hc), ("G", Gc, ref.Gc)):
                    mx, med = rel(a, r)
                    rows.append(dict(case=case, T=args.T, H=k.shape[2], D=k.shape[3], scan=label,
                                     segments=S, state=name, max_rel_err=mx, median_rel_err=med, ms=ms,
                                     device=torch.cuda.get_device_name(), torch=torch.__version__,
                                     triton=triton.__version__, commit=git_commit()))
                    print(rows[-1], flush=True)
                del Hc, Gc
                pd.DataFrame(rows).to_csv(os.path.join(args.out, "check_scan.csv"), index=False)
        del ref
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
