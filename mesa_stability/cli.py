"""The ``mesa`` command.

Subcommands:

* ``mesa stability``: the stability report: a grid of solver x policy x stress case x size x
  setting against the float64 exact reference, written as a tidy CSV, a Markdown report and
  PNG plots (``--preset quick`` on a CPU in about a minute, ``--preset full`` for more).
* ``mesa guard``: the regression guard (:mod:`stability.guard`): an implementation on the golden
  cases and the metamorphic properties against the error budgets, optionally against a baseline.
* ``mesa ablate``: the ablation LM runs (:mod:`ablations.grid`): models trained under solver
  configs, each evaluated under others, results.csv + report.md + plots.
* ``mesa softmax``: the softmax temperature study (:mod:`ablations.softmax`): the same LM trained at
  several output temperatures, ranks of its logits and representations, in- and out-of-distribution
  bits per byte and OOD detection, results.csv + report.md + plots.
* ``mesa verify``: the suite's self-check on a small seeded problem: the float64 exact solver
  against the mpmath reference, then every solver and policy against the float64 exact solver,
  printed as a table (error, backward error, stability ratio, steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import solvers
from .stability import metrics
from .stability.cases import random_problem
from .stability.provenance import provenance, provenance_line
from .stability.reference import mp_solve
from .stability.results_store import StoreLocked


def _on_cpu(res):
    """A solve result with its tensors moved to the CPU."""
    import dataclasses

    return dataclasses.replace(res, **{f.name: getattr(res, f.name).cpu() for f in dataclasses.fields(res)
                                       if hasattr(getattr(res, f.name), "cpu")})


def _cmd_verify(args: argparse.Namespace) -> int:
    import pandas as pd

    bad = [f"--{n} must be a positive integer, got {v}" for n, v in (("T", args.T), ("D", args.D)) if v < 1]
    if bad:
        print(f"mesa verify: error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    try:
        device = _device(args.device, ValueError)
    except ValueError as err:
        print(f"mesa verify: error: {err}", file=sys.stderr)
        return 2
    problem = random_problem(B=1, T=args.T, H=2, D=args.D, seed=args.seed)
    print(f"problem: {problem!r}, gamma in [0.9, 1], lam in [0.25, 1.25], seed {args.seed}")
    t0 = time.perf_counter()
    x_mp, o_mp = mp_solve(problem, dps=50)
    t_mp = time.perf_counter() - t0
    # the solvers run on --device; the comparisons are made on the CPU
    on_device = problem.to(device=device)
    ref = _on_cpu(solvers.solve(on_device, "exact"))
    print(f"exact (fp64) vs mpmath (50 digits, {t_mp:.1f} s): rel. error x {metrics.rel_error(ref.x, x_mp):.2e}, "
          f"o {metrics.rel_error(ref.o, o_mp):.2e}")
    kappa = metrics.condition_numbers(problem)
    own = _on_cpu(solvers.solve(on_device, "exact", regularizer="decayed"))  # Sherman-Morrison's problem
    rows = []
    configs = [("exact", {}), ("sherman_morrison", {}), ("cg", {"steps": 30}), ("cg", {"steps": 200, "tol": 1e-10}),
               ("chebyshev", {"steps": 500, "tol": 1e-10})]
    for policy in args.policies:
        pol = solvers.get_policy(policy)
        for method, opts in configs:
            t0 = time.perf_counter()
            res = solvers.solve(on_device, method, pol, **opts)
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            res = _on_cpu(res)
            row = {"method": method, "options": ",".join(f"{k}={v}" for k, v in opts.items()) or "-",
                   "policy": pol.name}
            row.update(metrics.summarize(problem, res.x, res.o, ref.x, ref.o, pol.u, kappa))
            row["mean_steps"] = res.mean_steps
            row["wall_s"] = dt
            if method == "sherman_morrison":  # its own problem (the decayed regulariser): measured against it
                row["rel_err_o_own"] = metrics.rel_error(res.o, own.o)
            rows.append(row)
    df = pd.DataFrame(rows)
    df = pd.concat([df, pd.DataFrame(_verify_verdicts(df, float(kappa.max()), args.D, metrics.rel_error(ref.o, o_mp)))],
                   axis=1)
    cols = ["method", "options", "policy", "rel_err_x", "rel_err_o", "rel_err_o_own", "backward_err_max",
            "mean_steps", "wall_s", "budget_o", "verdict"]
    with pd.option_context("display.width", 220, "display.float_format", "{:.2e}".format):
        print(df[cols].to_string(index=False))
    note = (f"kappa(H_t + Lambda): median {float(kappa.median()):.3g}, max {float(kappa.max()):.3g}. "
            "Sherman-Morrison solves another problem by design (the decayed regulariser zeta_t Lambda, zeta_t = "
            "prod gamma): rel_err_o_own is its error against the exact solve of that problem, and its rel_err_o "
            "against Mesa's is not a failure. budget_o = 8 u kappa_max (a converged setting: its tolerance in place "
            "of u where larger) + 2 u, the guard's o budget (stability/budgets.toml); CG at a fixed step count "
            "below D is not judged (n/a).")
    print(note)
    failed = df[df.verdict == "FAIL"]
    mp_ok = metrics.rel_error(ref.o, o_mp) <= _fp64_budget(float(kappa.max()))
    if len(failed) or not mp_ok:
        lines = [] if mp_ok else [f"exact (fp64) vs mpmath: o {metrics.rel_error(ref.o, o_mp):.2e} > "
                                  f"{_fp64_budget(float(kappa.max())):.2e}"]
        lines += [f"{r.method} {r.options} {r.policy}: rel_err_o {r.rel_err_o:.2e} > budget {r.budget_o:.2e}"
                  for r in failed.itertuples()]
        verdict_line = f"FAIL: {len(lines)} check(s) above budget: " + "; ".join(lines)
    else:
        judged = int((df.verdict == "pass").sum()) + 1
        verdict_line = f"PASS: {judged} checks within budget (the mpmath check and {judged - 1} solver rows)"
    if args.out:
        from .stability.render import to_markdown

        os.makedirs(args.out, exist_ok=True)
        prov = provenance(device)
        df.assign(T=args.T, D=args.D, seed=args.seed, **prov).to_csv(os.path.join(args.out, "verify.csv"),
                                                                      index=False)
        with open(os.path.join(args.out, "verify.md"), "w") as fh:
            fh.write(f"# mesa verify (T = {args.T}, D = {args.D}, seed {args.seed})\n\n"
                     f"exact (fp64) vs mpmath (50 digits): relative error of x {metrics.rel_error(ref.x, x_mp):.2e}, "
                     f"of o {metrics.rel_error(ref.o, o_mp):.2e}.\n\n{to_markdown(df[cols])}\n\n{note}\n\n"
                     f"**{verdict_line}**\n\n{provenance_line(prov)}\n")
        print(f"wrote {os.path.join(args.out, 'verify.csv')} and verify.md")
    print(verdict_line, file=sys.stderr if verdict_line.startswith("FAIL") else sys.stdout)
    return 1 if verdict_line.startswith("FAIL") else 0


def _fp64_budget(kappa_max: float) -> float:
    """The guard's o budget (stability/budgets.toml) for float64: 8 u kappa + 2 u."""
    from .stability.guard import budget_of, load_budgets

    u = solvers.get_policy("fp64").u
    return budget_of(load_budgets(), "quantities", "o", u, kappa_max, u)[0]


def _verify_verdicts(df, kappa_max: float, D: int, mp_err: float) -> list[dict]:
    """``budget_o`` and ``verdict`` of each ``mesa verify`` row: the guard's o budget 8 u kappa_max + 2 u
    (u of the row's policy; a tolerance larger than u in its place, since CG and Chebyshev stop at
    ||r|| <= tol ||r_0||, an error up to about kappa tol), against the error of o; Sherman-Morrison
    against its own problem (``rel_err_o_own``); CG at a fixed step count below D: n/a."""
    from .stability.guard import budget_of, load_budgets

    cfg = load_budgets()
    out = []
    for r in df.itertuples():
        pol = solvers.get_policy(r.policy)
        opts = dict(kv.split("=") for kv in r.options.split(",")) if r.options != "-" else {}
        tol = float(opts["tol"]) if "tol" in opts else 0.0
        budget = budget_of(cfg, "quantities", "o", max(pol.u, tol), kappa_max, pol.u)[0]
        if r.method == "cg" and "tol" not in opts and int(opts.get("steps", 0)) < D:
            out.append({"budget_o": budget, "verdict": "n/a"})
            continue
        err = r.rel_err_o_own if r.method == "sherman_morrison" else r.rel_err_o
        out.append({"budget_o": budget, "verdict": "pass" if err <= budget else "FAIL"})
    return out


def _cmd_stability(args: argparse.Namespace) -> int:
    import datetime
    import os
    import platform

    import torch

    from .stability import render, report

    preset = report.get_preset(args.preset)
    if preset.production:
        return _cmd_stability_production(args, preset)
    used = [flag for flag, val in _production_only(args) if val]
    if used:
        print(f"mesa stability: error: {_flags(used)} to the production presets (gpu, gpu-smoke), "
              f"not to --preset {args.preset}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    case_names = args.cases or list(preset.sizes)
    try:  # run_grid checks the selected names before any work
        df = report.run_grid(preset, args.out, seed=args.seed, cases_sel=args.cases, solvers_sel=args.solvers,
                             policies_sel=args.policies, resume=args.resume, progress=not args.no_progress)
    except (report.UsageError, StoreLocked) as err:
        print(f"mesa stability: error: {err}", file=sys.stderr)
        return 2
    ref = report.reference_check(case_names, seed=args.seed)
    ref.to_csv(os.path.join(args.out, "reference_check.csv"), index=False)
    findings = {"sm_vs_cg": report.sm_vs_cg(df, preset.length_case), "floors": report.cg_floors(df, preset.floor_case),
                "stability": report.max_stability_ratios(df)}
    plots = [] if args.no_plots else render.write_plots(df, os.path.join(args.out, "plots"), preset.length_case,
                                                        preset.floor_case)
    meta = {"preset": preset.name, "description": preset.description, "rows": len(df),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".replace("  ", " "),
            "torch": torch.__version__, "wall_s": time.perf_counter() - t0, "provenance": provenance_line(provenance())}
    render.write_markdown_report(os.path.join(args.out, "report.md"), df, ref, findings, meta, plots)
    plots_note = f", plots in {os.path.join(args.out, 'plots')}" if plots else ""
    print(f"wrote {len(df)} rows to {os.path.join(args.out, 'results.csv')}, report "
          f"{os.path.join(args.out, 'report.md')}{plots_note} ({meta['wall_s']:.0f} s)")
    for name, table in findings.items():
        if len(table):
            print(f"\n{name}:\n{render.to_markdown(table)}")
    return 0


def golden_policy(policies: list[str] | None) -> str:
    """The one policy of the guard's golden preset: the given one, or the shared default."""
    from .stability import guard

    if policies and len(policies) > 1:
        raise guard.UsageError(f"--policy: --preset golden checks one policy, got {policies}")
    return policies[0] if policies else solvers.precision.DEFAULT_POLICY


def _production_only(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The flags of the production presets, with their values (None / False when not given)."""
    return [("--families", args.families), ("--T", args.T), ("--D", args.D), ("--impl", args.impl),
            ("--cache", args.cache), ("--backward-max-T", args.backward_max_T), ("--option", args.option),
            ("--no-reference-check", args.no_reference_check), ("--device", args.device), ("--steps", args.steps),
            ("--tol", args.tol), ("--jobs", args.jobs != 1)]


def _flags(used: list[str]) -> str:
    """``--a applies`` / ``--a, --b apply``."""
    return ", ".join(used) + (" applies" if len(used) == 1 else " apply")


def cli_spec(args: argparse.Namespace, base, error: type[Exception]):
    """``base`` (a SolverSpec) with ``--steps`` / ``--tol`` / a single ``--policy`` where given; a bad value
    raises ``error`` (a usage error, exit 2) naming the flag and the field."""
    changes = {}
    if getattr(args, "steps", None) is not None:
        changes["steps"] = args.steps
    if getattr(args, "tol", None) is not None:
        changes["tol"] = args.tol
    try:
        return base.replace(**changes)
    except ValueError as err:
        raise error(f"--steps / --tol: {err}") from None


def _device(name: str | None, error: type[Exception] | None = None) -> str:
    """The device of ``--device``: the one named, else cuda when available, else cpu. A CUDA device
    that is not there raises ``error`` (default: the production grid's usage error, exit 2)."""
    import torch

    if error is None:
        from .stability.production import UsageError as error
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {device}: no CUDA device is available here")
    return device


def _run_production(args: argparse.Namespace, grid_name: str, policies, families):
    """Run the selected part of a production grid (stability.production.run); returns (grid, rows, device)."""
    from .stability import production

    if args.backward_max_T is not None and args.backward_max_T < 0:
        raise production.UsageError(f"--backward-max-T must be >= 0, got {args.backward_max_T}")
    grid = production.get_grid(grid_name, seed=args.seed)
    device = _device(args.device)
    spec = cli_spec(args, production.DEFAULT_SPEC, production.UsageError)
    df = production.run(grid, args.out, families=families, Ts=args.T, Ds=args.D, policies=policies,
                        impl=args.impl, device=device, spec=spec, extra=dict(args.option or []), resume=args.resume,
                        cache_dir=args.cache,
                        backward_max_T=args.backward_max_T, reference_check=not args.no_reference_check,
                        progress=not args.no_progress, jobs=args.jobs)
    return grid, df, device


def _print_production(df) -> None:
    from .stability import production, render

    table = production.summary(df)
    if len(table):
        print("worst verdict over o, x and the gradients, and the relative error of o, per case and policy:")
        print(render.to_markdown(table))
    print("rows: " + ", ".join(f"{v} {n}" for v, n in production.counts(df).items()))


def _report_silent(df) -> None:
    if df.attrs.get("missing"):
        print(f"\n{df.attrs['missing']} run(s) missing: a parallel job died (its messages are above)", file=sys.stderr)
    bad = df[df.verdict.isin(["FAIL", "error"])]
    if len(bad):
        print(f"\n{int((bad.verdict == 'FAIL').sum())} silent failure(s) (FAIL: above budget, not flagged) and "
              f"{int((bad.verdict == 'error').sum())} error(s) (the op raised):", file=sys.stderr)
        for r in bad.itertuples():
            print(f"  {r.verdict} {r.case} {r.policy} {r.quantity}: measured {r.measured:.3g} > budget {r.budget:.3g} "
                  f"{r.note if isinstance(r.note, str) else ''}".rstrip(), file=sys.stderr)


def _cmd_guard_production(args: argparse.Namespace) -> int:
    """``mesa guard --preset production``: the production grid; exit 1 on a FAIL (silent) or error row."""
    from .stability import production

    grid_name = {"production": "production", "production-smoke": "smoke"}[args.preset]
    try:
        golden_only = [("--cases", args.cases), ("--properties", args.properties is not None),
                       ("--baseline", args.baseline), ("--write-baseline", args.write_baseline),
                       ("--bench", args.bench)]
        used = [flag for flag, val in golden_only if val]
        if used:
            raise production.UsageError(f"{_flags(used)} to --preset golden, not to --preset {args.preset}")
        if args.no_backward:
            args.backward_max_T = 0
        args.out = args.out or os.path.join("results", "production")
        t0 = time.perf_counter()
        grid, df, device = _run_production(args, grid_name, args.policy, args.families)
    except (production.UsageError, StoreLocked) as err:
        print(f"mesa guard: error: {err}", file=sys.stderr)
        return 2
    print(f"grid {grid.name}, implementation {args.impl or 'kernels:mesa_chunk'}, device {device}, "
          f"{time.perf_counter() - t0:.0f} s; results in {os.path.join(args.out, 'results.csv')}")
    _print_production(df)
    with open(os.path.join(args.out, "guard.md"), "w") as fh:
        from .stability import render

        fh.write(render.to_markdown(production.summary(df)) + "\n\n" + provenance_line(provenance(device)) + "\n")
    _report_silent(df)
    return production.exit_status(df)


def _cmd_stability_production(args: argparse.Namespace, preset) -> int:
    """``mesa stability --preset gpu``: the production grid, then report.md and plots/ from every row of
    --out/results.csv (a split run: the second part with --resume reports both)."""
    import datetime

    from .stability import production, production_report

    t0 = time.perf_counter()
    try:
        grid, df, device = _run_production(args, preset.production, args.policies, args.families or args.cases)
    except (production.UsageError, StoreLocked) as err:
        print(f"mesa stability: error: {err}", file=sys.stderr)
        return 2
    meta = {"grid": f"{grid.name} (preset {preset.name})", "description": grid.description,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - t0}
    path = production_report.write_report(args.out, meta=meta, plots=not args.no_plots)
    _print_production(df)
    _report_silent(df)
    print(f"report {path} ({meta['wall_s']:.0f} s)")
    return 0


def _parse_option(text: str):
    """``key=value`` with value parsed as int, float, bool, None or kept as a string."""
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(val)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(val.lower(), val)


def _cmd_guard_peer(args: argparse.Namespace) -> int:
    """``mesa guard --preset peer``: the peer's op-test cases (stability.peer_cases) against the float64
    reference, per policy; exit 1 on a check above the peer's tolerance that the op did not report and
    that is not a documented limit of its policy."""
    import pandas as pd

    from .solvers.precision import DEFAULT_POLICY
    from .stability import guard, peer_cases

    try:
        device = _device(args.device, guard.UsageError)
        used = [flag for flag, val in (("--families", args.families), ("--T", args.T), ("--D", args.D),
                                       ("--resume", args.resume), ("--steps", args.steps is not None),
                                       ("--properties", args.properties is not None), ("--bench", args.bench),
                                       ("--baseline", args.baseline)) if val]
        if used:
            raise guard.UsageError(f"{_flags(used)} to another preset, not to --preset peer (its cases fix the "
                                   "sizes and the CG steps)")
        unknown = [c for c in args.cases or [] if c not in peer_cases.PEER_CASES]
        if unknown:
            raise guard.UsageError(f"--cases {unknown}: the peer preset's cases are {list(peer_cases.PEER_CASES)}")
        spec = cli_spec(args, guard.GUARD_SPEC, guard.UsageError)
        targets = []
        for pol in args.policy or [DEFAULT_POLICY]:
            t = guard.resolve(args.impl, spec.replace(policy=pol), device, dict(args.option or []))
            t.options.pop("steps", None)  # each case sets its own (the peer's: D, or 30 for the packed cases)
            targets.append(t)
    except guard.UsageError as err:
        print(f"mesa guard: error: {err}", file=sys.stderr)
        return 2
    rows = []
    for t in targets:
        for r in peer_cases.check_cases(t.fn, args.cases, device=device, progress=not args.no_progress,
                                        **t.options):
            rows.append(dict(r, impl=t.name))
    df = pd.DataFrame(rows)
    df["policy"] = df.policy.fillna("(none)")  # an implementation that takes no policy
    counts = df.groupby("policy").guard_verdict.value_counts().unstack(fill_value=0)
    print(f"implementation {targets[0].name}, device {device}: the peer's op-test cases, checks per verdict")
    print(counts.to_string())
    for r in df[df.guard_verdict.isin(["FAIL", "flagged", "limit"])].itertuples():
        print(f"  {r.guard_verdict} {r.case} {r.policy} {r.quantity}: {r.measured:.3g} > {r.budget:.3g}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        prov = provenance(device)
        df.assign(**prov).to_csv(os.path.join(args.out, "peer_cases.csv"), index=False)
        from .stability import render

        with open(os.path.join(args.out, "guard.md"), "w") as fh:
            fh.write("# The peer's op-test cases\n\n" + render.to_markdown(counts.reset_index()) + "\n\n"
                     + provenance_line(prov) + "\n")
    silent = int((df.guard_verdict == "FAIL").sum())
    if silent:
        print(f"{silent} check(s) above the peer's tolerance, not reported by the op: a silent wrong answer",
              file=sys.stderr)
    return 1 if silent else 0


def _cmd_guard(args: argparse.Namespace) -> int:
    """Check an implementation on the golden cases and the metamorphic properties against the error
    budgets of stability/budgets.toml (and a stored baseline); exit 0 when everything holds, 1 on any
    violation, 2 on a usage error."""

    from .stability import guard

    if args.preset == "peer":
        return _cmd_guard_peer(args)
    if args.preset != "golden":
        return _cmd_guard_production(args)
    try:
        device = _device(args.device, guard.UsageError)
        golden_flags = [("--families", args.families), ("--T", args.T), ("--D", args.D), ("--resume", args.resume),
                        ("--cache", args.cache), ("--backward-max-T", args.backward_max_T),
                        ("--no-reference-check", args.no_reference_check), ("--jobs", args.jobs != 1)]
        used = [flag for flag, val in golden_flags if val]
        if used:
            raise guard.UsageError(f"{_flags(used)} to --preset production, not to --preset golden")
        from .stability.golden import BY_NAME

        unknown = [c for c in args.cases or [] if c not in BY_NAME]
        if unknown:
            raise guard.UsageError(f"--cases {unknown}: the golden cases are {list(BY_NAME)}")
        spec = cli_spec(args, guard.GUARD_SPEC, guard.UsageError).replace(policy=golden_policy(args.policy))
        target = guard.resolve(args.impl, spec, device, dict(args.option or []))
        df = guard.run(target, cases=args.cases, props=args.properties, backward=not args.no_backward,
                       progress=not args.no_progress)
        times = None
        if device.startswith("cuda") and (args.baseline or args.write_baseline) and not args.no_speed:
            times = guard.time_target(target, tuple(args.speed_shape))
        if args.baseline:
            import pandas as pd

            if guard.is_benchmark_json(args.baseline):  # pytest-benchmark files: the medians of --bench
                if not args.bench:
                    raise guard.UsageError(f"--baseline {args.baseline} is a pytest-benchmark file: give this run's "
                                           "with --bench NEW.json")
                extra = guard.compare_benchmarks(args.baseline, args.bench)
            else:
                extra = guard.compare_baseline(args.baseline, df, target, times)
            df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
        elif args.bench:
            raise guard.UsageError("--bench compares with a pytest-benchmark --baseline OLD.json")
    except guard.UsageError as err:
        print(f"mesa guard: error: {err}", file=sys.stderr)
        return 2
    print(f"implementation {target.name}, options {guard.show_options(target.options)}, budgets from policy "
          f"{target.policy.name} (u = {target.policy.u:.3g}), device {device}")
    print(guard.render(df))
    if times:
        print(f"speed at {tuple(times['shape'])}: forward {times['fwd_ms']:.3f} ms, forward + backward "
              f"{times['fwd_bwd_ms']:.3f} ms")
    if args.out:
        import os

        os.makedirs(args.out, exist_ok=True)
        prov = provenance(target.device)
        df.assign(**prov).to_csv(os.path.join(args.out, "guard.csv"), index=False)
        with open(os.path.join(args.out, "guard.md"), "w") as fh:
            fh.write(guard.render(df) + "\n\n" + provenance_line(prov) + "\n")
    if args.write_baseline:
        guard.write_baseline(args.write_baseline, df, target, times)
        print(f"baseline written to {args.write_baseline}")
    fails = df[df.verdict == "FAIL"]
    na = int((df.verdict == "n/a").sum())
    if len(fails):
        print(f"\nFAIL: {len(fails)} of {len(df)} checks violate their budget:", file=sys.stderr)
        for r in fails.itertuples():
            print(f"  {r.kind} {r.case} {r.quantity}: measured {r.measured:.3g} > budget {r.budget:.3g} "
                  f"({r.derivation}) {r.note}".rstrip(), file=sys.stderr)
        return 1
    print(f"\nall {len(df) - na} checks hold" + (f" ({na} not applicable)" if na else ""))
    return 0


def _cmd_golden(args: argparse.Namespace) -> int:
    from .stability.golden import check_or_write

    return check_or_write(write=args.write)


def _cmd_ablate(args: argparse.Namespace) -> int:
    """Train models under training-time solver configs and evaluate each under evaluation-time
    configs (a preset or a TOML grid file): results.csv (a row per pair, appended as measured),
    report.md and plots/ in --out; --resume continues an interrupted run."""
    from .ablations.grid import GridError, load_grid, run_grid
    from .ablations.report import write_report
    from .ablations.train import CheckpointError

    try:
        if args.merge:
            from .ablations.grid import merge_parts

            if not args.out:
                raise GridError("--merge needs --out, the folder that receives the merged results")
            n = merge_parts(args.merge, args.out)
            print(f"merged {n} rows from {len(args.merge)} part(s) into {args.out}")
            print(f"report: {write_report(args.out, plots=not args.no_plots)}")
            return 0
        grid = load_grid(None if args.grid else args.preset, args.grid)
        if args.only_train is not None:
            bad = [i for i in args.only_train if not 0 <= i < len(grid.train)]
            if bad:
                raise GridError(f"--only-train {bad}: the grid has training configs 0..{len(grid.train) - 1}: "
                                + ", ".join(f"{i} {t.label}" for i, t in enumerate(grid.train)))
            grid.train = [grid.train[i] for i in args.only_train]
        if args.seed is not None:
            grid.run["seed"] = args.seed
        if args.device is not None:
            grid.run["device"] = _device(args.device, GridError)
        if args.train_steps is not None:
            steps0, warm0 = grid.train_config.steps, grid.train_config.warmup
            grid.run["train_steps"] = args.train_steps
            if args.warmup is None and args.train_steps >= 1 and warm0 > args.train_steps:
                grid.run["warmup"] = max(1, round(warm0 * args.train_steps / steps0))
                print(f"--train-steps {args.train_steps}: warm-up {warm0} -> {grid.run['warmup']} steps "
                      f"(the grid's ratio; set it with --warmup)")
        if args.warmup is not None:
            grid.run["warmup"] = args.warmup
        grid.train_config  # noqa: B018 - validates
        out = args.out or os.path.join("results", "ablate", grid.name)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"grid {grid.name}: {len(grid.train)} training x {len(grid.eval)} evaluation configs -> {out}")
        run_grid(grid, out, resume=args.resume, progress=not args.no_progress, retrain=args.retrain)
    except (GridError, StoreLocked, CheckpointError) as err:
        print(f"mesa ablate: error: {err}", file=sys.stderr)
        return 2
    from .ablations.train import dist_info

    if dist_info()[0] == 0:  # under torchrun, rank 0 writes the report
        print(f"report: {write_report(out, plots=not args.no_plots)}")
    return 0


def _cmd_softmax(args: argparse.Namespace) -> int:
    """Softmax temperature study (docs/design.md section 9): train the same byte-level LM with the loss
    cross-entropy(softmax(z / T)) for each temperature T and seed, and measure the numerical and
    effective rank of its logits and last hidden representations (float64), the rank of the logits
    restricted to the byte classes that occur (row-centred, against C_used - 1), the ranks at the
    thresholds 1e-4 to 1e-1, bits per byte in and out of distribution, OOD-detection AUROC (MSP,
    energy; per window, per token, on 64-byte windows), ridge probes of every layer's frozen features
    on OOD text and the final training loss; results.csv (a row per (T, seed), appended as measured),
    report.md and plots/ in --out; --resume continues an interrupted study, --merge combines parts run
    separately (other seeds or GPUs)."""
    from .ablations.softmax import StudyError, load_study, merge_studies, run_study
    from .ablations.softmax_report import write_report
    from .ablations.train import CheckpointError

    try:
        if args.merge:
            if not args.out:
                raise StudyError("--merge needs --out, the folder that receives the merged study")
            n = merge_studies(args.merge, args.out)
            print(f"merged {n} runs from {len(args.merge)} part(s) into {args.out}")
        else:
            study = load_study(args.preset, temperatures=args.temperatures, seeds=args.seeds,
                               train_steps=args.train_steps, rank_threshold=args.rank_threshold,
                               loss_band=args.loss_band,
                               device=None if args.device is None else _device(args.device, StudyError))
            out = args.out or os.path.join("results", "softmax", study.name)
            args.out = out
            run_study(study, out, resume=args.resume, progress=not args.no_progress, retrain=args.retrain)
    except (StudyError, StoreLocked, CheckpointError) as err:
        print(f"mesa softmax: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {write_report(args.out, plots=not args.no_plots)}")
    return 0


def _cmd_recall(args: argparse.Namespace) -> int:
    """Multi-query associative recall over bytes (ablations/recall.py): the Mesa layer trained with k CG
    steps or to a tolerance, gated linear attention on the same states and causal softmax attention,
    one backbone; trained at one length, evaluated at longer ones with more key-value pairs, every Mesa
    model also under eval-time steps, tolerances and policies, with per-head gates, condition bounds
    and CG steps along positions. results.csv, diagnostics.csv, report.md and plots/ in --out; --resume
    continues an interrupted study, --only-train / --seeds / --arms split it, --merge joins the parts."""
    import dataclasses

    from .ablations import recall
    from .ablations.recall_report import write_report
    from .ablations.train import CheckpointError

    try:
        if args.merge:
            if not args.out:
                raise recall.RecallError("--merge needs --out, the folder that receives the merged study")
            n = recall.merge(args.merge, args.out)
            print(f"merged {n} runs from {len(args.merge)} part(s) into {args.out}")
        else:
            preset = recall.PRESETS[args.preset]
            if args.train_steps is not None:
                if args.train_steps < 1:
                    raise recall.RecallError(f"--train-steps must be >= 1, got {args.train_steps}")
                tc = dataclasses.replace(preset.train, steps=args.train_steps,
                                         warmup=min(preset.train.warmup, args.train_steps))
                preset = dataclasses.replace(preset, train=tc)
            out = args.out or os.path.join("results", "recall", preset.name)
            args.out = out
            if not args.resume and os.path.isdir(os.path.join(out, "runs")) and os.listdir(os.path.join(out, "runs")):
                raise recall.RecallError(f"{out} holds runs of an earlier study: pass --resume to continue it, or "
                                         "another --out")
            device = None if args.device is None else _device(args.device, recall.RecallError)
            recall.run_study(preset, out, arms_sel=args.arms, seeds=args.seeds, only_train=args.only_train,
                             resume=args.resume, progress=not args.no_progress, device=device)
            if args.only_train:
                print(f"trained; evaluate with the same flags without --only-train (add --resume): {out}")
                return 0
    except (recall.RecallError, CheckpointError) as err:
        print(f"mesa recall: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {write_report(args.out)}")
    return 0


def _add_production_args(p: argparse.ArgumentParser, where: str) -> None:
    """The selection and reference flags of a production grid (stability.production)."""
    from .stability.production import FAMILIES

    p.add_argument("--families", nargs="+", metavar="FAMILY",
                   help=f"{where}: only these families ({', '.join(FAMILIES)})")
    p.add_argument("--t", "--T", dest="T", type=int, nargs="+", metavar="T",
                   help=f"{where}: only these sequence lengths of the grid")
    p.add_argument("--d", "--D", dest="D", type=int, nargs="+", metavar="D",
                   help=f"{where}: only these head dims of the grid")
    p.add_argument("--cache", metavar="DIR",
                   help=f"{where}: folder of the cached float64 references (default --out/reference_cache)")
    p.add_argument("--backward-max-T", type=int, metavar="T",
                   help=f"{where}: run the backward up to this length (default: the grid's, 16384)")
    p.add_argument("--no-reference-check", action="store_true",
                   help=f"{where}: skip the mpmath check of the float64 reference on a prefix of every case")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help=f"{where}: run the policies in N processes sharing the device (default 1); on a bare "
                        "machine most of the time is kernel compilation, once per policy and head dim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesa", description="Numerical-stability verification and ablation suite for the Mesa layer.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {solvers.__version__}")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print nothing but errors and warnings (results are still written; no progress bars)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .stability.report import PRESETS, SOLVERS

    st = sub.add_parser("stability", help="stability report: solver x policy x case x size x setting grid",
                        description="Run the stability grid against the float64 exact reference and write "
                                    "results.csv, reference_check.csv, report.md and plots/ to --out.")
    st.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                    help="grid size (default quick; gpu: the production grid of stability.production, our op at "
                         "T up to 65536 and every kernel policy on one GPU; gpu-smoke: its families at CPU sizes)")
    st.add_argument("--out", default="results/stability", help="output folder (default results/stability)")
    st.add_argument("--cases", nargs="+", metavar="CASE", help="only these stress cases")
    st.add_argument("--solvers", nargs="+", metavar="SOLVER", help=f"only these solvers ({', '.join(SOLVERS)})")
    st.add_argument("--policies", nargs="+", metavar="POLICY", help="only these precision policies")
    st.add_argument("--seed", type=int, default=0, help="seed of the stress cases (default 0)")
    st.add_argument("--resume", action="store_true", help="keep rows already in --out/results.csv, run the rest")
    st.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_production_args(st, "the gpu presets")
    st.add_argument("--impl", metavar="MODULE:FUNCTION",
                    help="gpu presets: the op to check, shaped like kernels.mesa_chunk (default kernels:mesa_chunk)")
    st.add_argument("--steps", type=int, help="gpu presets: CG step cap (default 100)")
    st.add_argument("--tol", type=float, help="gpu presets: CG relative tolerance (default: none, fixed steps)")
    st.add_argument("--device", help="gpu presets: cpu or cuda (default: cuda when available)")
    st.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                    help="gpu presets: extra keyword option for the op (repeatable), e.g. --option backend=torch")
    st.set_defaults(func=_cmd_stability)
    gl = sub.add_parser("golden", help="check the golden cases against their committed fingerprints",
                        description="Regenerate the regression guard's golden cases (stability/golden.py) and "
                                    "compare their input digests and reference fingerprints with "
                                    "stability/golden.json; exit 1 on a difference, each named.")
    gl.add_argument("--write", action="store_true",
                    help="rewrite stability/golden.json instead (after a deliberate change of the cases or "
                         "of the reference solvers)")
    gl.set_defaults(func=_cmd_golden)
    p = sub.add_parser("verify", help="self-check: exact vs mpmath, every solver and policy vs exact",
                       description=_cmd_verify.__doc__)
    p.add_argument("--t", "--T", dest="T", type=int, default=48, help="sequence length (default 48)")
    p.add_argument("--d", "--D", dest="D", type=int, default=16, help="head dimension (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem (default 0)")
    p.add_argument("--out", metavar="DIR", help="also write verify.csv and verify.md here")
    p.add_argument("--device", help="where the solvers run: cpu or cuda (default: cuda when available)")
    p.add_argument("--policies", nargs="+", default=["fp64", "fp32", "tf32", "bf16-fp32state", "fp16-fp32state"],
                   choices=sorted(solvers.POLICIES) + sorted(solvers.POLICY_ALIASES), metavar="POLICY",
                   help="precision policies (default: fp64 fp32 tf32 bf16-fp32state fp16-fp32state)")
    p.set_defaults(func=_cmd_verify)
    from .stability.golden import GOLDEN
    from .stability.guard import PROPERTY_CASES

    gd = sub.add_parser("guard", help="regression guard: golden cases and properties against error budgets",
                        description=_cmd_guard.__doc__)
    gd.add_argument("--preset", default="golden", choices=["golden", "production", "production-smoke", "peer"],
                    help="golden (default): the golden cases and properties; production: the production grid "
                         "(stability.production: families x sizes up to T = 65536, every kernel policy, one GPU; "
                         "exit 1 on a silent failure); production-smoke: its families at CPU sizes; peer: the "
                         "peer's op-test cases (stability.peer_cases) at the peer's tolerances")
    gd.add_argument("--impl", metavar="MODULE:FUNCTION",
                    help="the implementation to check, any callable shaped like kernels.mesa_chunk (default: ours, "
                         "kernels:mesa_chunk; the peer: stability.peer:chunk_mesa_net with fla-core installed)")
    gd.add_argument("--policy", nargs="+", metavar="POLICY",
                    help="precision policy: passed to implementations that take one, and its unit roundoff sets "
                         "the budgets (golden: one, default auto, the one default of the kernels, the layer and the "
                         "guard; production: one or more, default every kernel policy)")
    gd.add_argument("--steps", type=int,
                    help="CG step cap (default 100: the budgets bound rounding, so the solves must converge; in "
                         "fp32 and bf16x3 the golden cases, D = 16, reach the residual floor in 19 to 41 steps, "
                         "tiny_lambda in up to 90)")
    gd.add_argument("--tol", type=float, default=None, help="CG relative tolerance (default: none, fixed steps)")
    gd.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                    help="extra keyword option for the implementation (repeatable), e.g. --option chunk_size=16")
    gd.add_argument("--cases", nargs="+", metavar="CASE",
                    help=f"only these cases (default all): golden {' '.join(g.name for g in GOLDEN)}; "
                         "or, with --preset peer, the peer's (stability.peer_cases.PEER_CASES)")
    gd.add_argument("--properties", nargs="*", metavar="PROPERTY", choices=list(PROPERTY_CASES),
                    help=f"only these properties (default all: {' '.join(PROPERTY_CASES)}; none with no names)")
    gd.add_argument("--no-backward", action="store_true", help="forward checks only")
    gd.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gd.add_argument("--baseline", metavar="FILE", help="also fail on regressions against this stored baseline")
    gd.add_argument("--bench", metavar="NEW.json",
                    help="a pytest-benchmark --benchmark-json file (benchmarks/pytest_bench) to compare with a "
                         "--baseline of the same kind: a median beyond time_ratio x the baseline's fails")
    gd.add_argument("--write-baseline", metavar="FILE", help="record this run's measurements (and GPU times)")
    gd.add_argument("--no-speed", action="store_true", help="no GPU timing with --baseline / --write-baseline")
    gd.add_argument("--speed-shape", nargs=4, type=int, default=[4, 2048, 16, 128], metavar=("B", "T", "H", "D"),
                    help="shape of the GPU timing (default 4 2048 16 128)")
    gd.add_argument("--out", metavar="DIR", help="also write guard.csv and guard.md here")
    gd.add_argument("--no-progress", action="store_true", help="no progress bar")
    gd.add_argument("--resume", action="store_true", help="production: keep rows already in --out/results.csv")
    gd.add_argument("--seed", type=int, default=0, help="production: seed of the cases (default 0)")
    _add_production_args(gd, "--preset production")
    gd.set_defaults(func=_cmd_guard)
    from .ablations.grid import PRESETS as ABLATE_PRESETS

    ab = sub.add_parser("ablate", help="ablation LM runs: training-time x evaluation-time solver configs",
                        description=_cmd_ablate.__doc__)
    ab.add_argument("--preset", default="tiny-cpu", choices=sorted(ABLATE_PRESETS),
                    help="built-in grid (default tiny-cpu: one tiny model on 2 CPU cores)")
    ab.add_argument("--grid", metavar="FILE", help="a TOML grid file ([run], [[train]], [[eval]]) instead of a preset")
    ab.add_argument("--out", metavar="DIR", help="output folder (default results/ablate/<grid name>)")
    ab.add_argument("--resume", action="store_true", help="keep finished rows and checkpoints in --out, run the rest")
    ab.add_argument("--retrain", action="store_true",
                    help="with --resume: train from scratch a run whose checkpoint is damaged or from other settings "
                         "(default: refuse, naming the file and the fields)")
    ab.add_argument("--train-steps", type=int, help="override the grid's training steps (a warm-up longer than "
                                                    "them shrinks in proportion unless --warmup is given)")
    ab.add_argument("--warmup", type=int, help="override the grid's learning-rate warm-up steps")
    ab.add_argument("--seed", type=int, help="override the grid's seed (model init and data order): replicates")
    ab.add_argument("--device", help="cpu or cuda (default: the grid's, else cuda when available; not under torchrun)")
    ab.add_argument("--only-train", type=int, nargs="+", metavar="I",
                    help="only these training configs of the grid (0-based): split a grid across GPUs or sessions")
    ab.add_argument("--merge", nargs="+", metavar="PART_DIR",
                    help="merge the results and curves of finished parts into --out and write its report")
    ab.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ab.add_argument("--no-progress", action="store_true", help="no progress bars")
    ab.set_defaults(func=_cmd_ablate)
    from .ablations.softmax import PRESETS as SOFTMAX_PRESETS

    sm = sub.add_parser("softmax", help="softmax temperature study: rank of logits and representations vs T",
                        description=_cmd_softmax.__doc__)
    sm.add_argument("--preset", default="cpu", choices=sorted(SOFTMAX_PRESETS),
                    help="cpu (tiny model, 7 temperatures x 2 seeds, under 10 min on 2 cores; default), gpu "
                         "(small model), smoke (seconds)")
    sm.add_argument("--out", metavar="DIR", help="output folder (default results/softmax/<preset>)")
    sm.add_argument("--resume", action="store_true", help="keep finished runs and checkpoints in --out, run the rest")
    sm.add_argument("--retrain", action="store_true",
                    help="with --resume: train from scratch a run whose checkpoint is damaged or from other settings")
    sm.add_argument("--temperatures", type=float, nargs="+", metavar="T", help="override the temperatures")
    sm.add_argument("--seeds", type=int, nargs="+", metavar="S", help="override the seeds (split a study across GPUs)")
    sm.add_argument("--train-steps", type=int, help="override the training steps")
    sm.add_argument("--rank-threshold", type=float, help="relative singular-value threshold of the numerical rank "
                                                         "(default 1e-3)")
    sm.add_argument("--loss-band", type=float, help="parity band: |L_T - L_1| <= band x L_1 (default 0.15)")
    sm.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    sm.add_argument("--merge", nargs="+", metavar="PART_DIR",
                    help="merge finished parts (same settings) into --out and write its report")
    sm.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sm.add_argument("--no-progress", action="store_true", help="no progress bars")
    sm.set_defaults(func=_cmd_softmax)

    from .ablations.recall import ALL_ARMS
    from .ablations.recall import PRESETS as RECALL_PRESETS

    rc = sub.add_parser("recall", help="associative recall: Mesa (k steps, tolerance) vs GLA vs attention",
                        description=_cmd_recall.__doc__)
    rc.add_argument("--preset", default="cpu", choices=sorted(RECALL_PRESETS),
                    help="; ".join(f"{p.name}: {p.description}" for p in RECALL_PRESETS.values()))
    rc.add_argument("--out", metavar="DIR", help="output folder (default results/recall/<preset>)")
    rc.add_argument("--arms", nargs="+", choices=ALL_ARMS, metavar="ARM",
                    help=f"only these arms ({', '.join(ALL_ARMS)})")
    rc.add_argument("--seeds", type=int, nargs="+", metavar="S", help="override the seeds (split a study)")
    rc.add_argument("--train-steps", type=int, help="override the training steps")
    rc.add_argument("--only-train", action="store_true", help="train (and checkpoint) only; evaluate later")
    rc.add_argument("--resume", action="store_true", help="continue the study in --out (checkpoints, finished runs)")
    rc.add_argument("--merge", nargs="+", metavar="PART_DIR", help="merge finished parts into --out, write the report")
    rc.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rc.add_argument("--no-progress", action="store_true", help="no progress bars")
    rc.set_defaults(func=_cmd_recall)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    out = getattr(args, "out", None)
    if isinstance(out, str) and os.path.exists(out) and not os.path.isdir(out):
        print(f"mesa {args.command}: error: --out {out} is a file; --out names a folder", file=sys.stderr)
        return 2
    # each command reports its own usage errors (exit 2); anything else is a bug and propagates with
    # its traceback (exit 1)
    try:
        if args.quiet:
            if hasattr(args, "no_progress"):
                args.no_progress = True
            import contextlib

            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                return args.func(args)
        return args.func(args)
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue where it stopped" if hasattr(args, "resume") else ""
        print(f"\nmesa {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
