"""Which configuration of the op faults on this GPU: each case in its own process (a CUDA fault ends the
context), CUDA_LAUNCH_BLOCKING=1 so that the traceback names the faulting launch.

    python benchmarks/diagnose_fault.py
"""

from __future__ import annotations

import os
import subprocess
import sys

CASE = r'''
import sys, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from bench_certificate import make_inputs
from mesa_stability.kernels import chunk_state, mesa_chunk
B, T, H, D, policy, scan, backward = {args}
if scan == "sequential":
    chunk_state.scan_segments = lambda *a: 1
inp = [t.detach().requires_grad_() for t in make_inputs(B, T, H, D)]
o = mesa_chunk(*inp, policy=policy, steps=30, validate=False, check="warn")
torch.cuda.synchronize()
print("forward ok", flush=True)
if backward:
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print("backward ok", {{k: type(v).__name__ for k, v in chunk_state.LAST_LAUNCH.items()}}, flush=True)
'''

CASES = [(4, 2048, 16, 128, "bf16x3", "two-level", False), (4, 2048, 16, 128, "bf16x3", "two-level", True),
         (4, 2048, 16, 128, "bf16x3", "sequential", True), (1, 8192, 16, 128, "bf16x3", "two-level", True),
         (4, 2048, 16, 64, "bf16x3", "two-level", True)]


def main() -> int:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for case in CASES:
        r = subprocess.run([sys.executable, "-c", CASE.format(args=repr(case))], env=env, capture_output=True,
                           text=True, timeout=240)
        tail = (r.stdout + r.stderr).strip().splitlines()
        where = [ln.strip() for ln in tail if "File" in ln and ("kernels" in ln or "mesa_stability" in ln)][-4:]
        print(case, "rc", r.returncode, "|", " | ".join(tail[-2:])[:300], "|", " ".join(where)[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
