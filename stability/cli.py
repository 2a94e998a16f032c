"""The ``mesa`` command.

Subcommands:

* ``mesa stability``: the stability report: a grid of solver x policy x stress case x size x
  setting against the float64 exact reference, written as a tidy CSV, a Markdown report and
  PNG plots (``--preset quick`` on a CPU in about a minute, ``--preset full`` for more).
* ``mesa verify``: the suite's self-check on a small seeded problem: the float64 exact solver
  against the mpmath reference, then every solver and policy against the float64 exact solver,
  printed as a table (error, backward error, stability ratio, steps).
"""

from __future__ import annotations

import argparse
import sys
import time

import solvers

from . import metrics
from .cases import random_problem
from .reference import mp_solve


def _cmd_verify(args: argparse.Namespace) -> int:
    import pandas as pd

    problem = random_problem(B=1, T=args.T, H=2, D=args.D, seed=args.seed)
    print(f"problem: {problem!r}, gamma in [0.9, 1], lam in [0.25, 1.25], seed {args.seed}")
    t0 = time.perf_counter()
    x_mp, o_mp = mp_solve(problem, dps=50)
    t_mp = time.perf_counter() - t0
    ref = solvers.solve(problem, "exact")
    print(f"exact (fp64) vs mpmath (50 digits, {t_mp:.1f} s): rel. error x {metrics.rel_error(ref.x, x_mp):.2e}, "
          f"o {metrics.rel_error(ref.o, o_mp):.2e}")
    kappa = metrics.condition_numbers(problem)
    rows = []
    configs = [("exact", {}), ("sherman_morrison", {}), ("cg", {"steps": 30}), ("cg", {"steps": 200, "tol": 1e-10}),
               ("chebyshev", {"steps": 500, "tol": 1e-10})]
    for policy in args.policies:
        pol = solvers.get_policy(policy)
        for method, opts in configs:
            t0 = time.perf_counter()
            res = solvers.solve(problem, method, pol, **opts)
            dt = time.perf_counter() - t0
            row = {"method": method, "options": ",".join(f"{k}={v}" for k, v in opts.items()) or "-",
                   "policy": pol.name}
            row.update(metrics.summarize(problem, res.x, res.o, ref.x, ref.o, pol.u, kappa))
            row["mean_steps"] = res.mean_steps
            row["wall_s"] = dt
            rows.append(row)
    df = pd.DataFrame(rows)
    cols = ["method", "options", "policy", "rel_err_x", "rel_err_o", "backward_err_max", "stability_ratio",
            "mean_steps", "wall_s"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.2e}".format):
        print(df[cols].to_string(index=False))
    print(f"kappa(H_t + Lambda): median {float(kappa.median()):.3g}, max {float(kappa.max()):.3g}. "
          "Sherman-Morrison solves the decayed-regulariser problem, so it differs from exact by design when gamma < 1.")
    return 0


def _cmd_stability(args: argparse.Namespace) -> int:
    import datetime
    import os
    import platform

    import torch

    from . import render, report

    preset = report.get_preset(args.preset)
    t0 = time.perf_counter()
    case_names = args.cases or list(preset.sizes)
    report._select("case", case_names, [], report.cases.CASES)
    df = report.run_grid(preset, args.out, seed=args.seed, cases_sel=args.cases, solvers_sel=args.solvers,
                         policies_sel=args.policies, resume=args.resume, progress=not args.no_progress)
    ref = report.reference_check(case_names, seed=args.seed)
    ref.to_csv(os.path.join(args.out, "reference_check.csv"), index=False)
    findings = {"sm_vs_cg": report.sm_vs_cg(df, preset.length_case), "floors": report.cg_floors(df, preset.floor_case),
                "stability": report.max_stability_ratios(df)}
    plots = [] if args.no_plots else render.write_plots(df, os.path.join(args.out, "plots"), preset.length_case,
                                                        preset.floor_case)
    meta = {"preset": preset.name, "description": preset.description, "rows": len(df),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".replace("  ", " "),
            "torch": torch.__version__, "wall_s": time.perf_counter() - t0}
    render.write_markdown_report(os.path.join(args.out, "report.md"), df, ref, findings, meta, plots)
    plots_note = f", plots in {os.path.join(args.out, 'plots')}" if plots else ""
    print(f"wrote {len(df)} rows to {os.path.join(args.out, 'results.csv')}, report "
          f"{os.path.join(args.out, 'report.md')}{plots_note} ({meta['wall_s']:.0f} s)")
    for name, table in findings.items():
        if len(table):
            print(f"\n{name}:\n{render.to_markdown(table)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesa", description="Numerical-stability verification and ablation suite for the Mesa layer.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {solvers.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .report import PRESETS, SOLVERS

    st = sub.add_parser("stability", help="stability report: solver x policy x case x size x setting grid",
                        description="Run the stability grid against the float64 exact reference and write "
                                    "results.csv, reference_check.csv, report.md and plots/ to --out.")
    st.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="grid size (default quick)")
    st.add_argument("--out", default="results/stability", help="output folder (default results/stability)")
    st.add_argument("--cases", nargs="+", metavar="CASE", help="only these stress cases")
    st.add_argument("--solvers", nargs="+", metavar="SOLVER", help=f"only these solvers ({', '.join(SOLVERS)})")
    st.add_argument("--policies", nargs="+", metavar="POLICY", help="only these precision policies")
    st.add_argument("--seed", type=int, default=0, help="seed of the stress cases (default 0)")
    st.add_argument("--resume", action="store_true", help="keep rows already in --out/results.csv, run the rest")
    st.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    st.set_defaults(func=_cmd_stability)
    p = sub.add_parser("verify", help="self-check: exact vs mpmath, every solver and policy vs exact",
                       description=_cmd_verify.__doc__)
    p.add_argument("--T", type=int, default=48, help="sequence length (default 48)")
    p.add_argument("--D", type=int, default=16, help="head dimension (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=["fp64", "fp32", "tf32", "bf16-fp32state", "fp16-fp32state"],
                   choices=sorted(solvers.POLICIES) + sorted(solvers.POLICY_ALIASES), metavar="POLICY",
                   help="precision policies (default: fp64 fp32 tf32 bf16-fp32state fp16-fp32state)")
    p.set_defaults(func=_cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"mesa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
