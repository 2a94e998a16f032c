"""Where the time of one decode step goes (GPU): ``torch.profiler`` over 50 calls of ``mesa_step``
per configuration at one batch size (the inputs of ``bench_decode.py``), the CPU and CUDA time of
each operator and kernel, printed as a table per configuration.

    python benchmarks/profile_decode.py [--batch 1] [--heads 16] [--dim 128] > profile.txt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_decode import configurations, inputs  # noqa: E402

from mesa_stability.solvers.verdict import flush  # noqa: E402


def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = inputs(args.batch, args.heads, args.dim, gen)
    for name, fn in configurations(a, None).items():
        if "warps" in name:
            continue
        for _ in range(10):
            fn()
        flush()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                fn()
            flush()
            torch.cuda.synchronize()
        print(f"\n=== {name} (B = {args.batch}, 50 calls) ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
