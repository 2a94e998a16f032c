"""Profile one forward + backward of ``mesa_chunk`` on the GPU (torch.profiler): where the time goes.

Prints the CUDA kernels and CPU ops by total time and writes ``profile_backward.txt`` (and a Chrome
trace) to ``--out``. Shape and inputs as ``bench_backward.py``; dense upstream gradient.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_backward import fwd_bwd  # noqa: E402
from benchmarks.bench_forward import make_inputs  # noqa: E402
from mesa_stability.kernels import mesa_chunk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", nargs=4, type=int, default=[4, 2048, 16, 128])
    ap.add_argument("--policy", default="fp16-fp16state")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--chunk", type=int, default=None, help="chunk size (default: the op's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_backward needs a CUDA GPU")
    B, T, H, D = args.shape
    inp = make_inputs(B, T, H, D)
    e = torch.randn(B, T, H, D, device="cuda")
    fn = functools.partial(mesa_chunk, policy=args.policy, validate=False, steps=args.steps, tol=args.tol,
                           **({"chunk_size": args.chunk} if args.chunk else {}))
    for _ in range(3):
        fwd_bwd(fn, inp, e)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd_bwd(fn, inp, e)
        torch.cuda.synchronize()
    os.makedirs(args.out, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    tag = "_".join(map(str, args.shape)) + f"_{args.policy}" + (f"_c{args.chunk}" if args.chunk else "")
    with open(os.path.join(args.out, f"profile_backward_{tag}.txt"), "w") as fh:
        fh.write(f"{args}\n\n{table}\n\n{cpu}\n")
    prof.export_chrome_trace(os.path.join(args.out, f"profile_backward_{tag}.json"))
    print(table)
    print(cpu)


if __name__ == "__main__":
    main()
