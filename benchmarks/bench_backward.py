"""GPU benchmark of the Mesa forward + backward: ours (Triton forward, Triton adjoint solve, gradient
contractions in PyTorch or in Triton) against the peer fla-core and causal SDPA, in one run.

For shape (B, T, H, D) and configurations (policy x fixed 10 / 30 steps / tolerance 1e-4): median
ms of forward + backward (``triton.testing.do_bench``), and the relative error of every input
gradient against the float64 closed forms (:mod:`stability.gradients`) on a slice: the upstream
gradient is nonzero only on batch entry 0, two heads and the first ``--slice-T`` tokens, so by
causality the gradients there are those of the slice problem. Writes ``bench_backward.csv`` and
``env.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import solvers  # noqa: E402
from benchmarks.bench_forward import bench, make_inputs  # noqa: E402
from kernels import mesa_chunk  # noqa: E402
from stability.gradients import closed_form_gradients  # noqa: E402
from stability.metrics import rel_error  # noqa: E402

CONFIGS = [("steps=10", dict(steps=10)), ("steps=30", dict(steps=30)), ("tol=1e-4", dict(steps=30, tol=1e-4))]
NAMES = ("q", "k", "v", "g", "beta", "lam")


def fwd_bwd(fn, inp, e):
    leaves = [t.detach().requires_grad_() for t in inp]
    o = fn(*leaves)
    o = o[0] if isinstance(o, tuple) else o
    o.backward(e.to(o.dtype))
    return [t.grad for t in leaves]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", nargs=4, type=int, default=[4, 2048, 16, 128])
    ap.add_argument("--policies", nargs="+", default=["bf16x3", "fp16-fp16state", "bf16-bf16state"])
    ap.add_argument("--slice-T", type=int, default=256)
    ap.add_argument("--contractions", nargs="+", default=["torch", "triton"], choices=["torch", "triton"],
                    help="where the backward's gradient contractions run (mesa_chunk's bwd_contractions)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_backward needs a CUDA GPU")
    B, T, H, D = args.shape
    inp = make_inputs(B, T, H, D)
    gen = torch.Generator(device="cuda").manual_seed(1)
    e = torch.zeros(B, T, H, D, device="cuda")
    ts = min(args.slice_T, T)
    e[0, :ts, :2] = torch.randn(ts, 2, D, generator=gen, device="cuda")
    q, k, v, g, beta, lam = inp
    sl = (slice(0, 1), slice(0, ts), slice(0, 2))
    p64 = solvers.MesaProblem(q[sl].double(), k[sl].double(), v[sl].double(), g[sl].double(), beta[sl].double(),
                              lam[:2].double())
    ref = closed_form_gradients(p64, e[sl].double())
    ref_slices = {"q": sl, "k": sl, "v": sl, "g": sl, "beta": sl, "lam": (slice(0, 2),)}
    import pandas as pd

    os.makedirs(args.out, exist_ok=True)
    csv = os.path.join(args.out, "bench_backward.csv")
    rows = []

    def save():  # after every row: a run stopped by a time limit keeps what it measured
        df = pd.DataFrame(rows)
        df.insert(0, "shape", f"({B},{T},{H},{D})")
        df.insert(0, "device", torch.cuda.get_device_name())
        df.to_csv(csv, index=False)

    impls = [(f"{pol}/{mode}", name, functools.partial(mesa_chunk, policy=pol, validate=False,
                                                        bwd_contractions=mode, **cfg))
             for pol in args.policies for mode in args.contractions for name, cfg in CONFIGS]
    try:
        import fla
        from fla.ops.mesa_net import chunk_mesa_net

        peer = fla.__version__
        # the peer first: a run stopped by a time limit still has the comparison
        impls = [("fla-core", f"steps={s}", functools.partial(chunk_mesa_net, max_CG_iteration=s))
                 for s in (10, 30)] + impls
    except Exception as err:  # optional dependency
        peer = f"unavailable: {err}"
    for pol, name, fn in impls:
        try:
            grads = fwd_bwd(fn, inp, e)
            errs = {}
            for n, gr in zip(NAMES, grads, strict=True):
                got = gr[ref_slices[n]] if n != "lam" else gr[:2]
                errs[n] = rel_error(got.double(), ref[n]) if gr is not None else float("nan")
            ms = bench(functools.partial(fwd_bwd, fn, inp, e))
            rows.append(dict(impl="fla-core" if pol == "fla-core" else "ours", policy=pol, config=name, ms=ms,
                             **{f"err_d{n}": errs[n] for n in NAMES}))
            print(f"{pol:22s} {name:9s} fwd+bwd {ms:8.3f} ms  grad errors " +
                  " ".join(f"{n}={errs[n]:.1e}" for n in NAMES), flush=True)
            save()
        except Exception as exc:  # recorded, not hidden
            rows.append(dict(impl=pol, config=name, error=repr(exc)[:300]))
            print(f"{pol} {name} failed: {exc!r}"[:300], flush=True)
    qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

    def sdpa():
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        o.backward(e.transpose(1, 2).to(o.dtype))

    rows.append(dict(impl="sdpa", policy="bf16", config="causal", ms=bench(sdpa)))
    print(f"sdpa fwd+bwd {rows[-1]['ms']:.3f} ms")
    save()
    import triton

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "fla_core": peer, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC")}
    with open(os.path.join(args.out, "env_backward.json"), "w") as fh:
        json.dump(env, fh, indent=1)
    print(json.dumps(env))


if __name__ == "__main__":
    main()
