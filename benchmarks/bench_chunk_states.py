"""GPU benchmark of the chunk-state scan (kernels/chunk_state.py) per precision configuration, with the
loop over the chunks as a for loop (the compiled default) and as a while loop (what the interpreter
runs), one run: median time (``triton.testing.do_bench``), registers and spills of the H launch.

Configurations, as the policies launch the scan (keys and values of the shape, bf16 inputs, the
``well_conditioned`` gates): bf16x3 products with fp32 states (``auto``, ``bf16x3``), bf16 products
with fp32 states (``bf16-fp32state``), fp16 products with fp16 states (``fp16-fp16state``), IEEE fp32
products (``fp32``). Writes ``bench_chunk_states.csv`` (one row per configuration and loop, with
provenance).

    python benchmarks/bench_chunk_states.py --out $OUT [--shape 4 2048 16 128]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability.kernels import chunk_state  # noqa: E402
from mesa_stability.stability.provenance import provenance  # noqa: E402

CONFIGS = {  # name: (input dtype, split, state dtype)
    "bf16x3 / fp32 state": (torch.bfloat16, True, torch.float32),
    "bf16 / fp32 state": (torch.bfloat16, False, torch.float32),
    "fp16 / fp16 state": (torch.float16, False, torch.float16),
    "fp32 / fp32 state": (torch.float32, False, torch.float32),
}


def main(argv=None) -> int:
    import pandas as pd
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 2048, 16, 128], metavar=("B", "T", "H", "D"))
    ap.add_argument("--chunk-size", type=int, default=32)
    args = ap.parse_args(argv)
    B, T, H, D = args.shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda", generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, device="cuda", generator=gen)
    g = torch.log(0.8 + 0.15 * torch.rand(B, T, H, device="cuda", generator=gen))
    beta = torch.rand(B, T, H, device="cuda", generator=gen)
    prov = provenance("cuda")
    rows = []
    for name, (dt, split, sdt) in CONFIGS.items():
        kk, vv = k.to(dt), v.to(dt)
        for loop in ("for", "while"):
            chunk_state.FOR_LOOP = loop == "for"

            def run(kk=kk, vv=vv, split=split, sdt=sdt):
                return chunk_state.chunk_states(kk, vv, g, beta, chunk_size=args.chunk_size, state_dtype=sdt,
                                                check_values=False, split=split)

            ms = do_bench(run, warmup=25, rep=200, return_mode="median")
            launch = chunk_state.LAST_LAUNCH["H"]
            rows.append(dict(config=name, loop=loop, B=B, T=T, H=H, D=D, chunk_size=args.chunk_size, median_ms=ms,
                             regs=launch.n_regs, spills=launch.n_spills, **prov))
            print(f"{name:22s} {loop:5s} {ms * 1e3:8.1f} us  regs {launch.n_regs} spills {launch.n_spills}",
                  flush=True)
    chunk_state.FOR_LOOP = True
    os.makedirs(args.out, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(args.out, "bench_chunk_states.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
