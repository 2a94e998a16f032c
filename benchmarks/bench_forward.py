"""GPU benchmark of the Mesa forward: our kernels vs the peer (fla-core) vs causal SDPA, one run.

For every shape (B, T, H, D) and configuration (policy x fixed 10 / 30 steps / tolerance 1e-4):
median time (``triton.testing.do_bench``, median of repeated runs after warm-up), model TFLOP/s,
mean CG steps, and the relative error of the output against the float64 exact solver on a slice
(batch entry 0, two heads, the first ``--slice-T`` tokens: a prefix is a problem of its own).
The peer's ``fla.ops.mesa_net.chunk_mesa_net`` (optional dependency) runs on the same inputs in
the same process, and so does PyTorch's causal ``scaled_dot_product_attention``.

Inputs: bf16 q, k (unit norm), v ~ N(0, 1); gamma ~ U(0.8, 0.95), beta ~ U(0, 1), lam ~ U(0.5, 1.5)
(the ``well_conditioned`` stress case's gates). Writes ``bench_forward.csv``, ``bench_forward.md``
and ``env.json`` to ``--out``.

Model FLOPs per token and head (C = chunk size): chunk states ``2 D (D + Dv)``; each CG step
``2 (D^2 + 2 C D)`` (P H_c, P K^T, (P K^T * M) K); output ``2 (D Dv + C D + C Dv)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability import (
    kernels,
    solvers,  # noqa: E402
)
from mesa_stability.kernels import mesa_chunk  # noqa: E402
from mesa_stability.kernels.chunk_state import chunk_states  # noqa: E402
from mesa_stability.stability.metrics import rel_error  # noqa: E402

SHAPES = [(4, 2048, 16, 128), (8, 4096, 8, 128), (4, 4096, 16, 64), (1, 16384, 16, 128)]
POLICIES = ["bf16x3", "tf32", "fp32", "bf16-fp32state", "bf16-bf16state", "fp16-fp32state", "fp16-fp16state"]
CONFIGS = [("steps=10", dict(steps=10)), ("steps=30", dict(steps=30)), ("tol=1e-4", dict(steps=30, tol=1e-4))]


def make_inputs(B, T, H, D, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)

    def u(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)

    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, device=device), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, device=device), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen, device=device)
    g = torch.log(u((B, T, H), 0.8, 0.95))
    beta = u((B, T, H), 0.0, 1.0)
    lam = u((H, D), 0.5, 1.5)
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), g.float(), beta.float(), lam.float()


def reference_slice(inp, slice_T, heads=2):
    q, k, v, g, beta, lam = inp
    T = min(slice_T, q.shape[1])
    sl = (slice(0, 1), slice(0, T), slice(0, heads))
    p = solvers.MesaProblem(q[sl].double(), k[sl].double(), v[sl].double(), g[sl].double(), beta[sl].double(),
                            lam[:heads].double())
    return sl, solvers.solve(p, "exact", block=32).o


def flops(B, T, H, D, Dv, C, mean_steps):
    per = 2 * D * (D + Dv) + mean_steps * 2 * (D * D + 2 * C * D) + 2 * (D * Dv + C * D + C * Dv)
    return B * T * H * per


def bench(fn, rep_ms=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def bench_shape(B, T, H, D, args, peer):
    """All rows of one shape: our policies x configs x chunk sizes, the peer, SDPA."""
    rows = []
    inp = make_inputs(B, T, H, D)
    q, k, v, g, beta, lam = inp
    sl, o_ref = reference_slice(inp, args.slice_T)
    shape = f"({B},{T},{H},{D})"
    print(f"shape {shape}", flush=True)
    for pol_name in args.policies:
        pol = solvers.get_policy(pol_name)
        kp, vp = k.to(pol.input_dtype), v.to(pol.input_dtype)
        for name, cfg in [c for c in CONFIGS if c[0] in args.configs]:
            for C, nw in [(c, w) for c in args.chunk_sizes for w in args.num_warps]:
                run_ours = functools.partial(mesa_chunk, *inp, policy=pol, chunk_size=C, validate=False,
                                             num_warps=nw, **cfg)
                o, st = run_ours(return_stats=True)
                err = rel_error(o[sl].double(), o_ref)
                launch = kernels.mesa.LAST_LAUNCH.get("chunk_cg")  # resource report of the CG kernel
                regs, spills = getattr(launch, "n_regs", None), getattr(launch, "n_spills", None)
                ms = bench(run_ours)
                split = pol.operand == "bf16x3"
                ms_states = bench(functools.partial(chunk_states, *((k, v) if split else (kp, vp)), g, beta,
                                                    chunk_size=C, state_dtype=pol.state_dtype, check_values=False,
                                                    split=split))
                mean_steps = st.mean_steps
                rows.append(dict(impl="ours", shape=shape, B=B, T=T, H=H, D=D, policy=pol.name, config=name,
                                 chunk_size=C, num_warps=nw or "auto", ms=ms, ms_states=ms_states,
                                 tflops=flops(B, T, H, D, D, C, mean_steps) / ms / 1e9,
                                 mean_steps=mean_steps, max_steps=int(st.steps.max()), rel_err_o=err,
                                 cg_regs=regs, cg_spills=spills))
                print(f"  ours {pol.name:15s} {name:9s} C={C:3d} w={nw} {ms:8.3f} ms (states {ms_states:.3f}) "
                      f"steps {mean_steps:5.2f} err {err:.2e} regs {regs} spills {spills}", flush=True)
    if peer is not None:
        for name, steps in (("steps=10", 10), ("steps=30", 30)):
            run_peer = functools.partial(peer, *inp, max_CG_iteration=steps)
            try:
                o = run_peer()[0]
                err = rel_error(o[sl].double(), o_ref)
                ms = bench(run_peer)
                rows.append(dict(impl="fla-core", shape=shape, B=B, T=T, H=H, D=D, policy="peer", config=name,
                                 chunk_size=64, ms=ms, tflops=flops(B, T, H, D, D, 64, steps) / ms / 1e9,
                                 mean_steps=steps, max_steps=steps, rel_err_o=err))
                print(f"  fla  {name:9s} {ms:8.3f} ms err {err:.2e}", flush=True)
            except Exception as exc:  # recorded in the results, not hidden
                rows.append(dict(impl="fla-core", shape=shape, config=name, error=repr(exc)[:300]))
                print(f"  fla  {name} failed: {exc!r}"[:300], flush=True)
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
    ms = bench(functools.partial(torch.nn.functional.scaled_dot_product_attention, qs, ks, vs, is_causal=True))
    # causal attention: half of the 4 T^2 D FLOPs of full attention, per batch entry and head
    rows.append(dict(impl="sdpa", shape=shape, B=B, T=T, H=H, D=D, policy="bf16", config="causal", ms=ms,
                     tflops=B * H * 2 * T * T * D / ms / 1e9))
    print(f"  sdpa {ms:8.3f} ms", flush=True)
    return rows


def run(args):
    dev_name = torch.cuda.get_device_name()
    try:
        import fla
        from fla.ops.mesa_net import chunk_mesa_net

        peer_version = getattr(fla, "__version__", "?")
    except Exception as err:  # optional dependency
        chunk_mesa_net, peer_version = None, f"unavailable: {err}"
    import pandas as pd

    rows = []
    os.makedirs(args.out, exist_ok=True)
    for B, T, H, D in (SHAPES[:1] if args.quick else SHAPES):
        rows += bench_shape(B, T, H, D, args, chunk_mesa_net)
        # after every shape: a run stopped by a time limit keeps what it measured
        pd.DataFrame(rows).assign(device=dev_name).to_csv(os.path.join(args.out, "bench_forward.partial.csv"),
                                                          index=False)
        torch.cuda.empty_cache()
    return rows, dev_name, peer_version


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[32])
    ap.add_argument("--num-warps", nargs="+", type=int, default=[None], help="CG kernel warps (default: auto)")
    ap.add_argument("--slice-T", type=int, default=512)
    ap.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_forward needs a CUDA GPU")
    import pandas as pd
    import triton

    t0 = time.time()
    rows, dev_name, peer_version = run(args)
    os.makedirs(args.out, exist_ok=True)
    df = pd.DataFrame(rows)
    df.insert(0, "device", dev_name)
    df.to_csv(os.path.join(args.out, "bench_forward.csv"), index=False)
    env = {"device": dev_name, "torch": torch.__version__, "triton": triton.__version__, "fla_core": peer_version,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.time() - t0}
    with open(os.path.join(args.out, "env.json"), "w") as fh:
        json.dump(env, fh, indent=1)
    with open(os.path.join(args.out, "bench_forward.md"), "w") as fh:
        fh.write(f"# Forward benchmark on {dev_name}\n\n{json.dumps(env)}\n\n")
        cols = [c for c in ("impl", "shape", "policy", "config", "chunk_size", "ms", "ms_states", "tflops",
                            "mean_steps", "rel_err_o", "cg_regs", "cg_spills", "error") if c in df.columns]
        fh.write(df[cols].to_markdown(index=False) if hasattr(df, "to_markdown") and _has_tabulate()
                 else df[cols].to_string(index=False))
    print(json.dumps(env))
    return 0 if math.isfinite(df.ms.dropna().sum()) else 1


def _has_tabulate():
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
