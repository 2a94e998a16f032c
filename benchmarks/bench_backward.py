"""GPU benchmark of the Mesa forward + backward: ours against the peer fla-core and causal SDPA, one run.

Sections (all on the same bf16 inputs as ``bench_forward.py``, shape ``--shape``):

1. **fwd+bwd**: for every policy x configuration (fixed 10 / 30 steps, tolerance 1e-4 with cap 30)
   the median ms of forward + backward and of the forward alone (``triton.testing.do_bench``), and
   the relative error of every input gradient against the float64 closed forms
   (:mod:`stability.gradients`) on a slice: the upstream gradient is nonzero only on batch entry 0,
   two heads and the first ``--slice-T`` tokens, so by causality the gradients there are those of
   the slice problem. Two errors per gradient: of what autograd returns (``err_d*``; for bf16
   leaves autograd rounds dq, dk, dv to bf16, whose rounding alone is ~1.5e-3), and of the float32
   gradient the kernels compute (``err32_d*``, the same call on float32 copies of the bf16 inputs).
   The peer (``fla.ops.mesa_net.chunk_mesa_net``, optional) and SDPA run in the same process.
2. **stages**: the backward's parts at 30 steps per policy: adjoint CG solve, reverse scan of the
   adjoint states, per-chunk contractions.
3. **scales**: the float32 gradients' errors with the upstream gradient scaled by 1e-6 ... 1e2.

Writes ``bench_backward.csv``, ``bench_backward_stages.csv``, ``bench_backward_scales.csv`` and
``env_backward.json`` to ``--out`` (each CSV after every row: a run stopped by a time limit keeps
what it measured).
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

from benchmarks.bench_forward import bench, make_inputs  # noqa: E402
from mesa_stability import solvers  # noqa: E402
from mesa_stability.kernels import mesa_chunk  # noqa: E402
from mesa_stability.stability.gradients import closed_form_gradients  # noqa: E402
from mesa_stability.stability.metrics import rel_error  # noqa: E402

CONFIGS = [("steps=10", dict(steps=10)), ("steps=30", dict(steps=30)), ("tol=1e-4", dict(steps=30, tol=1e-4))]
NAMES = ("q", "k", "v", "g", "beta", "lam")
SCALES = (1e-6, 1e-4, 1e-2, 1.0, 1e2)


def fwd_bwd(fn, inp, e):
    leaves = [t.detach().requires_grad_() for t in inp]
    o = fn(*leaves)
    o = o[0] if isinstance(o, tuple) else o
    o.backward(e.to(o.dtype))
    return [t.grad for t in leaves]


def fwd(fn, inp):
    with torch.no_grad():
        return fn(*inp)


class Csv:
    """Rows of one table, rewritten to ``path`` after every row."""

    def __init__(self, path, **fixed):
        self.path, self.fixed, self.rows = path, fixed, []

    def add(self, **row):
        import pandas as pd

        self.rows.append(row)
        df = pd.DataFrame(self.rows)
        for i, (k, v) in enumerate(self.fixed.items()):
            df.insert(i, k, v)
        df.to_csv(self.path, index=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", nargs=4, type=int, default=[4, 2048, 16, 128])
    ap.add_argument("--policies", nargs="+", default=["bf16x3", "fp16-fp16state", "fp16-fp32state", "tf32",
                                                      "bf16-bf16state"])
    ap.add_argument("--slice-T", type=int, default=256)
    ap.add_argument("--contractions", nargs="+", default=["triton"], choices=["torch", "triton"],
                    help="where the backward's gradient contractions run (mesa_chunk's bwd_contractions)")
    ap.add_argument("--sections", nargs="+", default=["fwdbwd", "stages", "scales"],
                    choices=["fwdbwd", "stages", "scales"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_backward needs a CUDA GPU")
    B, T, H, D = args.shape
    inp = make_inputs(B, T, H, D)
    inp32 = [t.float() for t in inp]  # the same values in float32: autograd keeps float32 gradients
    gen = torch.Generator(device="cuda").manual_seed(1)
    e = torch.zeros(B, T, H, D, device="cuda")
    ts = min(args.slice_T, T)
    e[0, :ts, :2] = torch.randn(ts, 2, D, generator=gen, device="cuda")
    # timings use a dense upstream gradient: with zeros outside the slice the adjoint solves of those
    # tokens would stop at once (zero right-hand side) and the backward would look cheaper than it is
    e_dense = torch.randn(B, T, H, D, generator=gen, device="cuda")
    q, k, v, g, beta, lam = inp
    sl = (slice(0, 1), slice(0, ts), slice(0, 2))
    p64 = solvers.MesaProblem(q[sl].double(), k[sl].double(), v[sl].double(), g[sl].double(), beta[sl].double(),
                              lam[:2].double())
    ref = closed_form_gradients(p64, e[sl].double())

    def errors(grads, s=1.0):
        out = {}
        for n, gr in zip(NAMES, grads, strict=True):
            got = gr[:2] if n == "lam" else gr[sl]
            out[n] = rel_error(got.double(), s * ref[n]) if gr is not None else float("nan")
        return out

    os.makedirs(args.out, exist_ok=True)
    dev_name = torch.cuda.get_device_name()
    shape = f"({B},{T},{H},{D})"
    main_csv = Csv(os.path.join(args.out, "bench_backward.csv"), device=dev_name, shape=shape)

    impls = []
    try:
        import fla
        from fla.ops.mesa_net import chunk_mesa_net

        peer = fla.__version__
        # the peer first: a run stopped by a time limit still has the comparison
        impls += [("fla-core", "fla-core", f"steps={s}", functools.partial(chunk_mesa_net, max_CG_iteration=s))
                  for s in (10, 30)]
    except Exception as err:  # optional dependency
        peer = f"unavailable: {err}"
    impls += [("ours", f"{pol}" + ("" if mode == "triton" else "/torch-contractions"), name,
               functools.partial(mesa_chunk, policy=pol, validate=False, bwd_contractions=mode, **cfg))
              for pol in args.policies for mode in args.contractions for name, cfg in CONFIGS]

    if "fwdbwd" in args.sections:
        print(f"== forward + backward, shape {shape}, {dev_name}", flush=True)
        for impl, pol, name, fn in impls:
            try:
                err = errors(fwd_bwd(fn, inp, e))
                err32 = errors(fwd_bwd(fn, inp32, e)) if impl == "ours" else {}
                ms = bench(functools.partial(fwd_bwd, fn, inp, e_dense))
                ms_f = bench(functools.partial(fwd, fn, inp))
                main_csv.add(impl=impl, policy=pol, config=name, ms=ms, fwd_ms=ms_f,
                             **{f"err_d{n}": err[n] for n in NAMES},
                             **{f"err32_d{n}": err32.get(n, float("nan")) for n in NAMES})
                print(f"{pol:16s} {name:9s} fwd+bwd {ms:7.3f} ms (fwd {ms_f:6.3f})  errors "
                      + " ".join(f"{n}={err[n]:.1e}" for n in NAMES)
                      + ("  fp32 grads " + " ".join(f"{n}={err32[n]:.1e}" for n in NAMES) if err32 else ""),
                      flush=True)
            except Exception as exc:  # recorded, not hidden
                main_csv.add(impl=impl, policy=pol, config=name, error=repr(exc)[:300])
                print(f"{pol} {name} failed: {exc!r}"[:300], flush=True)
        qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

        def sdpa():
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            o.backward(e_dense.transpose(1, 2).to(o.dtype))

        def sdpa_fwd():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        main_csv.add(impl="sdpa", policy="bf16", config="causal", ms=bench(sdpa), fwd_ms=bench(sdpa_fwd))
        print(f"sdpa fwd+bwd {main_csv.rows[-1]['ms']:.3f} ms (fwd {main_csv.rows[-1]['fwd_ms']:.3f})", flush=True)

    if "stages" in args.sections:
        import mesa_stability.kernels.mesa as km
        from mesa_stability.kernels import chunk_bwd
        from mesa_stability.kernels.chunk_bwd import chunk_contractions, reverse_states
        from mesa_stability.solvers.spec import SolverSpec

        print("== backward stages at 30 steps", flush=True)
        st_csv = Csv(os.path.join(args.out, "bench_backward_stages.csv"), device=dev_name, shape=shape)
        for pol in args.policies:
            cfg = SolverSpec(policy=pol, steps=30, chunk_size=32)
            with torch.no_grad():
                _, _, _, _, x, _ = km._triton_forward(q, k, v, g, beta, lam, None, cfg, None)
                ed = e_dense
                a0, _, _, _, y, _ = km._triton_forward(q, k, v, g, beta, lam, None, cfg, None, adjoint=ed, x_fwd=x)
                DG, DH, _, _ = reverse_states(ed, y, x, g, chunk_size=32, policy=pol)
                P = functools.partial
                times = {
                    "forward": bench(P(km._triton_forward, q, k, v, g, beta, lam, None, cfg, None)),
                    "adjoint_solve": bench(P(km._triton_forward, q, k, v, g, beta, lam, None, cfg, None,
                                             adjoint=ed, x_fwd=x)),
                    "reverse_states": bench(P(reverse_states, ed, y, x, g, chunk_size=32, policy=pol)),
                }
                for nw in (4, 8):
                    times[f"contractions_w{nw}"] = bench(P(chunk_contractions, k, v, x, y, ed, g, beta, DG, DH, a0,
                                                           chunk_size=32, policy=pol, num_warps=nw))
            for stage, ms in times.items():
                st_csv.add(policy=pol, stage=stage, ms=ms)
            print(f"{pol:16s} " + "  ".join(f"{s} {m:.3f} ms" for s, m in times.items()), flush=True)
            regs = {n: (getattr(kern, "n_regs", None), getattr(kern, "n_spills", None))
                    for n, kern in {**km.LAST_LAUNCH, **chunk_bwd.LAST_LAUNCH}.items()}
            print(f"  registers, spills of the last launches: {regs}", flush=True)

    if "scales" in args.sections:
        print("== upstream gradient scales (float32 gradients, errors vs float64)", flush=True)
        sc_csv = Csv(os.path.join(args.out, "bench_backward_scales.csv"), device=dev_name, shape=shape)
        for pol in args.policies:
            for name, cfg in (CONFIGS[1], CONFIGS[2]):
                fn = functools.partial(mesa_chunk, policy=pol, validate=False, **cfg)
                for s in SCALES:
                    err = errors(fwd_bwd(fn, inp32, s * e), s)
                    sc_csv.add(policy=pol, config=name, scale=s, **{f"err32_d{n}": err[n] for n in NAMES})
                    print(f"{pol:16s} {name:9s} s={s:7.0e} " + " ".join(f"{n}={err[n]:.1e}" for n in NAMES),
                          flush=True)

    import triton

    env = {"device": dev_name, "torch": torch.__version__, "triton": triton.__version__,
           "fla_core": peer, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC")}
    with open(os.path.join(args.out, "env_backward.json"), "w") as fh:
        json.dump(env, fh, indent=1)
    print(json.dumps(env))


if __name__ == "__main__":
    main()
