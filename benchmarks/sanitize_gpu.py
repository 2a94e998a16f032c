"""Every kernel path of the op at small shapes, in one process, for ``compute-sanitizer``.

Under ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` each tensor is its own allocation, so memcheck reports an
access just past a buffer that the caching allocator would otherwise place inside other memory (such
an access faults only when the buffer happens to end a mapped segment, which makes the fault depend
on what ran before), and initcheck reports reads of memory nothing wrote (``torch.empty``).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_gpu.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python benchmarks/sanitize_gpu.py

``--device cpu`` runs the same cases through the Triton interpreter (TRITON_INTERPRET=1), a smoke test
of this script. Each case prints one line; a failing case prints its exception and the run goes on.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")

# (name, B, T, H, D, Dv, options): the paths of the op. T = 1000 leaves a partial last chunk; with
# chunk_size 32 it gives 32 chunks, enough for the two-level scan's segments (MIN_SEGMENT_CHUNKS = 8).
CASES = [
    ("bf16x3 steps30 D128 B4H16", 4, 512, 16, 128, 128, dict(policy="bf16x3", steps=30)),
    ("bf16x3 steps30 D128", 2, 1000, 2, 128, 128, dict(policy="bf16x3", steps=30)),
    ("auto tol1e-4 D128", 2, 1000, 2, 128, 128, dict(policy="auto", tol=1e-4)),
    ("auto tol1e-4 D64", 2, 1000, 2, 64, 64, dict(policy="auto", tol=1e-4)),
    ("fp16-fp16state tol1e-4 D128", 2, 1000, 2, 128, 128, dict(policy="fp16-fp16state", tol=1e-4)),
    ("bf16-bf16state steps5 D64", 2, 1000, 2, 64, 64, dict(policy="bf16-bf16state", steps=5)),
    ("fp32 tol1e-6 jacobi D128 Dv64", 1, 777, 2, 128, 64, dict(policy="fp32", tol=1e-6, x0="jacobi",
                                                               precond="jacobi")),
    ("tf32 steps30 chunk64 D128", 1, 1000, 2, 128, 128, dict(policy="tf32", steps=30, chunk_size=64)),
    # chunk 64 with 16-bit operand codes: the contraction kernel runs them only with --contract-block-c 64
    ("bf16x3 steps30 chunk64 D64", 2, 1000, 2, 64, 64, dict(policy="bf16x3", steps=30, chunk_size=64)),
    ("auto tol1e-4 chunk64 D64", 2, 1000, 2, 64, 64, dict(policy="auto", tol=1e-4, chunk_size=64)),
    ("fp16-fp16state tol1e-4 chunk64 D64", 2, 1000, 2, 64, 64, dict(policy="fp16-fp16state", tol=1e-4,
                                                                    chunk_size=64)),
    ("bf16x3 steps30 chunk64 D128", 1, 1000, 2, 128, 128, dict(policy="bf16x3", steps=30, chunk_size=64)),
    ("auto tol1e-4 D128 states", 2, 1000, 2, 128, 128, dict(policy="auto", tol=1e-4, states=True)),
    ("auto tol1e-4 D128 varlen", 1, 1000, 2, 128, 128, dict(policy="auto", tol=1e-4, varlen=True)),
    # production shapes of benchmarks/bench_speed.py: segments that do not divide the chunks (S M > N)
    ("production bf16x3 steps30 B4T2048H16D128", 4, 2048, 16, 128, 128, dict(policy="bf16x3", steps=30)),
    ("production auto tol1e-4 B1T8192H16D128", 1, 8192, 16, 128, 128, dict(policy="auto", tol=1e-4)),
    ("production auto tol1e-4 B4T4096H16D64", 4, 4096, 16, 64, 64, dict(policy="auto", tol=1e-4)),
]


def inputs(B, T, H, D, Dv, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nrm = torch.nn.functional.normalize
    q = nrm(torch.randn(B, T, H, D, generator=gen), dim=-1)
    k = nrm(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = torch.nn.functional.logsigmoid(3 + torch.randn(B, T, H, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    lam = 0.25 + torch.nn.functional.softplus(torch.randn(H, D, generator=gen))
    dt = torch.bfloat16
    return [t.to(device) for t in (q.to(dt), k.to(dt), v.to(dt), g, beta, lam)]


def run_case(B, T, H, D, Dv, opts, device) -> str:
    from mesa_stability.kernels import mesa_chunk, mesa_step

    opts = dict(opts)
    states, varlen = opts.pop("states", False), opts.pop("varlen", False)
    inp = [t.detach().requires_grad_() for t in inputs(B, T, H, D, Dv, device)]
    kw = dict(opts, check="warn", backend="triton")
    if states:
        H0 = torch.eye(D, device=device).expand(B, H, D, D).contiguous()
        G0 = 0.1 * torch.randn(B, H, Dv, D, device=device)
        o, (HT, GT) = mesa_chunk(*inp, initial_state=(H0, G0), output_final_state=True, **kw)
        loss = (o * torch.randn_like(o)).sum() + HT.square().mean() + GT.square().mean()
    elif varlen:
        cu = torch.tensor([0, 100, 101, 450, T], dtype=torch.int32, device=device)
        o = mesa_chunk(*inp, cu_seqlens=cu, **kw)
        loss = (o * torch.randn_like(o)).sum()
    else:
        o = mesa_chunk(*inp, **kw)
        loss = (o * torch.randn_like(o)).sum()
    loss.backward()
    grads = [t.grad for t in inp]
    finite = all(bool(x.isfinite().all()) for x in [o, *(g for g in grads if g is not None)])
    # one decode step from the final state of a short prefill
    q, k, v, g, beta, lam = (t.detach() for t in inp)
    _, st = mesa_chunk(q[:, :64], k[:, :64], v[:, :64], g[:, :64], beta[:, :64], lam, output_final_state=True,
                       **kw)
    o1, st1 = mesa_step(q[:, 64], k[:, 64], v[:, 64], g[:, 64], beta[:, 64], lam, st, check="warn",
                        steps=opts.get("steps", 30), tol=opts.get("tol"))
    finite = finite and bool(o1.isfinite().all()) and all(bool(s.isfinite().all()) for s in st1)
    if device == "cuda":
        torch.cuda.synchronize()
    return "finite" if finite else "NOT FINITE"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--shrink", type=int, default=1, help="divide T by this (the CPU smoke test)")
    ap.add_argument("--sequential", action="store_true", help="the chunk-state and adjoint scans in one segment")
    ap.add_argument("--contract-block-c", type=int, default=None,
                    help="run the backward's contraction kernel up to this chunk tile "
                         "(kernels.chunk_bwd.VERIFIED_CONTRACT_BLOCK_C): how a candidate tile is sanitized")
    a = ap.parse_args()
    if a.contract_block_c is not None:
        from mesa_stability.kernels import chunk_bwd

        chunk_bwd.VERIFIED_CONTRACT_BLOCK_C = a.contract_block_c
    if a.sequential:
        from benchmarks.bench_speed import sequential_scan

        sequential_scan().__enter__()  # for the whole run
    for name, B, T, H, D, Dv, opts in CASES:
        if a.only not in name:
            continue
        t0 = time.perf_counter()
        try:
            verdict = run_case(B, max(T // a.shrink, 65), H, D, Dv, opts, a.device)
        except Exception as e:  # noqa: BLE001 -- report and go on to the next case
            verdict = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{name}: {verdict} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
