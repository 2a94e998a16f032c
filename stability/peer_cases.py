"""The peer's published op-test cases (fla-core, ``tests/ops/test_mesa.py``), drawn by our own generator and
measured against our float64 reference.

A case fixes the shape, the forget-gate range and the peer's tolerances; its inputs are, per entry:

    q = U[0,1) / 10,  v = U[0,1) / 10         (drawn and divided in fp16; the packed cases: N(0,1) / 10)
    k = u / ||u||,  u ~ U[0,1)^D              (normalised in float, then fp16)
    gamma ~ U[lo, hi],  g = log gamma          (fp32; lo = hi = 1 gives g = 0)
    beta = sigmoid(U[0,1))                     (in [0.5, 0.731]; fp16 values, held in fp32)
    lam = 0.25 + 0.75 sigmoid(U[0,1))          (in [0.625, 0.798]; fp16 values, held in fp32)
    H_0 = k0 k0^T,  k0 = u / ||u||, u ~ U[0,1)^D  (rank one, PSD; k0 and the product in fp16, held in fp32)
    G_0 ~ U[0,1)                               (fp32)
    dO ~ U[0,1) (drawn in fp16; the packed cases: / 10),  dH_T ~ U[0,1),  dG_T ~ U[0,1)   (fp32)

with ``steps = D`` CG steps (the packed cases: the peer op's default, 30). The loss is
``L = <dO, o> + <dH_T, H_T> + <dG_T, G_T>``, and every output and gradient is accepted when the peer's
metric (:func:`stability.metrics.peer_close`: relative RMS error below the tolerance, or max abs error
at most 1e-6) holds against the reference.

Differences from the peer's test, on purpose: the draws come from a private ``torch.Generator`` on the
CPU (seeded, the same on every device; the peer seeds the global RNG and draws part of its inputs on the
device), and the reference is the float64 one of :mod:`stability.scale_reference` for exactly the rounded
inputs (the peer's is an fp32 dense solve differentiated by autograd); beta and lam are handed over
as fp32 tensors holding the fp16 values the peer hands over as fp16 tensors. Value-state layout: ours
``G [Dv, D]`` is the transpose of the peer's ``[D, Dv]`` state; the entries are i.i.d., so the
distributions agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mesa_stability.solvers import MesaProblem

from .metrics import PEER_ABS_PASS, peer_close
from .scale_reference import reference

_CHUNK_TOL = {"o": 0.006, "H_T": 0.008, "G_T": 0.008, "dq": 0.008, "dk": 0.008, "dv": 0.008, "dbeta": 0.008,
              "dg": 0.008, "dlam": 0.015, "dH0": 0.008, "dG0": 0.008}
_VARLEN_TOL = {"o": 0.006, "H_T": 0.008, "G_T": 0.008, "dq": 0.008, "dk": 0.008, "dv": 0.008, "dbeta": 0.015,
               "dg": 0.015, "dlam": 0.015, "dH0": 0.007, "dG0": 0.007}
QUANTITIES = ("o", "H_T", "G_T", "dq", "dk", "dv", "dg", "dbeta", "dlam", "dH0", "dG0")  # the rows, in order


@dataclass(frozen=True)
class PeerCase:
    """One of the peer's op-test cases: shape, forget-gate range, tolerances (quantity -> relative RMS)."""

    name: str
    shape: tuple[int, int, int, int]  # (B, T, H, D), Dv = D
    gate_range: tuple[float, float]  # gamma ~ U[lo, hi]
    tolerances: dict
    cu_seqlens: tuple[int, ...] | None = None  # packed sequences (B = 1)
    qv: str = "uniform"  # q, v ~ U[0,1) / 10 ("uniform") or N(0,1) / 10 ("normal")
    do_scale: float = 1.0  # dO ~ do_scale U[0,1)
    steps: int | None = None  # CG steps; None: D

    @property
    def cg_steps(self) -> int:
        return self.shape[3] if self.steps is None else self.steps

    @property
    def n_seqs(self) -> int:
        return self.shape[0] if self.cu_seqlens is None else len(self.cu_seqlens) - 1


def _chunk(B, T, H, D, lo, hi) -> PeerCase:
    return PeerCase(f"chunk-B{B}-T{T}-H{H}-D{D}-gamma{lo:g}-{hi:g}", (B, T, H, D), (lo, hi), _CHUNK_TOL)


def _varlen(H, D, lo, hi, cu) -> PeerCase:
    return PeerCase(f"varlen-H{H}-D{D}-gamma{lo:g}-{hi:g}-N{len(cu) - 1}", (1, cu[-1], H, D), (lo, hi), _VARLEN_TOL,
                    tuple(cu), qv="normal", do_scale=0.1, steps=30)


PEER_CASES: dict[str, PeerCase] = {c.name: c for c in (
    _chunk(1, 63, 1, 64, 0.8, 0.99),
    _chunk(2, 500, 4, 60, 0.8, 0.99),
    _chunk(2, 1024, 8, 128, 0.8, 0.99),
    _chunk(2, 1024, 8, 128, 0.01, 0.1),
    _chunk(2, 1024, 8, 128, 1.0, 1.0),
    _chunk(4, 2048, 8, 64, 0.8, 0.99),
    _varlen(3, 50, 0.8, 0.99, (0, 15)),
    _varlen(4, 64, 0.8, 0.99, (0, 14, 121, 421, 500)),
    _varlen(4, 64, 0.01, 0.1, (0, 256, 500, 1000)),
    _varlen(4, 100, 1.0, 1.0, (0, 15, 100, 300, 1200, 2000)),
)}


@dataclass
class PeerInputs:
    """The inputs of one peer case (``q, k, v`` fp16; ``g, beta, lam`` and the initial state fp32) and its
    upstream gradients ``dO [B,T,H,D]`` (fp16), ``dH_T [N,H,D,D]``, ``dG_T [N,H,D,D]`` (fp32)."""

    case: PeerCase
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    lam: torch.Tensor
    initial_state: tuple[torch.Tensor, torch.Tensor]
    cu_seqlens: torch.Tensor | None
    dO: torch.Tensor
    dH_T: torch.Tensor
    dG_T: torch.Tensor

    def problem(self) -> MesaProblem:
        """The inputs as a :class:`MesaProblem` (dtypes as drawn)."""
        return MesaProblem(self.q, self.k, self.v, self.g, self.beta, self.lam, self.initial_state, self.cu_seqlens)


def make_peer_case(name: str, seed: int = 0, device="cpu") -> PeerInputs:
    """The inputs of peer case ``name`` (module docstring), drawn on the CPU from a private generator
    seeded with ``seed`` (the global RNG is never touched), then moved to ``device``."""
    if name not in PEER_CASES:
        raise ValueError(f"unknown peer case {name!r}; known: {sorted(PEER_CASES)}")
    case = PEER_CASES[name]
    B, T, H, D = case.shape
    N = case.n_seqs
    gen = torch.Generator().manual_seed(seed)
    f64, f16, f32 = torch.float64, torch.float16, torch.float32

    def rand(*shape, dtype=f64):
        return torch.rand(shape, generator=gen, dtype=dtype)

    def unit(*shape):
        u = rand(*shape)
        return u / u.norm(dim=-1, keepdim=True)

    def qv():  # drawn in fp16 and divided there, so that U[0,1) / 10 stays below 0.1
        x = rand(B, T, H, D, dtype=f16) if case.qv == "uniform" else torch.randn(B, T, H, D, generator=gen, dtype=f16)
        return x / 10

    q, k, v = qv(), unit(B, T, H, D).to(f16), qv()
    lo, hi = case.gate_range
    g = torch.log((lo + (hi - lo) * rand(B, T, H)).to(f32))
    beta = torch.sigmoid(rand(B, T, H)).to(f16).to(f32)
    lam = (0.25 + 0.75 * torch.sigmoid(rand(H, D))).to(f16).to(f32)
    k0 = unit(N, H, D).to(f16).to(f64)
    H0 = (k0[..., :, None] * k0[..., None, :]).to(f16).to(f32)
    G0 = rand(N, H, D, D).to(f32)
    dO = case.do_scale * rand(B, T, H, D, dtype=f16)
    dH_T, dG_T = rand(N, H, D, D).to(f32), rand(N, H, D, D).to(f32)
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.int64)

    def dev(t):
        return None if t is None else t.to(device)

    return PeerInputs(case, *(dev(t) for t in (q, k, v, g, beta, lam)), (dev(H0), dev(G0)), dev(cu), dev(dO),
                      dev(dH_T), dev(dG_T))


def run_peer_case(fn: Callable, name: str, seed: int = 0, device="cpu", **options) -> list[dict]:
    """Run an op shaped like :func:`kernels.mesa_chunk` on peer case ``name`` and judge it as the peer does.

    Calls ``fn(q, k, v, g, beta, lam, steps=..., initial_state=(H0, G0), output_final_state=True,
    [cu_seqlens=...], **options)`` (first two results ``o, (H_T, G_T)``), backpropagates
    ``L = <dO, o> + <dH_T, H_T> + <dG_T, G_T>``, and compares o, H_T, G_T and the gradients of q, k, v, g,
    beta, lam (and of H0, G0 where returned) with the float64 reference by :func:`peer_close`. One row per
    quantity (the keys of :mod:`stability.guard`'s rows): ``measured`` is the peer's relative RMS error,
    ``budget`` its tolerance, ``verdict`` pass / FAIL (n/a: no gradient returned)."""
    inp = make_peer_case(name, seed, device)
    case = inp.case
    leaves = [t.detach().clone().requires_grad_() for t in (inp.q, inp.k, inp.v, inp.g, inp.beta, inp.lam)]
    init = tuple(s.detach().clone().requires_grad_() for s in inp.initial_state)
    extra = {} if inp.cu_seqlens is None else {"cu_seqlens": inp.cu_seqlens}
    ref = reference(inp.problem(), inp.dO, inp.dH_T, inp.dG_T)
    kappa = float(ref.kappa_bound.max())
    base = dict(kind="peer", case=name, derivation=f"rms ratio < budget, or max abs err <= {PEER_ABS_PASS:g}",
                kappa=kappa)

    def row(quantity, got, want):
        if got is None:
            return dict(base, quantity=quantity, measured=float("nan"), budget=case.tolerances[quantity],
                        verdict="n/a", note="not returned")
        passed, ratio, max_abs = peer_close(got.detach(), want, case.tolerances[quantity])
        return dict(base, quantity=quantity, measured=ratio, budget=case.tolerances[quantity],
                    verdict="pass" if passed else "FAIL", note=f"max abs err {max_abs:.3g}")

    try:
        out = fn(*leaves, steps=case.cg_steps, initial_state=init, output_final_state=True, **extra, **options)
        o, (H_T, G_T) = out[0], out[1]
        loss = (o * inp.dO).sum() + (H_T * inp.dH_T).sum() + (G_T * inp.dG_T).sum()
        loss.backward()
    except Exception as err:  # a crash fails every quantity, with its message
        return [dict(base, quantity=qn, measured=float("inf"), budget=case.tolerances[qn], verdict="FAIL",
                     note=f"raised {err!r}"[:200]) for qn in QUANTITIES]
    rows = [row("o", o, ref.o), row("H_T", H_T, ref.final_state[0]), row("G_T", G_T, ref.final_state[1])]
    for n, t in zip(("q", "k", "v", "g", "beta", "lam"), leaves, strict=True):
        rows.append(row(f"d{n}", t.grad, ref.grads[n]))
    rows.append(row("dH0", init[0].grad, ref.grads["H0"]))
    rows.append(row("dG0", init[1].grad, ref.grads["G0"]))
    return rows


# --- the standing check: the peer cases in the guard ---------------------------------------------

# Documented limits (docs/peer-cases-gpu/README.md, measured on an H200): the gates' gradient dg, a
# reverse sum over tokens that cancels, of the policies with 16-bit or tf32 products misses the peer's
# tolerance under strong forgetting (gamma in [0.01, 0.1]: 0.011 to 0.57), and bf16-bf16state's also
# under the moderate forgetting of gamma in [0.8, 0.99] (0.015 to 0.026); the certificate, which
# covers the solves x and y, does not report it. A check above its tolerance that is one of these is
# reported as "limit", not as a silent FAIL.
FAST_POLICIES = ("tf32", "bf16-fp32state", "bf16-bf16state", "fp16-fp32state", "fp16-fp16state")
_DG_LIMIT = ("dg, a reverse sum that cancels, amplifies the errors of the {}'s solves "
             "(docs/peer-cases-gpu/README.md); use auto, bf16x3 or fp32 when the gates' gradients matter")
KNOWN_LIMITS = {(p, "dg", (0.01, 0.1)): _DG_LIMIT.format(p) for p in FAST_POLICIES}
KNOWN_LIMITS[("bf16-bf16state", "dg", (0.8, 0.99))] = _DG_LIMIT.format("bf16-bf16state")


def known_limit(policy: str | None, name: str, quantity: str) -> str | None:
    """The documented reason a check of ``policy`` on case ``name`` misses its tolerance, or None."""
    return KNOWN_LIMITS.get((policy, quantity, PEER_CASES[name].gate_range))


def check_cases(fn: Callable, cases=None, *, device="cpu", progress: bool = True, **options) -> list[dict]:
    """Every peer case (or ``cases``) through :func:`run_peer_case` with ``options``, as a guard: each
    row also gets ``policy`` (the name of ``options["policy"]``, None without one), ``flagged`` (the
    op's certificate warned during the case: forward or adjoint) and ``guard_verdict``: ``pass``;
    ``flagged`` (above tolerance and reported by the op); ``limit`` (above tolerance, a documented
    limit of the policy: :data:`KNOWN_LIMITS`); ``FAIL`` (above tolerance, silent); ``n/a``."""
    import warnings

    from mesa_stability.solvers import get_policy
    from mesa_stability.solvers.certificate import CertificateWarning
    from mesa_stability.solvers.verdict import flush

    policy = get_policy(options["policy"]).name if options.get("policy") is not None else None

    names = list(PEER_CASES) if cases is None else list(cases)
    unknown = [n for n in names if n not in PEER_CASES]
    if unknown:
        raise ValueError(f"unknown peer case(s) {unknown}; cases: {list(PEER_CASES)}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc="peer cases", unit="case", disable=None)
    rows = []
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CertificateWarning)
            case_rows = run_peer_case(fn, name, device=device, **options)
            flush()  # the verdicts still pending (CUDA), inside the capture
        flagged = sum(issubclass(c.category, CertificateWarning) for c in caught)
        for r in case_rows:
            v = r["verdict"]
            if v == "FAIL":
                v = "flagged" if flagged else "limit" if known_limit(policy, name, r["quantity"]) else "FAIL"
            rows.append(dict(r, policy=policy, flagged=flagged, guard_verdict=v))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows
