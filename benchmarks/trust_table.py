"""The long low-rank case on the GPU: relative error of o per policy and T, and what the certificate says.

Case (the family where finite wrong outputs used to pass silently): keys from a 2-dimensional
subspace, gamma = 1, beta = 1, lam = 0.25, bf16 q/k/v, B = 1, H = 4, D = 64 (``--D``), seed 0.
Reference: float64 blocked Cholesky (solvers.solve "exact") on the same bf16-rounded inputs, on the
GPU. Writes one CSV row per (T, policy): o error, worst-token x error, whether the certificate
flagged it, its largest bound, tier, kappa (free bound and from the reference), wall time.
``--before DIR`` runs the kernels of an older tree (its ``kernels`` / ``solvers`` packages) without
the certificate, for a before/after comparison.

    python benchmarks/trust_table.py --out $OUT/trust.csv [--T 1024 4096 16384 65536] [--D 64]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--policies", nargs="+", default=["auto", "bf16x3", "fp32", "tf32", "fp16-fp16state",
                                                       "bf16-bf16state", "bf16-fp32state", "fp16-fp32state"])
    ap.add_argument("--before", default=None, help="root of an older tree whose kernels to run (no certificate)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    root = args.before or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from mesa_stability import solvers
    from mesa_stability.kernels import mesa_chunk
    from mesa_stability.stability.cases import random_problem

    before = args.before is not None
    from mesa_stability.stability.provenance import git_commit

    commit = git_commit()
    new = not os.path.exists(args.out)
    fh = open(args.out, "a", newline="")
    w = csv.DictWriter(fh, fieldnames=["tree", "T", "D", "H", "policy", "steps", "kappa_free", "o_err",
                                       "x_err_max", "finite", "flagged", "max_bound", "tier", "wall_ms", "device",
                                       "torch", "commit"])
    if new:
        w.writeheader()
    dev = "cuda"
    for T in args.T:
        p = random_problem(1, T, args.H, args.D, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                           lam_range=(0.25, 0.25), key_rank=2)
        q, k, v = (t.to(torch.bfloat16).to(dev) for t in (p.q, p.k, p.v))
        g, beta, lam = (t.float().to(dev) for t in (p.g, p.beta, p.lam))
        t0 = time.time()
        pr = solvers.MesaProblem(q.double(), k.double(), v.double(), g.double(), beta.double(), lam.double())
        ref = solvers.solve(pr, "exact", block=128)
        kappa = float(((pr.trace_H() + lam.double().amax(-1)) / lam.double().amin(-1)).max())
        print(f"T={T}: reference {time.time() - t0:.1f} s, kappa <= {kappa:.3g}", flush=True)
        for pol in args.policies:
            if before and pol == "auto":
                continue
            opts = dict(steps=args.steps, policy=pol, return_stats=True, return_x=True)
            flagged, cert = False, None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.synchronize()
                t1 = time.time()
                o, st = mesa_chunk(q, k, v, g, beta, lam, **opts)
                torch.cuda.synchronize()
                ms = (time.time() - t1) * 1e3
                if not before:
                    # on CUDA the verdict is deferred (solvers.verdict): reading the certificate waits for
                    # it and gives its warning here, inside the capture
                    cert = st.certificate
            if not before:
                flagged = any("accuracy certificate" in str(c.message) for c in caught)
            ex = (st.x.double() - ref.x).norm(dim=-1) / ref.x.norm(dim=-1)
            row = dict(tree="before" if before else "after", T=T, D=args.D, H=args.H, policy=pol, steps=args.steps,
                       kappa_free=f"{kappa:.4g}", o_err=f"{float((o.double() - ref.o).norm() / ref.o.norm()):.4g}",
                       x_err_max=f"{float(ex.max()):.4g}", finite=bool(torch.isfinite(o).all()), flagged=flagged,
                       max_bound="" if cert is None else f"{cert.max_bound:.4g}",
                       tier="" if cert is None else cert.tier, wall_ms=f"{ms:.1f}", device=torch.cuda.get_device_name(),
                       torch=torch.__version__, commit=commit)
            w.writerow(row)
            fh.flush()
            print(row, flush=True)
        del ref, pr
        torch.cuda.empty_cache()
    fh.close()
    if not before:
        # the fp32 state kernel's IR, to check that no dot accumulates into the running state
        from mesa_stability.kernels.chunk_state import LAST_LAUNCH, chunk_states

        chunk_states(k.float(), v.float(), g, beta, chunk_size=32)
        with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "chunk_state_fp32.ttgir"), "w") as ir:
            ir.write(LAST_LAUNCH["H"].asm["ttgir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
