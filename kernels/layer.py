"""The Mesa layer as a ``torch.nn.Module`` (docs/design.md section 2, layer parametrisation).

For input ``u [B,T,d_model]``, per head h:

    q = l2norm(silu(conv4(W_q u))),  k = l2norm(silu(conv4(W_k u))),  v = W_v u
    beta  = sigmoid(W_b u)                                   (one scalar per head)
    gamma = sigmoid(W_a u) * (1 - (1 - 0.9975) beta^2)       (capped forget gate)
    g     = log gamma = logsigmoid(W_a u) + log(1 - 0.0025 beta^2)   (float32, <= 0)
    lam   = 0.25 + softplus(theta),  theta initialised so that lam = 1
    o     = mesa_chunk(q, k, v, g, beta, lam)                # o_t = G_t (H_t + Lambda)^{-1} q_t
    y     = W_o [ RMSNorm_h(o) * silu(W_z u) ]               (the gate is optional)

``conv4`` is a causal depthwise convolution of window 4 (the token and its three predecessors).
The cap keeps ``tr H_t`` bounded when gamma would approach 1.

**flash-linear-attention's layer** (``fla.layers.MesaNet``) is this one with ``gate_cap=None`` (gamma
= sigmoid(W_a u), no cap) and ``qk_norm_eps=1e-6`` (its L2 norm, ``x / sqrt(sum x^2 + 1e-6)``, instead
of ``x / max(||x||, 1e-12)``); ``mesa_stability.compat.fla.from_fla`` builds such a layer from fla's
weights, and ``to_fla`` writes them back. The residual connection and the
pre-norm belong to the block around the layer (``ablations``). Decoding one token reuses the
state ``(H_T, G_T)`` and the last three conv inputs kept in a :class:`MesaCache`; on the Triton
backend it runs the decode kernel (:func:`kernels.mesa_step`, :meth:`MesaLayer.step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mesa_stability.solvers.spec import SolverSpec, solver_spec

from .mesa import STEP_POLICIES, mesa_chunk, mesa_step, traced

# gamma cap of docs/design.md: gamma = sigmoid(a) * (1 - (1 - 0.9975) beta^2)
GATE_CAP = 0.9975
# lam = LAM_FLOOR + softplus(theta), initialised to LAM_INIT
LAM_FLOOR = 0.25
LAM_INIT = 1.0
CONV_SIZE = 4


@dataclass
class MesaCache:
    """Decoding state of one layer: the Mesa states and the conv inputs of the last tokens."""

    state: tuple[torch.Tensor, torch.Tensor]  # (H [B,H,D,D], G [B,H,Dv,D])
    conv_q: torch.Tensor  # [B, H*D, CONV_SIZE - 1] pre-conv q projections of the last tokens
    conv_k: torch.Tensor  # [B, H*D, CONV_SIZE - 1]


def l2norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Over the last dim: ``x / max(||x||, 1e-12)`` (``eps`` None, ``F.normalize``), or fla's
    ``x / sqrt(sum x^2 + eps)`` formed in float32 (at least) and returned in x's dtype."""
    if eps is None:
        return F.normalize(x, dim=-1)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_norm(o: torch.Tensor, eps: float) -> torch.Tensor:
    """``o / sqrt(mean(o^2) + eps)`` over the last dim, formed on ``o / s`` with ``s = max |o|`` (a row of
    size 1e20 would overflow ``o^2`` in fp32 and give 0): ``o / s / sqrt(mean((o / s)^2) + eps / s^2)``.
    A non-finite row gives NaN (a diverged model is not hidden); a zero row gives 0."""
    s = o.detach().abs().amax(-1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    on = o / s
    return on * torch.rsqrt(on.pow(2).mean(-1, keepdim=True) + eps / s.pow(2))


class MesaLayer(nn.Module):
    """Mesa sequence mixer. ``solver`` (a :class:`solvers.spec.SolverSpec`, default ``SolverSpec()``)
    says how it solves, and ``solver_options`` (its fields: steps, tol, policy, backend, check, ...)
    change it; ``self.solver`` may be replaced between calls.

    ``SolverSpec.method`` other than ``"cg"`` (the kernels, ``mesa_chunk``) picks a solver of
    :func:`solvers.solve` (``"exact"``, ``"sherman_morrison"``, ``"chebyshev"``, or ``"gla"``: no solve,
    gated linear attention on the same states), differentiated by autograd: for ablations at small sizes.

    ``gate_init = (low, high)`` initialises the forget gates' bias so that the heads start with gamma
    from ``low`` to ``high`` (1 - gamma log-spaced); None keeps PyTorch's default (gamma near 1/2).
    Associative recall over tens of tokens does not train from gamma near 1/2 (the recall study)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, value_dim: int | None = None, *,
                 output_gate: bool = True, norm_eps: float = 1e-5, gate_cap: float | None = GATE_CAP,
                 qk_norm_eps: float | None = None, gate_init: tuple[float, float] | None = None,
                 solver: SolverSpec | None = None, **solver_options):
        super().__init__()
        if d_model < 1 or n_heads < 1:
            raise ValueError(f"d_model and n_heads must be positive, got {d_model}, {n_heads}")
        if gate_cap is not None and not 0 < gate_cap <= 1:
            raise ValueError(f"gate_cap must be in (0, 1] or None (no cap, as fla's layer), got {gate_cap}")
        if qk_norm_eps is not None and not qk_norm_eps > 0:
            raise ValueError(f"qk_norm_eps must be positive or None, got {qk_norm_eps}")
        if gate_init is not None and not (len(gate_init) == 2 and 0 < gate_init[0] <= gate_init[1] < 1):
            raise ValueError(f"gate_init must be None or (low, high) with 0 < low <= high < 1, got {gate_init}")
        self.gate_cap, self.qk_norm_eps = gate_cap, qk_norm_eps
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.value_dim = value_dim or self.head_dim
        self.solver = solver_spec(solver, **solver_options)
        self.last_steps: torch.Tensor | None = None
        H, D, Dv = n_heads, self.head_dim, self.value_dim
        self.q_proj = nn.Linear(d_model, H * D, bias=False)
        self.k_proj = nn.Linear(d_model, H * D, bias=False)
        self.v_proj = nn.Linear(d_model, H * Dv, bias=False)
        self.b_proj = nn.Linear(d_model, H, bias=True)
        self.a_proj = nn.Linear(d_model, H, bias=True)
        self.q_conv = nn.Conv1d(H * D, H * D, CONV_SIZE, groups=H * D, bias=False)
        self.k_conv = nn.Conv1d(H * D, H * D, CONV_SIZE, groups=H * D, bias=False)
        # softplus(theta) = LAM_INIT - LAM_FLOOR  <=>  theta = log(exp(LAM_INIT - LAM_FLOOR) - 1)
        self.lam_theta = nn.Parameter(torch.full((H, D), math.log(math.expm1(LAM_INIT - LAM_FLOOR))))
        self.norm_weight = nn.Parameter(torch.ones(Dv))
        self.norm_eps = norm_eps
        self.z_proj = nn.Linear(d_model, H * Dv, bias=False) if output_gate else None
        self.o_proj = nn.Linear(H * Dv, d_model, bias=False)
        if gate_init is not None:
            # sigmoid(bias_h) = gamma_h with 1 - gamma_h log-spaced over the heads: per-head memory
            # timescales 1 / (1 - gamma) from 1 / (1 - low) to 1 / (1 - high) tokens at initialisation
            # (the default bias gives gamma near 1/2, a memory of about two tokens)
            one_minus = torch.logspace(math.log10(1 - gate_init[0]), math.log10(1 - gate_init[1]), H)
            with torch.no_grad():
                self.a_proj.bias.copy_(torch.log1p(-one_minus) - torch.log(one_minus))

    # ---------------------------------------------------------------------------------------------
    @property
    def lam(self) -> torch.Tensor:
        """lam = 0.25 + softplus(theta), ``[H, D]``, in theta's dtype (at least float32)."""
        theta = self.lam_theta
        return LAM_FLOOR + F.softplus(theta.to(torch.promote_types(theta.dtype, torch.float32)))

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, past: torch.Tensor | None):
        """Causal depthwise conv over time: x ``[B,T,C]``; returns (y ``[B,T,C]``, last inputs ``[B,C,3]``)."""
        xt = x.transpose(1, 2)
        if past is None:
            past = xt.new_zeros(xt.shape[0], xt.shape[1], CONV_SIZE - 1)
        full = torch.cat([past.to(xt.dtype), xt], dim=2)
        return conv(full).transpose(1, 2), full[:, :, -(CONV_SIZE - 1):]

    def _inputs(self, u: torch.Tensor, cache: MesaCache | None):
        B, T, _ = u.shape
        H, D, Dv = self.n_heads, self.head_dim, self.value_dim
        q, cq = self._conv(self.q_conv, self.q_proj(u), None if cache is None else cache.conv_q)
        k, ck = self._conv(self.k_conv, self.k_proj(u), None if cache is None else cache.conv_k)
        dt = torch.promote_types(u.dtype, torch.float32)  # gates at least fp32 (bf16 activations)
        q = l2norm(F.silu(q).view(B, T, H, D).to(dt), self.qk_norm_eps)
        k = l2norm(F.silu(k).view(B, T, H, D).to(dt), self.qk_norm_eps)
        v = self.v_proj(u).view(B, T, H, Dv).to(dt)
        beta = torch.sigmoid(self.b_proj(u).to(dt))
        g = F.logsigmoid(self.a_proj(u).to(dt))
        if self.gate_cap is not None:
            g = g + torch.log1p(-(1 - self.gate_cap) * beta * beta)
        return q, k, v, g.clamp_max(0.0), beta, cq, ck

    def forward(self, u: torch.Tensor, cache: MesaCache | None = None, use_cache: bool = False):
        """``y [B,T,d_model]``; with ``use_cache`` (or a cache given) also the updated :class:`MesaCache`."""
        if not isinstance(u, torch.Tensor) or u.dim() != 3:
            raise ValueError(f"u must be a [B,T,d_model] tensor, got {getattr(u, 'shape', type(u).__name__)}")
        if u.shape[2] != self.d_model:
            raise ValueError(f"u has d_model = {u.shape[2]}, the layer expects {self.d_model}")
        if cache is not None and cache.state[0].shape[0] != u.shape[0]:
            raise ValueError(f"cache is for batch size {cache.state[0].shape[0]}, u has {u.shape[0]}")
        compiling = traced()
        if not compiling and not bool(torch.isfinite(u).all()):
            # an earlier layer (or the parameters) diverged: propagate NaN so that the caller's loss
            # check reports the divergence, instead of raising on the solver's input validation
            y = torch.full_like(u, float("nan"))
            if use_cache or cache is not None:
                raise ValueError("u has non-finite values; cannot update a decoding cache")
            return y
        q, k, v, g, beta, cq, ck = self._inputs(u, cache)
        init = None if cache is None else cache.state
        spec = self.solver
        method = spec.method
        if method == "cg" and init is not None and u.shape[1] == 1 and not compiling and decodes(spec, q):
            # one token after a prefill: the decode kernel (state update, solve and certificate in one launch)
            o, state, stats = mesa_step(q, k, v, g, beta, self.lam.to(q.dtype), init, spec, return_stats=True)
            self.last_steps = stats.steps.detach()[:, None]
        elif method == "cg" and compiling:  # one graph node (the registered op); no per-call diagnostics
            o, state = mesa_chunk(q, k, v, g, beta, self.lam.to(q.dtype), spec, initial_state=init,
                                  output_final_state=True)
        elif method == "cg":
            o, state, stats = mesa_chunk(q, k, v, g, beta, self.lam.to(q.dtype), spec, initial_state=init,
                                         output_final_state=True, return_stats=True)
            self.last_steps = stats.steps.detach()  # [B,T,H] CG steps of the latest call (diagnostics)
        else:
            # the reference solvers (exact, sherman_morrison, chebyshev): differentiable by autograd
            from mesa_stability import solvers

            # the policy, not an enclosing autocast, sets the solver's precision
            with torch.autocast(q.device.type, enabled=False):
                res = solvers.solve(solvers.MesaProblem(q, k, v, g, beta, self.lam.to(q.dtype), init), spec)
            o, state = res.o, res.final_state
            self.last_steps = None if res.steps is None else res.steps.detach()
        B, T = u.shape[:2]
        o = _rms_norm(o.to(q.dtype), self.norm_eps) * self.norm_weight
        o = o.reshape(B, T, self.n_heads * self.value_dim)
        if self.z_proj is not None:
            o = o * F.silu(self.z_proj(u).to(o.dtype))
        y = self.o_proj(o.to(u.dtype))
        if use_cache or cache is not None:
            return y, MesaCache(state, cq, ck)
        return y

    def step(self, u: torch.Tensor, cache: MesaCache):
        """Decode one token: ``u [B,1,d_model]`` (or ``[B,d_model]``) -> (y, new cache). With the Triton
        backend (CUDA tensors, or the interpreter) and a policy of the decode kernel
        (``kernels.mesa.STEP_POLICIES``: the default ``auto``, and ``fp32``) it runs
        :func:`kernels.mesa_step`; otherwise ``mesa_chunk`` on the one token."""
        if u.dim() == 2:
            u = u[:, None]
        if u.shape[1] != 1:
            raise ValueError(f"step decodes one token; u has T = {u.shape[1]} (use forward for prefill)")
        return self.forward(u, cache=cache)


def decodes(spec: SolverSpec, q: torch.Tensor) -> bool:
    """Whether a one-token call under ``spec`` runs the decode kernel: the Triton backend (``auto`` on
    CUDA tensors) and a policy it implements."""
    if spec.policy.name not in STEP_POLICIES or torch.is_grad_enabled() and q.requires_grad:
        return False  # the decode kernel has no backward
    return spec.backend == "triton" or (spec.backend == "auto" and q.is_cuda)
