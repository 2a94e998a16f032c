"""GPU benchmark of the speed table: certified policies against the peer and causal SDPA, with rooflines.

For each shape (B, T, H, D) (default: the five of the speed table in the README), bf16 inputs with
the gates of a trained layer (``bench_certificate.make_inputs``: unit-norm q and k, gamma =
sigmoid(N(3, 1)), beta = sigmoid(U), lam = 0.25 + softplus(U)), one run measures the median time
(``triton.testing.do_bench``) of:

- ours, certificate on (``check="warn"``), for each configuration of ``CONFIGS`` and each scan of the
  chunk states: ``two-level`` (the default, ``kernels.chunk_state.scan_segments``) and
  ``sequential`` (one segment, the scan before the two-level one), forward + backward and, for
  T <= ``--fwd-max-T``, the forward alone;
- the peer (``fla.ops.mesa_net.chunk_mesa_net``, 30 fixed CG steps; optional), likewise;
- ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.

With ``--varlen N`` (default 64; 0 skips it), packed sequences: N sequences of log-uniform lengths
(64 to 4096 before scaling, seed 0) summing to ``--varlen-tokens`` (default 65536), H = 16, D = 128,
forward + backward of ours (``bf16x3 30`` and ``auto tol 1e-4``) as one sequence with a reset at each
start (``cu_seqlens``, no final states: one launch per kernel) and per sequence (final states
requested: one launch per sequence), and of the peer with the same ``cu_seqlens``.

Every row also carries the work model and the two ceilings measured in the same process (a bf16
8192^3 matmul and a 4 GiB device copy): ``flops`` by the flop model of :func:`flops_fwd` /
:func:`flops_fwd_bwd` (the adjoint solve counted at the forward's mean steps, which the stats do not
record for the adjoint), ``roofline`` = achieved FLOP/s over the matmul's, ``bytes`` = the fewest bytes
the chunked algorithm moves (inputs and outputs once, the chunk states written and read once) and
``hbm`` = bytes / time over the copy bandwidth.

Writes ``bench_speed.csv`` (after every row: a run stopped by a time limit keeps what it measured) and
``env_speed.json`` to ``--out``, and prints the table.

With ``--isolate`` each shape, and the packed rows, run in a process of their own and their rows are
merged into one ``bench_speed.csv``: a CUDA fault (which ends the process's CUDA context) loses only
its own shape. A shape whose process fails gets a row ``impl="process"`` with the exit code and the
last lines of its output, and is run once more, ours only, with ``CUDA_LAUNCH_BLOCKING=1`` so that the
traceback in ``faults.log`` names the launch that faulted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_certificate import make_inputs  # noqa: E402
from mesa_stability.kernels import chunk_state, mesa_chunk  # noqa: E402
from mesa_stability.solvers import SolverSpec  # noqa: E402
from mesa_stability.solvers.certificate import CertificateWarning  # noqa: E402
from mesa_stability.stability.production import git_commit  # noqa: E402

SHAPES = [(4, 2048, 16, 128), (4, 4096, 16, 64), (1, 8192, 16, 128), (1, 32768, 16, 128), (1, 65536, 16, 128)]
# (label, policy, solver settings)
CONFIGS = [("bf16x3 30", "bf16x3", dict(steps=30)), ("bf16x3 tol 1e-4", "bf16x3", dict(steps=30, tol=1e-4)),
           ("auto tol 1e-4", "auto", dict(steps=30, tol=1e-4)),
           ("fp16-fp16state tol 1e-4", "fp16-fp16state", dict(steps=30, tol=1e-4))]
PEER_CHUNK = 64  # the peer's chunk size (fixed in fla.ops.mesa_net)


def flops_cg(T, H, D, Dv, C, steps):
    """FLOPs of one chunked solve per (batch entry): the chunk states (2 D (D + Dv) per token), the CG
    steps (a D x D product and the intra-chunk terms, 2 (D^2 + 2 C D) per step) and the output."""
    per = 2 * D * (D + Dv) + steps * 2 * (D * D + 2 * C * D) + 2 * (D * Dv + C * D + C * Dv)
    return T * H * per


def flops_fwd(B, T, H, D, Dv, C, steps):
    return B * flops_cg(T, H, D, Dv, C, steps)


def flops_fwd_bwd(B, T, H, D, Dv, C, steps, adjoint_steps):
    """Forward + backward: the forward, the adjoint solve (the same model), the reverse scan of the
    adjoint states (2 D (D + Dv) per token) and the per-chunk contractions (kernels.chunk_bwd: five
    C x C x D|Dv products and three state products per token)."""
    contract = 2 * C * (4 * D + 2 * Dv) + 2 * D * (2 * Dv + D)
    return B * (flops_cg(T, H, D, Dv, C, steps) + flops_cg(T, H, D, Dv, C, adjoint_steps)
                + T * H * (2 * D * (D + Dv) + contract))


def bytes_moved(B, T, H, D, Dv, C, state_bytes, backward):
    """The fewest bytes of the chunked algorithm: q, k, v (bf16) and the gates read once, o written
    once (bf16), the chunk states written once and read once; the backward adds the upstream
    gradient, the five input gradients, and the adjoint states written and read once."""
    N = -(-T // C)
    io = B * T * H * (2 * (2 * D + Dv) + 8 + 2 * Dv)
    states = 2 * B * H * N * D * (D + Dv) * state_bytes
    if backward:
        io += B * T * H * (2 * Dv + 2 * (2 * D + Dv) + 8) + H * D * 4
        states *= 2
    return io + states


def ceilings(device):
    """(bf16 matmul FLOP/s, copy bytes/s) measured on this device."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=25, rep=200, return_mode="median")
    flop_s = 2 * 8192**3 / ms * 1e3
    x = torch.empty(2**31, device=device, dtype=torch.bfloat16)  # 4 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return flop_s, 2 * 2**32 / ms * 1e3


class sequential_scan:
    """Context: the chunk-state and adjoint scans with one segment (the scan before the two-level one)."""

    def __enter__(self):
        # both scans take their segments from chunk_state.segment_layout, which calls scan_segments
        self.saved = chunk_state.scan_segments
        chunk_state.scan_segments = lambda *a: 1
        return self

    def __exit__(self, *exc):
        chunk_state.scan_segments = self.saved


def forward_backward(fn, inp, e) -> None:
    """One forward + backward of ``fn`` on fresh leaves of ``inp`` with upstream gradient ``e``."""
    leaves = [t.detach().requires_grad_() for t in inp]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(e.to(out.dtype))


def packed_lengths(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """``cu_seqlens`` (int64, ``[n+1]``) of n sequences of log-uniform lengths in [64, 4096] scaled to
    sum to ``tokens`` (each at least 1)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.empty(n).uniform_(math.log(64), math.log(4096), generator=gen))
    lens = torch.clamp((raw / raw.sum() * tokens).floor().long(), min=1)
    lens[-1] += tokens - lens.sum()  # the rounding's remainder to the last
    if lens[-1] < 1:
        raise ValueError(f"cannot pack {n} sequences into {tokens} tokens")
    return torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])


def bench_varlen(n, tokens, peer, bench, add, chunk, H=16, D=128):
    """The packed rows of the module docstring."""
    dev = torch.device("cuda")
    cu = packed_lengths(n, tokens).to(dev)
    inp = make_inputs(1, tokens, H, D)
    e = torch.randn(1, tokens, H, D, device=dev, dtype=torch.bfloat16)
    shape = f"varlen {n} seqs, {tokens} tokens, H={H}, D={D}"
    flops = sum(flops_fwd_bwd(1, int(b - a), H, D, D, chunk, 30, 30) for a, b in zip(cu[:-1], cu[1:], strict=True))

    fwd_bwd = functools.partial(forward_backward, inp=inp, e=e)

    if peer is not None:
        run = functools.partial(peer, max_CG_iteration=30, cu_seqlens=cu)
        try:
            fwd_bwd(run)
            add(impl="fla-core", shape=shape, config="30", pass_="fwd+bwd", ms=bench(lambda: fwd_bwd(run)),
                flops=flops)
        except Exception as exc:  # recorded, not hidden
            add(impl="fla-core", shape=shape, config="30", pass_="fwd+bwd", error=repr(exc)[:300])
    for label, pol, opts in [c for c in CONFIGS if c[0] in ("bf16x3 30", "auto tol 1e-4")]:
        for scan, finals in (("packed, one launch", False), ("per sequence", True)):
            run = functools.partial(mesa_chunk, policy=pol, chunk_size=chunk, validate=False, check="warn",
                                    cu_seqlens=cu, output_final_state=finals, **opts)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CertificateWarning)
                fwd_bwd(run)
                ms = bench(lambda: fwd_bwd(run))  # noqa: B023
                warned = sum(issubclass(c.category, CertificateWarning) for c in caught)
            # the flop model at 30 steps: the fixed-step rows only (a tolerance stops earlier)
            add(impl="ours", shape=shape, config=label, scan=scan, pass_="fwd+bwd", ms=ms,
                flops=flops if opts.get("tol") is None else None, warnings=warned)


def run_isolated(args, passthrough: list[str]) -> int:
    """``--isolate``: the module docstring's one process per shape, rows merged into ``args.out``."""
    import pandas as pd

    os.makedirs(args.out, exist_ok=True)
    jobs = [(s, ["--shapes", s, "--varlen", "0"]) for s in args.shapes]
    if args.varlen:
        jobs.append((f"varlen {args.varlen}", ["--shapes", "--varlen", str(args.varlen),
                                               "--varlen-tokens", str(args.varlen_tokens)]))
    merged, failed = [], 0
    for i, (name, extra) in enumerate(jobs):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), "--out", tmp, *passthrough, *extra]
            print(f"[{i + 1}/{len(jobs)}] {name}", flush=True)
            r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            print(r.stdout[-4000:], flush=True)
            csv = os.path.join(tmp, "bench_speed.csv")
            if os.path.exists(csv):
                merged.append(pd.read_csv(csv))
            if os.path.exists(os.path.join(tmp, "env_speed.json")) and i == 0:
                os.replace(os.path.join(tmp, "env_speed.json"), os.path.join(args.out, "env_speed.json"))
        if r.returncode != 0:
            failed += 1
            tail = " | ".join(r.stdout.strip().splitlines()[-3:])[:500]
            merged.append(pd.DataFrame([dict(impl="process", shape=name, error=f"rc {r.returncode}: {tail}")]))
            with tempfile.TemporaryDirectory() as tmp:
                again = subprocess.run([*cmd[:2], "--out", tmp, "--no-peer", *passthrough, *extra], text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
            with open(os.path.join(args.out, "faults.log"), "a") as f:
                f.write(f"== {name}: rc {r.returncode}; again with CUDA_LAUNCH_BLOCKING=1, ours only: "
                        f"rc {again.returncode}\n{again.stdout[-6000:]}\n")
        if merged:
            pd.concat(merged, ignore_index=True).to_csv(os.path.join(args.out, "bench_speed.csv"), index=False)
    print(f"{len(jobs) - failed} of {len(jobs)} processes ok", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    import pandas as pd
    import triton
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES],
                    help="B,T,H,D per shape (default: the speed table's five)")
    ap.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS])
    ap.add_argument("--scans", nargs="+", default=["two-level", "sequential"], choices=["two-level", "sequential"])
    ap.add_argument("--fwd-max-T", type=int, default=4096, help="time the forward alone up to this T")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--varlen", type=int, default=64, help="packed sequences to time (0: none)")
    ap.add_argument("--varlen-tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=SolverSpec().chunk_size,
                    help="our chunk size (default: the op's; the peer's is fixed at 64)")
    ap.add_argument("--isolate", action="store_true", help="each shape in its own process (see the docstring)")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        assert all(len(s) == 4 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes takes B,T,H,D with positive ints, got {args.shapes}")
    if args.chunk < 1:
        ap.error(f"--chunk must be positive, got {args.chunk}")
    if args.varlen < 0 or (args.varlen and args.varlen_tokens < args.varlen):
        ap.error(f"--varlen must be >= 0 and at most --varlen-tokens, got {args.varlen}, {args.varlen_tokens}")
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA device")
    if args.isolate:
        passthrough = ["--configs", *args.configs, "--scans", *args.scans, "--fwd-max-T", str(args.fwd_max_T),
                       "--chunk", str(args.chunk)]
        return run_isolated(args, passthrough + (["--no-peer"] if args.no_peer else []))
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    bench = functools.partial(do_bench, warmup=25, rep=200, return_mode="median")
    flop_s, bw = ceilings(dev)
    peer, peer_version = None, None
    if not args.no_peer:
        try:
            import fla
            from fla.ops.mesa_net import chunk_mesa_net as peer

            peer_version = fla.__version__
        except ImportError as err:
            peer_version = f"unavailable: {err}"
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               fla_core=peer_version, commit=git_commit(), python=platform.python_version(),
               matmul_tflops=flop_s / 1e12, copy_tb_s=bw / 1e12, date=time.strftime("%Y-%m-%d %H:%M UTC"))
    with open(os.path.join(args.out, "env_speed.json"), "w") as f:
        json.dump(env, f, indent=1)
    print(env, flush=True)
    rows = []

    def add(**row):
        row.setdefault("chunk", {"fla-core": PEER_CHUNK, "ours": args.chunk}.get(row.get("impl")))
        row.update(device=env["device"], commit=env["commit"], torch=env["torch"], triton=env["triton"])
        if row.get("flops") and row.get("ms"):
            row["tflops"] = row["flops"] / row["ms"] / 1e9
            row["roofline"] = row["flops"] / (row["ms"] * 1e-3) / flop_s
        if row.get("bytes") and row.get("ms"):
            row["hbm"] = row["bytes"] / (row["ms"] * 1e-3) / bw
        rows.append(row)
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        pd.DataFrame(rows).to_csv(os.path.join(args.out, "bench_speed.csv"), index=False)

    chunk = args.chunk
    for B, T, H, D in shapes:
        inp = make_inputs(B, T, H, D)
        e = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
        shape = f"({B},{T},{H},{D})"
        timed_fwd = T <= args.fwd_max_T

        fwd_bwd = functools.partial(forward_backward, inp=inp, e=e)

        if peer is not None:
            run = functools.partial(peer, max_CG_iteration=30)
            try:
                fwd_bwd(run)  # the autotuning compile, once
                ms = bench(lambda: fwd_bwd(run))  # noqa: B023
                add(impl="fla-core", shape=shape, config="30", pass_="fwd+bwd", ms=ms,
                    flops=flops_fwd_bwd(B, T, H, D, D, PEER_CHUNK, 30, 30),
                    bytes=bytes_moved(B, T, H, D, D, PEER_CHUNK, 4, True))
                if timed_fwd:
                    with torch.no_grad():
                        ms = bench(lambda: run(*inp))  # noqa: B023
                    add(impl="fla-core", shape=shape, config="30", pass_="fwd", ms=ms,
                        flops=flops_fwd(B, T, H, D, D, PEER_CHUNK, 30),
                        bytes=bytes_moved(B, T, H, D, D, PEER_CHUNK, 4, False))
            except Exception as exc:  # recorded, not hidden (the peer can fail at some shapes)
                add(impl="fla-core", shape=shape, config="30", pass_="fwd+bwd", error=repr(exc)[:300])
        for label, pol, opts in [c for c in CONFIGS if c[0] in args.configs]:
            from mesa_stability import solvers

            sbytes = solvers.get_policy(pol).state_dtype.itemsize
            for scan in args.scans:
                run = functools.partial(mesa_chunk, policy=pol, chunk_size=chunk, validate=False, check="warn",
                                        **opts)
                with warnings.catch_warnings(record=True) as caught, \
                        (sequential_scan() if scan == "sequential" else contextlib.nullcontext()):
                    warnings.simplefilter("always", CertificateWarning)
                    leaves = [t.detach().requires_grad_() for t in inp]
                    o, st = run(*leaves, return_stats=True)
                    o.backward(e.to(o.dtype))
                    adj = st.adjoint_certificate
                    steps = st.mean_steps  # the adjoint's steps are not recorded: the model takes the same
                    ms = bench(lambda: fwd_bwd(run))  # noqa: B023
                    segs = chunk_state.LAST_LAUNCH.get("H_local") is not None
                    add(impl="ours", shape=shape, config=label, scan=scan, pass_="fwd+bwd", ms=ms,
                        mean_steps=steps, tier=st.certificate.tier, max_bound=st.certificate.max_bound,
                        adjoint_tier=adj.tier, flops=flops_fwd_bwd(B, T, H, D, D, chunk, steps, steps),
                        bytes=bytes_moved(B, T, H, D, D, chunk, sbytes, True), two_level_ran=segs)
                    if timed_fwd:
                        with torch.no_grad():
                            ms = bench(lambda: run(*inp))  # noqa: B023
                        add(impl="ours", shape=shape, config=label, scan=scan, pass_="fwd", ms=ms, mean_steps=steps,
                            flops=flops_fwd(B, T, H, D, D, chunk, steps),
                            bytes=bytes_moved(B, T, H, D, D, chunk, sbytes, False))
                    warned = sum(issubclass(c.category, CertificateWarning) for c in caught)
                rows[-1]["warnings"] = warned
                chunk_state.LAST_LAUNCH.clear()
        qs, ks, vs = (x.transpose(1, 2) for x in inp[:3])
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True)
        attn_flops = B * H * 2 * T * T * D  # causal: half of full attention's 4 T^2 D
        with torch.no_grad():
            ms = bench(lambda: sdpa(qs, ks, vs))  # noqa: B023
        add(impl="sdpa", shape=shape, config="causal", pass_="fwd", ms=ms, flops=attn_flops)
        leaves = [t.detach().requires_grad_() for t in (qs, ks, vs)]
        ms = bench(lambda: sdpa(*leaves).backward(e.transpose(1, 2)))  # noqa: B023
        add(impl="sdpa", shape=shape, config="causal", pass_="fwd+bwd", ms=ms, flops=3.5 * attn_flops)
    if args.varlen:
        bench_varlen(args.varlen, args.varlen_tokens, peer, bench, add, args.chunk)
    df = pd.DataFrame(rows)
    cols = [c for c in ("impl", "shape", "config", "scan", "pass_", "ms", "roofline", "hbm", "mean_steps", "tier")
            if c in df]
    print(df[cols].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
