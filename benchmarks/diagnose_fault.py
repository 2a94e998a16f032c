"""Which part of the speed benchmark's first call faults on this GPU: the call of
``benchmarks/bench_speed.py`` (one forward + backward of ``mesa_chunk``) in variants, each in its own
process (a CUDA fault ends the context), with ``CUDA_LAUNCH_BLOCKING=1`` so that the traceback names
the faulting launch. A variant drops one ingredient of the benchmark's call: the ceilings' large
allocations before it, ``validate=False``, ``return_stats=True``, the two-level scan, the inputs of
``bench_certificate.make_inputs`` (replaced by those of ``benchmarks/sanitize_gpu.py``).

    python benchmarks/diagnose_fault.py [--shape 4 2048 16 128] [--sanitize]

``--sanitize`` runs the full variant once more under ``compute-sanitizer --tool memcheck`` with the
caching allocator off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CASE = r'''
import sys, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from mesa_stability.kernels import mesa_chunk
B, T, H, D, ceil, validate, stats, two_level, bench_inputs, chunk, warps = {args}
if warps:
    import functools
    from mesa_stability.kernels import chunk_bwd
    chunk_bwd.chunk_contractions = functools.partial(chunk_bwd.chunk_contractions, num_warps=warps)
if ceil:
    from bench_speed import ceilings
    ceilings(torch.device("cuda"))
if not two_level:
    from bench_speed import sequential_scan
    sequential_scan().__enter__()
if bench_inputs:
    from bench_certificate import make_inputs
    inp = make_inputs(B, T, H, D)
else:
    from sanitize_gpu import inputs
    inp = inputs(B, T, H, D, D, "cuda")
leaves = [t.detach().requires_grad_() for t in inp]
out = mesa_chunk(*leaves, policy="bf16x3", steps=30, chunk_size=chunk, validate=validate, check="warn",
                 return_stats=stats)
o = out[0] if isinstance(out, tuple) else out
torch.cuda.synchronize()
print("forward ok", flush=True)
o.backward(torch.randn(o.shape, device="cuda", dtype=torch.bfloat16).to(o.dtype))
torch.cuda.synchronize()
print("backward ok", flush=True)
'''

# (label, ceilings, validate, return_stats, two-level, bench inputs, chunk size, contraction warps (0: default))
VARIANTS = [("as the benchmark", True, False, True, True, True, 64, 0),
            ("no ceilings", False, False, True, True, True, 64, 0),
            ("validate=True", True, True, True, True, True, 64, 0), ("no stats", True, False, False, True, True, 64, 0),
            ("sequential scan", True, False, True, False, True, 64, 0),
            ("sanitize inputs", True, False, True, True, False, 64, 0),
            ("none of them", False, True, False, True, False, 64, 0),
            ("chunk 32", True, False, True, True, True, 32, 0),
            ("contraction 8 warps", True, False, True, True, True, 64, 8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 2048, 16, 128], metavar=("B", "T", "H", "D"))
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--only", default="", help="the variants whose label contains this")
    a = ap.parse_args()
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    runs = [(label, [sys.executable, "-c", CASE.format(args=repr((*a.shape, *flags)))], env)
            for label, *flags in VARIANTS if a.only in label]
    if a.sanitize:
        runs += [(f"{label}, memcheck", ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "10", *cmd],
                  dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")) for label, cmd, _ in list(runs)]
    for label, cmd, e in runs:
        r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=400)
        lines = (r.stdout + r.stderr).strip().splitlines()
        where = [ln.strip() for ln in lines if "File" in ln and ("kernels" in ln or "mesa_stability" in ln)][-3:]
        checker = [ln for ln in lines if ln.startswith("=========")][:12]
        print(f"{label}: rc {r.returncode} | {' | '.join(lines[-2:])[:240]} | {' '.join(where)[:300]}", flush=True)
        for ln in checker:
            print("   ", ln[:300], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
