"""Render a forward-benchmark CSV (bench_forward.py's output) as Markdown tables.

Usage: python benchmarks/summarize.py benchmarks/results/<run>/bench_forward.csv
One table per shape: median ms and relative error of o against float64 exact, per policy and
configuration, with the peer (fla-core) and causal SDPA from the same run. The speedup compares
fixed steps with the peer at the same steps, and a tolerance with the peer's 30 steps.
"""

from __future__ import annotations

import os
import sys

import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from stability.render import fmt  # noqa: E402


def tables(df: pd.DataFrame) -> str:
    out = []
    for shape, g in df.groupby("shape", sort=False):
        peer = {c: float(m) for c, m in g[g.impl == "fla-core"].set_index("config").ms.items()}
        rows = []
        for _, r in g.iterrows():
            if r.impl == "sdpa":
                continue
            name = "fla-core (peer)" if r.impl == "fla-core" else r.policy
            # fixed steps: against the peer at the same steps; a tolerance: against the peer's 30 steps
            base = peer.get(r.config if r.config.startswith("steps=") else "steps=30")
            speed = f"{base / r.ms:.2f}x" if base else "-"
            rows.append(f"| {name} | {r.config} | {r.ms:.3f} | {speed} | {fmt(float(r.rel_err_o))} | "
                        f"{r.mean_steps:.2f} | {fmt(float(r.tflops))} |")
        sdpa = g[g.impl == "sdpa"].ms
        head = [f"### (B, T, H, D) = {shape}", "",
                f"Causal SDPA (bf16) at the same shape: {float(sdpa.iloc[0]):.3f} ms." if len(sdpa) else "", "",
                "| policy | config | ms | speedup vs peer | rel. error of o | mean steps | model TFLOP/s |",
                "|---|---|---|---|---|---|---|"]
        out.append("\n".join(head + rows))
    return "\n\n".join(out)


if __name__ == "__main__":
    print(tables(pd.read_csv(sys.argv[1])))
