"""Render benchmark CSVs as Markdown tables.

Usage: python benchmarks/summarize.py benchmarks/results/<run>/bench_forward.csv
       python benchmarks/summarize.py benchmarks/results/<run>/bench_backward.csv

Forward (``bench_forward.py``): one table per shape, median ms and relative error of o against
float64 exact, per policy and configuration, with the peer (fla-core) and causal SDPA from the same
run. Backward (``bench_backward.py``; its ``_stages`` and ``_scales`` CSVs beside it are rendered
too): forward + backward ms, the worst gradient error as returned and in float32, per policy and
configuration. Speedups compare fixed steps with the peer at the same steps, and a tolerance with
the peer's 30 steps.
"""

from __future__ import annotations

import os
import sys

import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability.stability.render import fmt  # noqa: E402


def _peer_ms(df: pd.DataFrame) -> dict:
    """The peer's median ms per configuration."""
    return {c: float(m) for c, m in df[df.impl == "fla-core"].set_index("config").ms.items()}


def tables(df: pd.DataFrame) -> str:
    out = []
    for shape, g in df.groupby("shape", sort=False):
        peer = _peer_ms(g)
        rows = []
        for _, r in g.iterrows():
            if r.impl == "sdpa":
                continue
            name = "fla-core (peer)" if r.impl == "fla-core" else r.policy
            speed = _speed(peer, r.config, r.ms)
            rows.append(f"| {name} | {r.config} | {r.ms:.3f} | {speed} | {fmt(float(r.rel_err_o))} | "
                        f"{r.mean_steps:.2f} | {fmt(float(r.tflops))} |")
        sdpa = g[g.impl == "sdpa"].ms
        head = [f"### (B, T, H, D) = {shape}", "",
                f"Causal SDPA (bf16) at the same shape: {float(sdpa.iloc[0]):.3f} ms." if len(sdpa) else "", "",
                "| policy | config | ms | speedup vs peer | rel. error of o | mean steps | model TFLOP/s |",
                "|---|---|---|---|---|---|---|"]
        out.append("\n".join(head + rows))
    return "\n\n".join(out)


def _speed(peer: dict, config: str, ms: float) -> str:
    """Speedup over the peer: fixed steps against the peer at the same steps, a tolerance against the
    peer's 30 steps."""
    base = peer.get(config if config.startswith("steps=") else "steps=30")
    return f"{base / ms:.2f}x" if base else "-"


GRADS = ("dq", "dk", "dv", "dg", "dbeta", "dlam")


def backward_tables(df: pd.DataFrame, stages: pd.DataFrame | None, scales: pd.DataFrame | None) -> str:
    peer = _peer_ms(df)
    rows = []
    for _, r in df.iterrows():
        if r.impl == "sdpa":
            continue
        name = "fla-core (peer)" if r.impl == "fla-core" else r.policy
        errs = " | ".join(fmt(float(r[f"err_{n}"])) for n in GRADS)
        worst32 = max(float(r[f"err32_{n}"]) for n in GRADS) if r.impl != "fla-core" else float("nan")
        rows.append(f"| {name} | {r.config} | {r.ms:.3f} | {r.fwd_ms:.3f} | {_speed(peer, r.config, r.ms)} | "
                    f"{errs} | {fmt(worst32) if worst32 == worst32 else '-'} |")
    sdpa = df[df.impl == "sdpa"]
    out = [f"Causal SDPA (bf16) at the same shape: {float(sdpa.ms.iloc[0]):.3f} ms forward + backward, "
           f"{float(sdpa.fwd_ms.iloc[0]):.3f} ms forward." if len(sdpa) else "", "",
           "| policy | config | fwd+bwd ms | fwd ms | speedup vs peer | " + " | ".join(GRADS)
           + " | worst fp32 grad |", "|---" * (6 + len(GRADS)) + "|"] + rows
    if stages is not None:
        wide = stages.pivot(index="policy", columns="stage", values="ms")[list(dict.fromkeys(stages.stage))]
        out += ["", "Backward stages at 30 steps (ms):", "", "| policy | " + " | ".join(wide.columns) + " |",
                "|---" * (1 + len(wide.columns)) + "|"]
        out += [f"| {p} | " + " | ".join(f"{v:.3f}" for v in r) + " |" for p, r in wide.iterrows()]
    if scales is not None:
        cols = [f"err32_{n}" for n in GRADS]
        agg = scales.groupby(["policy", "config"], sort=False)[cols].max()
        out += ["", f"Worst float32 gradient error over upstream scales {sorted(set(scales.scale))}:", "",
                "| policy | config | " + " | ".join(GRADS) + " |", "|---" * (2 + len(GRADS)) + "|"]
        out += [f"| {p} | {c} | " + " | ".join(fmt(float(v)) for v in r) + " |" for (p, c), r in agg.iterrows()]
    return "\n".join(out)


if __name__ == "__main__":
    path = sys.argv[1]
    df = pd.read_csv(path)
    if "fwd_ms" in df.columns:
        def side(suffix):
            p = path.replace(".csv", f"_{suffix}.csv")
            return pd.read_csv(p) if os.path.exists(p) else None

        print(backward_tables(df, side("stages"), side("scales")))
    else:
        print(tables(df))
