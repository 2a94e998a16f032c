"""Diagnose the fp32 kernel policy on the long low-rank case (GPU): which stage loses accuracy.

Case: keys from a 2-dimensional subspace, gamma = 1, beta = 1, lam = 0.25, D = 64, bf16 inputs.
Prints, per policy and T: the relative error of x and o against float64 Cholesky, the error of
the kernel's chunk states against float64 states, and the error when the CG kernel runs on
float64-accurate states (rounded to fp32). Writes the PTX instruction counts of the kernels.
"""
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mesa_stability import solvers  # noqa: E402
from mesa_stability.kernels import mesa  # noqa: E402
from mesa_stability.kernels.chunk_state import chunk_states  # noqa: E402
from mesa_stability.solvers.chunk_state import ChunkedSystem  # noqa: E402
from mesa_stability.stability.cases import random_problem  # noqa: E402

out_dir = os.environ.get("OUT", "/tmp")
dev = "cuda"
rows = []
for T in (4096, 16384):
    p = random_problem(1, T, 2, 64, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                       lam_range=(0.25, 0.25), key_rank=2)
    q, k, v = (t.to(torch.bfloat16).to(dev) for t in (p.q, p.k, p.v))
    g, beta, lam = (t.float().to(dev) for t in (p.g, p.beta, p.lam))
    pr = solvers.MesaProblem(q.double(), k.double(), v.double(), g.double(), beta.double(), lam.double())
    t0 = time.time()
    ref = solvers.solve(pr, "exact", block=256)
    S64 = ChunkedSystem.build(pr, solvers.get_policy("fp64"), 32)
    print(f"T={T} reference {time.time() - t0:.1f}s", flush=True)
    for pol in ("fp32", "bf16x3", "tf32"):
        P = solvers.get_policy(pol)
        split = P.operand == "bf16x3"
        ks, vs = (k, v) if split else (k.float(), v.float())
        Hc, Gc, _ = chunk_states(ks, vs, g, beta, chunk_size=32, split=split)
        h_err = float(((Hc.double() - S64.Hc).flatten(-2).norm(dim=-1)
                       / S64.Hc.flatten(-2).norm(dim=-1).clamp_min(1e-30)).max())
        for steps in (3, 5, 10, 30):
            o, st = mesa.mesa_chunk(q, k, v, g, beta, lam, steps=steps, policy=pol, chunk_size=32,
                                    return_stats=True, return_x=True)
            ex = (st.x.double() - ref.x).norm(dim=-1) / ref.x.norm(dim=-1)
            eo = float((o.double() - ref.o).norm() / ref.o.norm())
            bad = (ex > 0.1).nonzero()
            first = int(bad[:, 1].min()) if len(bad) else -1
            # the CG kernel on fp64-accurate states rounded to fp32
            cfg = solvers.spec.SolverSpec(policy=P, steps=steps, chunk_size=32)
            orig = mesa.chunk_states
            mesa.chunk_states = lambda *a, S=S64, **kw: (S.Hc.float().contiguous(), S.Gc.float().contiguous(),
                                                          (S.H_final.float(), S.G_final.float()))
            try:
                o2, _, _, _, x2, _ = mesa._triton_forward(q, k, v, g, beta, lam, None, cfg, None)
            finally:
                mesa.chunk_states = orig
            ex2 = float(((x2.double() - ref.x).norm(dim=-1) / ref.x.norm(dim=-1)).max())
            row = dict(T=T, policy=pol, steps=steps, o_err=eo, x_err_max=float(ex.max()), first_bad_token=first,
                       state_err_max=h_err, x_err_max_with_fp64_states=ex2)
            rows.append(row)
            print(row, flush=True)
    for name, ck in mesa.LAST_LAUNCH.items():
        try:
            ptx = ck.asm["ptx"]
        except Exception:
            continue
        counts = {op: len(re.findall(op, ptx)) for op in (r"mma\.", r"wgmma", r"fma\.rn\.f32", r"div\.full",
                                                          r"div\.rn", r"div\.approx", r"sqrt\.approx",
                                                          r"sqrt\.rn", r"ex2\.approx", r"cvt\.rna\.tf32")}
        print(name, counts, flush=True)
        with open(os.path.join(out_dir, f"{name}.ptx"), "w") as fh:
            fh.write(ptx)
with open(os.path.join(out_dir, "diagnose_fp32.json"), "w") as fh:
    json.dump(rows, fh, indent=1)
