"""How the GPU rounds fp32 operands of a Triton ``tf32`` dot: to nearest even, to nearest with ties
away from zero, or by truncation (the low 13 mantissa bits dropped).

``a @ I`` with the identity (exact in tf32) returns the rounded operands of ``a`` (every other
product is zero). The probe values sit at a tie, above and below it, for an even and an odd last
kept bit, and with either sign; each rounding mode predicts a different set of results. Writes
``tf32_rounding.json`` (the mode that matches, per-value results, device and versions).

    python benchmarks/tf32_rounding.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mesa_stability.stability.provenance import provenance  # noqa: E402

ULP = 2.0**-10  # tf32 keeps 10 explicit mantissa bits: the ulp at 1


@triton.jit
def _identity_dot(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    a = tl.load(a_ptr + o[:, None] * N + o[None, :])
    b = tl.load(b_ptr + o[:, None] * N + o[None, :])
    tl.store(c_ptr + o[:, None] * N + o[None, :], tl.dot(a, b, input_precision="tf32"))


def candidates(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x rounded to tf32 by each mode (float64 arithmetic on |x| in [1, 2))."""
    s, m = x.sign(), x.abs().double()
    scaled = m / ULP
    fl = torch.floor(scaled)
    frac = scaled - fl
    rtne = torch.where(frac > 0.5, fl + 1, torch.where(frac < 0.5, fl, fl + (fl % 2)))
    rna = torch.where(frac >= 0.5, fl + 1, fl)
    return {"round_to_nearest_even": s * rtne * ULP, "round_to_nearest_ties_away": s * rna * ULP,
            "truncation": s * fl * ULP}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    h = 2.0**-11  # half a tf32 ulp at 1
    vals = [1 + h, 1 + 3 * h, 1 + h + 2.0**-20, 1 + h - 2.0**-20, 1 + h / 2, 1 + 3 * h / 2, 1 + 2 * h + h / 2]
    vals += [-v for v in vals]
    N = 16
    x = torch.tensor(vals, dtype=torch.float32)
    a = torch.zeros(N, N)
    a.view(-1)[: len(vals)] = x
    c = torch.empty(N, N, device="cuda")
    _identity_dot[(1,)](a.cuda(), torch.eye(N, device="cuda"), c, N=N)
    got = c.cpu().view(-1)[: len(vals)].double()
    match = {mode: bool(torch.equal(got, want)) for mode, want in candidates(x).items()}
    result = {"matches": [m for m, ok in match.items() if ok], "per_mode": match,
              "values": [{"x": float(v), "tf32_dot": float(g)} for v, g in zip(x.tolist(), got.tolist(), strict=True)],
              **provenance("cuda")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tf32_rounding.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: result[k] for k in ("matches", "per_mode", "device")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
