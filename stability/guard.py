"""The regression guard: checks an implementation of the Mesa op against the golden cases and the
metamorphic properties, each against an error budget, and optionally against a stored baseline.

An *implementation* is any callable shaped like :func:`kernels.mesa_chunk`::

    f(q, k, v, g, beta, lam, *, initial_state=None, output_final_state=False, cu_seqlens=None,
      chunk_size=..., **options) -> o      (or a tuple whose first element is o)

The guard

1. regenerates every golden case (:mod:`stability.golden`) and checks its inputs and float64
   references against the committed fingerprints (a change there is reported, not silently used);
2. runs f forward and, where it supports autograd, backward with the case's upstream gradient e,
   and measures the relative error of o and of every input gradient against the float64
   references;
3. runs the metamorphic properties of :mod:`stability.properties` on the cases they need;
4. compares each measurement with its budget (:mod:`stability.budgets.toml`: factor x u x kappa,
   the derivation printed beside it) and, with a baseline, with the stored measurement.

The verdicts are ``pass``, ``FAIL`` or ``n/a`` (the implementation does not support what the check
needs: no backward, no tolerance, ...). :func:`run` returns one tidy row per check.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mesa_stability import solvers
from mesa_stability.solvers.precision import SUPPORTED_DTYPES, PrecisionPolicy, unit_roundoff_of
from mesa_stability.solvers.spec import SPEC_FIELDS, SolverSpec, solver_spec

from . import golden, properties
from .metrics import rel_error
from .provenance import provenance

BUDGETS_FILE = os.path.join(os.path.dirname(__file__), "budgets.toml")
QUANTITIES = ("o", "dq", "dk", "dv", "dg", "dbeta", "dlam")
# which golden case each property runs on (the case provides what the property needs: B = 2 and
# H = 2 for independence, packed sequences for varlen, a tiny right-hand side for scale_grad)
PROPERTY_CASES = {"scale_q": "well_conditioned", "scale_v": "large_values", "chunk_size": "no_forgetting_long",
                  "continuation": "no_forgetting_long", "independence": "well_conditioned", "varlen": "varlen",
                  "scale_grad": "small_upstream_grad"}
_DTYPE_U = {dt: unit_roundoff_of(dt) for dt in SUPPORTED_DTYPES}


class UsageError(ValueError):
    """A bad guard invocation (exit status 2)."""


def load_budgets(path: str = BUDGETS_FILE) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def budget_of(cfg: dict, section: str, name: str, u: float, kappa: float, u_out: float = 0.0,
              amplification: float = 1.0) -> tuple[float, str]:
    """(budget, derivation) of one check; see budgets.toml."""
    try:
        b = cfg[section][name]
    except KeyError as err:
        raise UsageError(f"budgets file has no [{section}.{name}]") from err
    p = float(b.get("kappa_power", 1.0))
    value = float(b["factor"]) * u * kappa ** p
    how = f"{b['factor']:g}*u" + (f"*kappa^{p:g}" if p else "")
    if b.get("amplified", False):
        value *= amplification
        how += "*amp"
    r = float(b.get("rounding", 0.0))
    if r and u_out:
        value += r * u_out
        how += f" + {r:g}*u_out"
    return value, how


@dataclass
class Target:
    """What is checked: the callable, its display name, the precision policy whose unit roundoff sets
    the budgets, the keyword arguments passed on every call, the device of the inputs, and the
    :class:`SolverSpec` it runs under (None for an implementation that takes none)."""

    fn: Callable
    name: str
    policy: PrecisionPolicy
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    spec: SolverSpec | None = None


def default_backend(device: str) -> str:
    """Our kernels: Triton on CUDA or under the interpreter (TRITON_INTERPRET=1), else the torch backend."""
    if device.startswith("cuda") or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "triton"
    return "torch"


OWN_OP = "kernels:mesa_chunk"
# The guard's solve: the budgets bound rounding, not truncation, so CG runs far enough to converge every
# golden case (30 steps do not converge tiny_lambda, kappa 1800, in fp32: docs/guard.md); the default
# policy, the certificate on.
GUARD_SPEC = SolverSpec(steps=100)


def resolve(impl: str | None, spec: SolverSpec | None = None, device: str = "cpu",
            extra: dict | None = None) -> Target:
    """The target of ``--impl module:function`` (None: ours, :func:`kernels.mesa_chunk`) under ``spec``
    (default ``SolverSpec()``; its policy sets the budgets).

    An op with a ``spec`` parameter (ours) is called with the spec itself, ``extra``'s SolverSpec
    fields merged into it (validated here: a bad field is a :class:`UsageError` that names it) and
    ``backend="auto"`` made explicit for ``device``. Any other callable gets the spec's ``steps``,
    ``tol`` (when set) and, where it takes one, ``policy`` as keyword arguments, and ``extra`` as given.
    """
    if spec is None:
        spec = SolverSpec()
    if not isinstance(spec, SolverSpec):
        raise TypeError(f"spec must be a SolverSpec or None, got {type(spec).__name__}")
    impl = impl or OWN_OP
    mod_name, sep, fn_name = impl.partition(":")
    if not sep or not mod_name or not fn_name:
        raise UsageError(f"--impl must be module:function (e.g. {OWN_OP}), got {impl!r}")
    try:
        mod = import_impl_module(mod_name)
    except ImportError as err:
        raise UsageError(f"--impl {impl}: cannot import {mod_name!r}: {err}") from err
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--impl {impl}: {mod_name} has no callable {fn_name!r}")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = dict(extra or {})
    if "spec" in params:  # an op that takes a SolverSpec (ours): the spec's fields validated once, here
        fields = {k: extra.pop(k) for k in list(extra) if k in SPEC_FIELDS}
        try:
            spec = solver_spec(spec, **fields)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--steps / --tol / --policy / --option: {err}") from err
        if spec.backend == "auto" and impl == OWN_OP:
            spec = spec.replace(backend=default_backend(device))
        opts = {"spec": spec}
    else:
        opts = {"steps": spec.steps}
        if spec.tol is not None:
            opts["tol"] = spec.tol
        if "policy" in params or takes_any:
            opts["policy"] = spec.policy
    opts.update(extra)
    unknown = [k for k in opts if k not in params and not takes_any]
    if unknown:
        raise UsageError(f"--impl {impl} does not take the option(s) {unknown}")
    return Target(fn, impl, spec.policy, opts, device, spec if "spec" in opts else None)


def show_options(options: dict) -> str:
    """The keyword arguments of a target, a spec by its label: ``spec=cg/steps=100/bf16x3, foo=1``."""
    return ", ".join(f"{k}={v.label if isinstance(v, SolverSpec) else getattr(v, 'name', v)}"
                     for k, v in options.items()) or "-"


# The suite's own packages, which --impl may name without the namespace (kernels:mesa_chunk)
OWN_PACKAGES = ("solvers", "kernels", "stability", "ablations")


def import_impl_module(name: str):
    """Import the module of ``--impl``: the suite's own by their short names (``kernels`` is
    ``mesa_stability.kernels``); a module not found on ``sys.path`` is looked up in the working
    directory too (the ``mesa`` console script does not put it there: ``benchmarks.before_adapter``)."""
    if name.partition(".")[0] in OWN_PACKAGES:
        name = "mesa_stability." + name
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != name.partition(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def output_roundoff(dtype: torch.dtype) -> float:
    """The unit roundoff of a returned value's dtype (the ``u_out`` of the budgets; 0 for others)."""
    return _DTYPE_U.get(dtype, 0.0)


def _inputs(ref: golden.GoldenReference, device: str):
    p, gc = ref.problem, ref.case
    dt = getattr(torch, gc.input_dtype)
    qkv = [t.to(dt).to(device) for t in (p.q, p.k, p.v)]
    gates = [t.float().to(device) for t in (p.g, p.beta, p.lam)]
    init = None if p.initial_state is None else tuple(s.float().to(device) for s in p.initial_state)
    cu = None if p.cu_seqlens is None else p.cu_seqlens.to(device)
    return qkv + gates, init, cu


def _device_problem(ref: golden.GoldenReference, device: str) -> solvers.MesaProblem:
    (q, k, v, g, beta, lam), init, cu = _inputs(ref, device)
    return solvers.MesaProblem(q, k, v, g, beta, lam, init, cu)


def _row(kind, case, quantity, measured, budget=float("nan"), how="", verdict=None, note="", kappa=float("nan")):
    if verdict is None:
        verdict = "pass" if measured <= budget else "FAIL"  # NaN / inf measurements fail
    return dict(kind=kind, case=case, quantity=quantity, measured=measured, budget=budget, derivation=how,
                verdict=verdict, kappa=kappa, note=note)


def check_case(target: Target, ref: golden.GoldenReference, cfg: dict, backward: bool = True) -> list[dict]:
    """Forward and backward errors of one golden case against its float64 references."""
    kappa, name = ref.kappa, ref.case.name
    u = target.policy.u_at(kappa)
    leaves_in, init, cu = _inputs(ref, target.device)
    leaves = [t.clone().requires_grad_(backward) for t in leaves_in]
    try:
        out = target.fn(*leaves, initial_state=init, cu_seqlens=cu, **target.options)
    except NotImplementedError as err:
        return [_row("golden", name, "o", float("nan"), verdict="n/a", note=f"unsupported: {err}"[:200])]
    except ImportError as err:  # a missing dependency is not a regression: stop and say what is missing
        raise UsageError(f"the implementation cannot run here: {err}") from err
    except Exception as err:  # a crash is a failure, with its message
        return [_row("golden", name, "o", float("inf"), verdict="FAIL", note=f"raised {err!r}"[:200])]
    o = out[0] if isinstance(out, tuple) else out
    if tuple(o.shape) != tuple(ref.o.shape):
        return [_row("golden", name, "o", float("inf"), verdict="FAIL",
                     note=f"output shape {tuple(o.shape)}, expected {tuple(ref.o.shape)}")]
    b, how = budget_of(cfg, "quantities", "o", u, kappa, output_roundoff(o.dtype))
    rows = [_row("golden", name, "o", rel_error(o.detach().cpu(), ref.o), b, how, kappa=kappa,
                 note=_nonfinite_note(o.detach()))]
    if not backward:
        return rows
    try:
        o.backward(ref.e.to(device=o.device, dtype=o.dtype))
    except Exception as err:
        return rows + [_row("golden", name, f"d{n}", float("nan"), verdict="n/a", note=f"no backward: {err!r}"[:200])
                       for n in golden.GRADIENTS]
    for n, t in zip(golden.GRADIENTS, leaves, strict=True):
        if t.grad is None:
            rows.append(_row("golden", name, f"d{n}", float("nan"), verdict="n/a", note="no gradient returned"))
            continue
        b, how = budget_of(cfg, "quantities", f"d{n}", u, kappa, output_roundoff(t.grad.dtype),
                           ref.dg_amplification)
        rows.append(_row("golden", name, f"d{n}", rel_error(t.grad.cpu(), ref.grads[n]), b, how, kappa=kappa,
                         note=_nonfinite_note(t.grad)))
    return rows


def check_property(target: Target, prop: str, ref: golden.GoldenReference, cfg: dict) -> dict:
    """One metamorphic property on its golden case."""
    kappa = ref.kappa
    b, how = budget_of(cfg, "properties", prop, target.policy.u_at(kappa), kappa)
    p = _device_problem(ref, target.device)
    opts = dict(target.options)
    try:
        if prop == "scale_grad":
            res = properties.scale_grad(target.fn, p, ref.e.float().to(target.device), **opts)
        elif prop == "chunk_size":
            res = properties.chunk_size(target.fn, p, chunk_sizes=(16, 8, 32), **opts)
        else:
            res = properties.ALL[prop](target.fn, p, **opts)
    except NotImplementedError as err:
        return _row("property", ref.case.name, prop, float("nan"), verdict="n/a", note=f"unsupported: {err}"[:200])
    except ImportError as err:
        raise UsageError(f"the implementation cannot run here: {err}") from err
    except Exception as err:
        return _row("property", ref.case.name, prop, float("inf"), b, how, verdict="FAIL", note=f"raised {err!r}"[:200],
                    kappa=kappa)
    return _row("property", ref.case.name, prop, res.discrepancy, b, how, kappa=kappa, note=_detail_note(res.detail))


def _detail_note(detail: dict) -> str:
    """The per-scale (per-chunk-size, ...) measurements of a property, e.g. ``scale=2^-20: inf; scale=2^10: 0``."""
    parts = []
    for key, val in detail.items():
        if isinstance(val, dict):
            for k, x in val.items():
                k = f"2^{math.log2(k):g}" if isinstance(k, float) and k > 0 and math.log2(k).is_integer() else k
                parts.append(f"{key.removeprefix('per_')}={k}: {x:.3g}")
    return "; ".join(parts)[:200]


def _nonfinite_note(t: torch.Tensor) -> str:
    bad = int((~torch.isfinite(t)).sum())
    return f"{bad} of {t.numel()} values non-finite" if bad else ""


def run(target: Target, cases=None, props=None, backward: bool = True, progress: bool = True):
    """All checks as a DataFrame (one row per check)."""
    import pandas as pd

    cfg = load_budgets()
    names = list(cases) if cases is not None else [g.name for g in golden.GOLDEN]
    unknown = [n for n in names if n not in golden.BY_NAME]
    if unknown:
        raise UsageError(f"unknown golden case(s) {unknown}; known: {list(golden.BY_NAME)}")
    props = list(PROPERTY_CASES) if props is None else list(props)
    bad = [p for p in props if p not in PROPERTY_CASES]
    if bad:
        raise UsageError(f"unknown property(ies) {bad}; known: {list(PROPERTY_CASES)}")
    committed = golden.load_committed()
    refs = {}
    rows = []
    needed = list(dict.fromkeys(names + [PROPERTY_CASES[p] for p in props]))
    steps = [("golden", n) for n in names] + [("property", p) for p in props]
    bar = _progress(len(steps), progress)
    for n in needed:
        refs[n] = golden.reference(golden.BY_NAME[n])
        for msg in golden.check_reference(refs[n], committed):
            rows.append(_row("reference", n, "inputs/reference", float("inf"), verdict="FAIL", note=msg))
    for kind, item in steps:
        bar(f"{kind} {item}")
        if kind == "golden":
            rows += check_case(target, refs[item], cfg, backward)
        else:
            if item == "scale_grad" and not backward:
                continue
            rows.append(check_property(target, item, refs[PROPERTY_CASES[item]], cfg))
    bar(None)
    return pd.DataFrame(rows)


def _progress(total: int, enabled: bool):
    """A minimal progress line on stderr (tqdm when installed)."""
    state = {"i": 0, "bar": None}
    if enabled:
        try:
            from tqdm import tqdm

            state["bar"] = tqdm(total=total, file=sys.stderr, leave=False, desc="guard", disable=None)
        except ImportError:
            pass

    def step(label):
        if not enabled:
            return
        if state["bar"] is not None:
            if label is None:
                state["bar"].close()
            else:
                state["bar"].set_postfix_str(label)
                state["bar"].update(1)
        elif label is not None:
            state["i"] += 1
            print(f"[{state['i']}/{total}] {label}", file=sys.stderr, flush=True)

    return step


# --- speed (GPU) -------------------------------------------------------------------------------

def time_target(target: Target, shape=(4, 2048, 16, 128)) -> dict:
    """Median ms of forward and forward + backward at ``shape`` on the GPU (bf16 inputs, the
    ``well_conditioned`` gates), by ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    B, T, H, D = shape
    gen = torch.Generator(device=target.device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, device=target.device), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, device=target.device), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen, device=target.device)
    g = torch.log(0.8 + 0.15 * torch.rand(B, T, H, generator=gen, device=target.device))
    beta = torch.rand(B, T, H, generator=gen, device=target.device)
    lam = 0.5 + torch.rand(H, D, generator=gen, device=target.device)
    inp = [q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, lam]
    e = torch.randn(B, T, H, D, generator=gen, device=target.device)

    def fwd():
        with torch.no_grad():
            target.fn(*inp, **target.options)

    def fwd_bwd():
        leaves = [t.detach().requires_grad_() for t in inp]
        o = target.fn(*leaves, **target.options)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(e.to(o.dtype))

    out = {"shape": list(shape), "fwd_ms": do_bench(fwd, warmup=25, rep=200, return_mode="median")}
    try:
        out["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
    except Exception:  # no backward
        out["fwd_bwd_ms"] = float("nan")
    return out


# --- baselines ---------------------------------------------------------------------------------

def write_baseline(path: str, df, target: Target, times: dict | None) -> None:
    data = {"impl": target.name, "policy": target.policy.name,
            "options": {k: (v.to_dict() if isinstance(v, SolverSpec) else v.name if isinstance(v, PrecisionPolicy)
                            else v) for k, v in target.options.items()},
            **provenance(target.device),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "times": times,
            "rows": [{"kind": r.kind, "case": r.case, "quantity": r.quantity, "measured": _json_float(r.measured)}
                     for r in df.itertuples() if r.kind in ("golden", "property")]}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


def compare_baseline(path: str, df, target: Target, times: dict | None) -> list[dict]:
    """Rows (kind "baseline") for every measurement and time against a stored baseline."""
    try:
        with open(path) as fh:
            base = json.load(fh)
        stored = {(r["kind"], r["case"], r["quantity"]): float(r["measured"]) for r in base["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--baseline {path}: not a readable guard baseline ({err})") from err
    cfg = load_budgets()["baseline"]
    u = target.policy.u
    rows = []
    for r in df.itertuples():
        key = (r.kind, r.case, r.quantity)
        if key not in stored or r.verdict == "n/a" or not math.isfinite(stored[key]):
            continue
        limit = cfg["error_ratio"] * stored[key] + cfg["error_floor"] * u
        rows.append(_row("baseline", r.case, r.quantity, r.measured, limit,
                         f"{cfg['error_ratio']:g}*baseline + {cfg['error_floor']:g}*u",
                         note=f"baseline {stored[key]:.3g}"))
    if times and base.get("times"):
        for key in ("fwd_ms", "fwd_bwd_ms"):
            old, new = base["times"].get(key), times.get(key)
            if old and new and math.isfinite(old) and math.isfinite(new):
                rows.append(_row("baseline", f"speed {tuple(times['shape'])}", key, new, cfg["time_ratio"] * old,
                                 f"{cfg['time_ratio']:g}*baseline",
                                 note=f"baseline {old:.3f} ms ({base.get('device')})"))
    return rows


def is_benchmark_json(path: str) -> bool:
    """Whether ``path`` is a pytest-benchmark ``--benchmark-json`` file (rather than a guard baseline)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise UsageError(f"--baseline {path}: not readable JSON ({err})") from err
    return isinstance(data, dict) and "benchmarks" in data and "machine_info" in data


def load_benchmarks(path: str, flag: str) -> dict[str, dict]:
    """``{fullname: {"median": seconds, "device": ...}}`` of a pytest-benchmark JSON file."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        return {b["fullname"]: {"median": float(b["stats"]["median"]),
                                "device": b.get("extra_info", {}).get("device", "?")} for b in data["benchmarks"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{flag} {path}: not a pytest-benchmark --benchmark-json file ({err})") from err


def compare_benchmarks(base_path: str, new_path: str) -> list[dict]:
    """Rows (kind "baseline") comparing the medians of a pytest-benchmark run (``new_path``) with a
    stored one (``base_path``): each benchmark of both may take up to ``time_ratio`` times its
    baseline (budgets.toml). A benchmark of one file only is listed as n/a; medians measured on
    another device are noted."""
    base, new = load_benchmarks(base_path, "--baseline"), load_benchmarks(new_path, "--bench")
    ratio = load_budgets()["baseline"]["time_ratio"]
    rows = []
    for name in sorted(set(base) | set(new)):
        if name not in base or name not in new:
            rows.append(_row("baseline", name, "median_s", new.get(name, {}).get("median", float("nan")),
                             verdict="n/a", note="only in " + ("--bench" if name in new else "--baseline")))
            continue
        old, cur = base[name], new[name]
        note = f"baseline {old['median'] * 1e3:.4g} ms"
        if old["device"] != cur["device"]:
            note += f" on {old['device']} (now {cur['device']})"
        rows.append(_row("baseline", name, "median_s", cur["median"], ratio * old["median"], f"{ratio:g}*baseline",
                         note=note))
    return rows


def _json_float(x: float):
    return x if math.isfinite(x) else str(x)


def render(df) -> str:
    """The table: case, quantity, measured error, budget (and its derivation), verdict."""
    def fmt(x):
        return "-" if isinstance(x, float) and math.isnan(x) else (f"{x:.3g}" if isinstance(x, float) else str(x))

    cols = ["kind", "case", "quantity", "measured", "budget", "derivation", "verdict", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)
