"""The peer's op-test cases (stability/peer_cases.py) on the GPU: ours under every kernel policy and the
peer (fla-core's ``chunk_mesa_net``, optional), side by side, against the float64 reference.

One row per (implementation, policy, case, quantity): the peer's metric (relative RMS error), its
tolerance, the verdict, and for ours whether the accuracy certificate warned (forward or adjoint).
Writes ``peer_cases.csv`` and prints pass counts per implementation.

The peer autotunes each kernel over its configurations at every new shape, which takes minutes per
case; unless ``--peer-autotune`` is given, each of its autotuned kernels keeps only its first
configuration (``triton.autotune`` is wrapped before fla is imported). That changes the peer's
launch parameters, never its arithmetic: this is an accuracy check, not a timing.

    python benchmarks/peer_cases_gpu.py --out $OUT [--policies auto fp32 ...] [--no-peer | --peer-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability.kernels import mesa_chunk  # noqa: E402
from mesa_stability.kernels.mesa import KERNEL_POLICIES  # noqa: E402
from mesa_stability.stability.peer_cases import PEER_CASES, check_cases  # noqa: E402
from mesa_stability.stability.provenance import provenance  # noqa: E402


def first_config_autotune() -> None:
    """Make ``triton.autotune`` keep only the first of its configurations (call before importing fla)."""
    import triton

    full = triton.autotune

    def autotune(*args, **kwargs):
        if "configs" in kwargs:
            kwargs["configs"] = kwargs["configs"][:1]
        elif args:
            args = (args[0][:1], *args[1:])
        return full(*args, **kwargs)

    triton.autotune = autotune


def main(argv=None) -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--policies", nargs="+", default=list(KERNEL_POLICIES))
    ap.add_argument("--cases", nargs="+", default=list(PEER_CASES))
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--no-peer", action="store_true", help="ours only")
    who.add_argument("--peer-only", action="store_true", help="the peer only")
    ap.add_argument("--peer-autotune", action="store_true",
                    help="let the peer autotune every kernel (minutes per shape); default: first config")
    args = ap.parse_args(argv)
    impls = [] if args.peer_only else [("ours", p, mesa_chunk, {"policy": p}) for p in args.policies]
    peer_version = "not run"
    if not args.no_peer:
        if not args.peer_autotune:
            first_config_autotune()
        try:
            import fla

            from mesa_stability.stability.peer import chunk_mesa_net

            impls.append(("fla-core", "peer", chunk_mesa_net, {}))
            peer_version = getattr(fla, "__version__", "?")
        except ImportError as err:
            peer_version = f"unavailable: {err}"
    rows = []
    prov = provenance("cuda")
    os.makedirs(args.out, exist_ok=True)
    for name in args.cases:
        for impl, pol, fn, opts in impls:
            t0 = time.time()
            case_rows = check_cases(fn, [name], device="cuda", progress=False, **opts)
            for r in case_rows:
                rows.append(dict(r, impl=impl, policy=pol, wall_s=time.time() - t0, **prov, fla_core=peer_version,
                                 peer_configs="autotuned" if args.peer_autotune else "first"))
            bad = [r["quantity"] for r in case_rows if r["verdict"] == "FAIL"]
            print(f"{name:28s} {impl:8s} {pol:15s} fails {bad} warned {case_rows[0]['flagged']}", flush=True)
        pd.DataFrame(rows).to_csv(os.path.join(args.out, "peer_cases.csv"), index=False)
    df = pd.DataFrame(rows)
    summary = df.groupby(["impl", "policy"]).agg(checks=("verdict", "size"),
                                                 passed=("verdict", lambda v: int((v == "pass").sum())),
                                                 worst_dg=("measured", lambda m: float("nan")))
    for key, grp in df.groupby(["impl", "policy"]):
        summary.loc[key, "worst_dg"] = grp.loc[grp.quantity == "dg", "measured"].max()
    print(summary.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
