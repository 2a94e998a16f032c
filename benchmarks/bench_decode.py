"""GPU benchmark of one decode step (``kernels.mesa_step``) against the peer's one-step decode, one run.

Per batch size B (H = 16, D = Dv = 128 by default; bf16 q, k, v, fp32 gates and states; gamma =
sigmoid(N(3, 1)), beta = sigmoid(U), lam = 0.25 + softplus(U); states of a 256-token prefill of unit
keys), the median time (``triton.testing.do_bench``) of

* ``ours``: ``mesa_step`` as a user calls it (the defaults: 30 CG steps, the token's values checked,
  the certificate on, its verdict read without a host sync);
* ``ours, no value check``: ``validate=False``;
* ``ours, kernel only``: ``validate=False, check=None`` (also with 4, 8 and 16 warps instead of the
  choice of ``kernels.mesa.decode_warps``);
* ``peer``: ``fla.ops.mesa_net.mesa_net_decoding_one_step`` (30 steps), when fla-core is installed;

and ``loop_ms``: the wall time per call of 200 calls issued back to back (what a generation loop
sees, launch overheads included). Each row also has the relative error of o against a float64
solve of the same step, the bytes the step must move (the states read once and written once,
``2 B H (D^2 + Dv D) 4`` bytes) over the time as a fraction of the measured copy bandwidth of the
card (a 2 GiB device-to-device copy, bytes read plus written), and the decode kernel's registers and
spills. Writes ``bench_decode.csv`` (one row per configuration and B, with provenance).

    python benchmarks/bench_decode.py --out $OUT [--batch 1 16 64 256] [--heads 16] [--dim 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability.kernels import mesa  # noqa: E402
from mesa_stability.kernels.mesa import mesa_step  # noqa: E402
from mesa_stability.solvers.verdict import flush  # noqa: E402
from mesa_stability.stability.provenance import provenance  # noqa: E402

PREFILL = 256  # tokens whose keys build the states (a PSD H of rank min(PREFILL, D))


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read plus written)."""
    from triton.testing import do_bench

    a = torch.empty(2**29, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 4 / (ms * 1e-3)


def inputs(B: int, H: int, D: int, gen: torch.Generator):
    dev = "cuda"
    F = torch.nn.functional
    q = F.normalize(torch.randn(B, H, D, device=dev, generator=gen), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, H, D, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, H, D, device=dev, generator=gen).bfloat16()
    g = F.logsigmoid(3 + torch.randn(B, H, device=dev, generator=gen))
    beta = torch.sigmoid(torch.rand(B, H, device=dev, generator=gen))
    lam = 0.25 + F.softplus(torch.rand(H, D, device=dev, generator=gen))
    kp = F.normalize(torch.randn(B, H, PREFILL, D, device=dev, generator=gen), dim=-1)
    vp = torch.randn(B, H, PREFILL, D, device=dev, generator=gen)
    w = torch.rand(B, H, PREFILL, device=dev, generator=gen)
    Hs = torch.einsum("bhtd,bht,bhte->bhde", kp, w, kp).contiguous()
    Gs = torch.einsum("bhtv,bht,bhtd->bhvd", vp, w, kp).contiguous()
    return q, k, v, g, beta, lam, (Hs, Gs)


def reference(q, k, v, g, beta, lam, state) -> torch.Tensor:
    """o of the step in float64: H' = gamma H + beta k k^T, x = (H' + Lambda)^-1 q, o = G' x."""
    f = torch.float64
    gam, b = torch.exp(g.to(f))[..., None, None], beta.to(f)[..., None, None]
    kk, vv, qq = k.to(f), v.to(f), q.to(f)
    Hn = gam * state[0].to(f) + b * kk[..., :, None] * kk[..., None, :]
    Gn = gam * state[1].to(f) + b * vv[..., :, None] * kk[..., None, :]
    x = torch.linalg.solve(Hn + torch.diag_embed(lam.to(f)), qq[..., None])
    return (Gn @ x)[..., 0]


def configurations(a: tuple, peer) -> dict:
    """The timed calls on the inputs ``a`` = (q, k, v, g, beta, lam, state), by name."""
    q, k, v, g, beta, lam, state = a
    out = {
        "ours": lambda: mesa_step(q, k, v, g, beta, lam, state),
        "ours, no value check": lambda: mesa_step(q, k, v, g, beta, lam, state, validate=False),
        "ours, kernel only": lambda: mesa_step(q, k, v, g, beta, lam, state, validate=False, check=None),
    }
    for w in WARP_SWEEP:
        out[f"ours, kernel only, {w} warps"] = _with_warps(w, out["ours, kernel only"])
    if peer is not None:
        hkv = state[1].transpose(-1, -2).contiguous()  # the peer's layout: h_kv as [K, V] (ours is [V, K])
        out["peer"] = lambda: peer(q, k, v, g, lam, beta, state[0], hkv, max_CG_iteration=30)
    return out


WARP_SWEEP = (4, 8, 16)  # against the choice of kernels.mesa.decode_warps


def _with_warps(w: int, fn):
    def run():
        default, mesa.decode_warps = mesa.decode_warps, lambda D, programs, device: w
        try:
            return fn()
        finally:
            mesa.decode_warps = default
    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def main(argv=None) -> int:
    import pandas as pd
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        from fla.ops.mesa_net import mesa_net_decoding_one_step as peer
    except ImportError:
        peer = None
        print("fla-core is not installed: no peer rows", file=sys.stderr)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (2 GiB device-to-device, read + write)", flush=True)
    prov = provenance("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    H, D = args.heads, args.dim
    for B in args.batch:
        q, k, v, g, beta, lam, state = inputs(B, H, D, gen)
        ref = reference(q, k, v, g, beta, lam, state)
        nbytes = 2 * B * H * (D * D + D * D) * 4
        configs = configurations((q, k, v, g, beta, lam, state), peer)
        for name, fn in configs.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                o = fn()[0]
                flush()
            err = rel(o.float(), ref)
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            loop_ms = (time.perf_counter() - t0) / 200 * 1e3
            flush()
            launch = mesa.LAST_LAUNCH.get("decode") if name.startswith("ours") else None
            rows.append(dict(config=name, B=B, H=H, D=D, Dv=D, steps=30, median_ms=ms, loop_ms=loop_ms,
                             rel_err_o=err, warnings=len(caught), bytes=nbytes, GBps=nbytes / (ms * 1e-3) / 1e9,
                             frac_copy_bw=nbytes / (ms * 1e-3) / bw, copy_TBps=bw / 1e12,
                             regs=getattr(launch, "n_regs", None), spills=getattr(launch, "n_spills", None), **prov))
            r = rows[-1]
            print(f"B={B:4d} {name:22s} {ms * 1e3:8.1f} us (loop {loop_ms * 1e3:8.1f} us)  err {err:.2e}  "
                  f"{r['frac_copy_bw'] * 100:5.1f}% of copy bw  regs {r['regs']} spills {r['spills']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(args.out, "bench_decode.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
