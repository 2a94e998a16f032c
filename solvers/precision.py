"""Precision policies: which precision every quantity of a Mesa solve lives in.

A policy names, separately (docs/design.md section 4):

* ``input``    dtype q, k, v are rounded to before anything else (the gates g, beta and the
               regulariser lam are kept in ``accum``: cumulative log-gates are always at least fp32);
* ``state``    dtype the states H and G (and the Sherman-Morrison inverse P) are *stored* in;
               they are always *accumulated* in ``accum``;
* ``operand``  precision of matrix-product operands: ``fp64``, ``fp32`` (IEEE), ``tf32``
               (10 explicit mantissa bits, fp32 range), ``bf16``, ``fp16``, or ``bf16x3``: each
               operand split as ``a = a_hi + a_lo`` with ``a_hi = bf16(a)``, ``a_lo = bf16(a - a_hi)``
               and ``a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi`` (three bf16 tensor-core products,
               about 16 significant bits);
* ``accum``    dtype products are accumulated in, and the dtype of the iteration vectors
               (x, r, p of CG);
* ``scalar``   dtype of solver scalars (CG's alpha, beta and residual norms).

The PyTorch solvers *emulate* a policy: :meth:`PrecisionPolicy.mm` rounds both operands to
``operand`` precision, then multiplies in ``accum``. The Triton kernels implement the same policy
natively. One object is shared by solvers, kernels, the ablation CLI and the guard, so a sweep
over policies is one loop over :data:`POLICIES`.

The unit roundoff ``u`` of a policy is the largest unit roundoff among its input, state and
operand precisions: it is the ``u`` of the stability ratio ``err / (kappa u)``.

**Conditioning-aware precision** (``operand="auto"``, the policy ``auto``, the default of the kernels
and the layer): the free bound ``kappa <= (tr H + max lam) / min lam`` of each chunk's systems picks
the cheapest operand precision of :data:`AUTO_TIERS` whose ``kappa u`` stays at or below
:data:`AUTO_TARGET` (``2^-4``): bf16 products up to kappa = 16, bf16x3 up to kappa = 4096, and
beyond that IEEE fp32 products with the state (the inter-chunk term ``P H_c``, which carries the
large norm) and bf16x3 products with the chunk's own keys (whose norm is at most the chunk's sum of
beta). States stay fp32. :meth:`PrecisionPolicy.u_at` gives the unit roundoff a policy works in at a
condition number (constant for the named policies).

**Check threshold**: ``check_tol = sqrt(u)`` (half the policy's digits; 2^-4 for ``auto``, as its
coarsest tier): the accuracy certificate (:mod:`solvers.certificate`) flags a token whose
certified relative error of x exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Unit roundoff u = 2^-(p) for a format with p significand bits (including the implicit bit):
# fp64 p=53, fp32 p=24, tf32 p=11, fp16 p=11, bf16 p=8 (IEEE 754 and the NVIDIA TF32 definition).
UNIT_ROUNDOFF = {
    "fp64": 2.0**-53,
    "fp32": 2.0**-24,
    "tf32": 2.0**-11,
    "fp16": 2.0**-11,
    "bf16": 2.0**-8,
    # bf16x3: a_hi + a_lo carries 16 significand bits (8 + 8), and the dropped a_lo b_lo term is
    # below 2^-16 relative: u = 2^-16 (the classic split-precision bound, e.g. 3xTF32 on GPUs)
    "bf16x3": 2.0**-16,
}

# The tiers of the conditioning-aware operand precision (operand "auto"): a chunk whose free bound
# kappa_c = (max_t tr H_t + max lam) / min lam satisfies kappa_c * u(tier) <= AUTO_TARGET uses the
# first such tier. AUTO_TARGET = 2^-4 is the kappa u at which the guard's budgets (8 u kappa,
# stability/budgets.toml) reach 1/2: above it a product precision no longer resolves the solve.
AUTO_TARGET = 2.0**-4
AUTO_TIERS = ("bf16", "bf16x3", "fp32")


# Operand precisions of each tier: (products with the states H_c, G_c; products with the chunk's own
# keys and values). The fp32 tier keeps bf16x3 for the keys: the intra-chunk matrix K^T M K has norm
# at most the chunk's sum of beta (<= C), so its kappa u stays small at 2^-16 (C / min lam * 2^-16).
AUTO_OPS = {"bf16": ("bf16", "bf16"), "bf16x3": ("bf16x3", "bf16x3"), "fp32": ("fp32", "bf16x3")}


def auto_ops(tier: str, adjoint: bool = False) -> tuple[str, str]:
    """The ``auto`` policy's operand precisions (with the states, with the chunk's keys) in ``tier``.

    The backward (the adjoint solve, its right-hand side and the gradient contractions) runs the bf16
    tier in bf16x3: y enters the gates' gradient dg through a reverse cumulative sum that cancels, and
    bf16 products left dg 8% to 130% off under strong forgetting (gamma in [0.01, 0.1], where every
    chunk is in the bf16 tier), against 3e-4 with bf16x3 (tests/test_kernel_backward.py)."""
    if adjoint and tier == AUTO_TIERS[0]:
        tier = AUTO_TIERS[1]
    return AUTO_OPS[tier]


def auto_tier(kappa: float) -> str:
    """The operand precision of :data:`AUTO_TIERS` the ``auto`` policy uses at condition bound kappa."""
    for tier in AUTO_TIERS[:-1]:
        if kappa * UNIT_ROUNDOFF[tier] <= AUTO_TARGET:
            return tier
    return AUTO_TIERS[-1]


def auto_tier_index(kappa: torch.Tensor) -> torch.Tensor:
    """:func:`auto_tier` elementwise, as the index into :data:`AUTO_TIERS` (int8; NaN -> the last tier)."""
    idx = torch.full(kappa.shape, len(AUTO_TIERS) - 1, dtype=torch.int8, device=kappa.device)
    for i in reversed(range(len(AUTO_TIERS) - 1)):
        idx = torch.where(kappa * UNIT_ROUNDOFF[AUTO_TIERS[i]] <= AUTO_TARGET, i, idx).to(torch.int8)
    return idx

_DTYPE_NAME = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}
_NAME_DTYPE = {v: k for k, v in _DTYPE_NAME.items()}

SUPPORTED_DTYPES = tuple(_DTYPE_NAME)


def dtype_name(dtype: torch.dtype) -> str:
    """Short name (``fp32``, ``bf16``, ...) of a supported floating dtype."""
    try:
        return _DTYPE_NAME[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; supported: {list(_NAME_DTYPE)}") from None


def unit_roundoff_of(dtype: torch.dtype) -> float:
    """Unit roundoff of a supported floating dtype (``UNIT_ROUNDOFF`` by :func:`dtype_name`)."""
    return UNIT_ROUNDOFF[dtype_name(dtype)]


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to TF32 (10 explicit mantissa bits) with round-to-nearest-even.

    Works on the bit pattern: adds half an ulp of TF32 (0x0FFF plus the parity of the last kept
    bit, bit 13) and clears the 13 dropped mantissa bits. Inf and NaN are left as they are.
    """
    x32 = x.to(torch.float32)
    bits = x32.view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    out = rounded.view(torch.float32)
    return torch.where(torch.isfinite(x32), out, x32)


def round_to(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Round ``x`` to the named precision; the result keeps ``x``'s dtype.

    bf16 and fp16 values are exactly representable in tf32 (at most 11 significand bits, exponent
    range inside fp32's), so tf32 rounding leaves them unchanged. Under autograd the rounding is
    transparent (straight-through: its gradient is the identity), as a kernel's backward treats it.
    """
    if x.requires_grad:
        xd = x.detach()
        return x + (round_to(xd, precision) - xd)
    if precision == "tf32":
        if x.dtype in (torch.float16, torch.bfloat16):
            return x
        return round_tf32(x).to(x.dtype)
    if precision == "bf16x3":
        hi, lo = split_bf16(x)
        return hi + lo
    return x.to(_NAME_DTYPE[precision]).to(x.dtype)


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_hi, a_lo)`` with ``a_hi = bf16(a)``, ``a_lo = bf16(a - a_hi)``, both in ``x``'s dtype."""
    hi = x.to(torch.bfloat16).to(x.dtype)
    return hi, (x - hi).to(torch.bfloat16).to(x.dtype)


@dataclass(frozen=True)
class PrecisionPolicy:
    """Named precision policy; see the module docstring for the meaning of each field."""

    name: str
    input: str = "fp64"
    state: str = "fp64"
    operand: str = "fp64"
    accum: str = "fp64"
    scalar: str = "fp64"

    def __post_init__(self) -> None:
        for field in ("input", "state", "accum", "scalar"):
            value = getattr(self, field)
            if value not in _NAME_DTYPE:
                raise ValueError(f"policy {self.name!r}: {field}={value!r} is not one of {list(_NAME_DTYPE)}")
        if self.operand not in UNIT_ROUNDOFF and self.operand != "auto":
            raise ValueError(f"policy {self.name!r}: operand={self.operand!r} is not one of "
                             f"{list(UNIT_ROUNDOFF) + ['auto']}")
        if self.accum not in ("fp32", "fp64"):
            raise ValueError(f"policy {self.name!r}: accum must be fp32 or fp64, got {self.accum!r}")

    # dtypes -------------------------------------------------------------------------------
    @property
    def input_dtype(self) -> torch.dtype:
        return _NAME_DTYPE[self.input]

    @property
    def state_dtype(self) -> torch.dtype:
        return _NAME_DTYPE[self.state]

    @property
    def accum_dtype(self) -> torch.dtype:
        return _NAME_DTYPE[self.accum]

    @property
    def scalar_dtype(self) -> torch.dtype:
        return _NAME_DTYPE[self.scalar]

    @property
    def u(self) -> float:
        """Unit roundoff of the least precise of input, state and operand precision (for ``auto``
        operands: its coarsest tier)."""
        return self.u_at(0.0)

    def u_at(self, kappa: float) -> float:
        """Effective unit roundoff of the policy on a problem whose systems have condition bounds up to
        ``kappa``: :attr:`u` for a fixed operand precision. For ``auto`` it is the largest
        ``u(tier(k)) k / kappa`` over ``k <= kappa``: the chunks of smaller kappa ran in a coarser tier,
        whose error ``k u`` reaches AUTO_TARGET at the tier boundaries, so
        ``kappa u_at(kappa) = max(min(kappa u_bf16, AUTO_TARGET), kappa u_fp32)``."""
        base = max(UNIT_ROUNDOFF[self.input], UNIT_ROUNDOFF[self.state])
        if self.operand != "auto":
            return max(base, UNIT_ROUNDOFF[self.operand])
        if kappa <= 0:
            return max(base, UNIT_ROUNDOFF[AUTO_TIERS[0]])
        uk = max(min(kappa * UNIT_ROUNDOFF[AUTO_TIERS[0]], AUTO_TARGET), kappa * UNIT_ROUNDOFF[AUTO_TIERS[-1]])
        return max(base, uk / kappa)

    @property
    def check_tol(self) -> float:
        """Default threshold of the accuracy certificate: ``sqrt(u)`` (see the module docstring)."""
        return self.u ** 0.5

    # emulation helpers ---------------------------------------------------------------------
    def round_input(self, x: torch.Tensor) -> torch.Tensor:
        """q, k, v as the policy sees them: rounded to ``input``, held in ``accum``."""
        return round_to(x.to(self.accum_dtype), self.input)

    def store(self, s: torch.Tensor) -> torch.Tensor:
        """A state as stored: rounded to ``state`` precision, held in ``accum`` for arithmetic."""
        return round_to(s.to(self.accum_dtype), self.state)

    def operand_round(self, a: torch.Tensor) -> torch.Tensor:
        """A matmul operand as the policy's tensor cores see it, held in ``accum``."""
        return round_to(a.to(self.accum_dtype), self.operand)

    def _product_operand(self, operand: str | None) -> str:
        op = self.operand if operand is None else operand
        if op == "auto":
            raise ValueError("an 'auto' policy multiplies in a tier's precision: pass operand=auto_tier(kappa)")
        return op

    def prepare(self, b: torch.Tensor, operand: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The right operand of :meth:`mm` as the products see it, held in ``accum``: ``(b_hi, b_lo)``,
        the bf16 splits for ``bf16x3``, else ``(rounded b, None)``. A constant operand (a chunk's
        keys or states, multiplied at every iteration) is prepared once (:meth:`mm_prepared`)."""
        op = self._product_operand(operand)
        b = b.to(self.accum_dtype)
        if op == "bf16x3":
            return split_bf16(b)
        return round_to(b, op), None

    def mm_prepared(self, a: torch.Tensor, b: tuple[torch.Tensor, torch.Tensor | None],
                    operand: str | None = None) -> torch.Tensor:
        """:meth:`mm` with the right operand already prepared by :meth:`prepare` (the same numbers)."""
        op = self._product_operand(operand)
        a = a.to(self.accum_dtype)
        b_hi, b_lo = b
        if op == "bf16x3":
            a_hi, a_lo = split_bf16(a)
            return torch.matmul(a_hi, b_hi) + torch.matmul(a_hi, b_lo) + torch.matmul(a_lo, b_hi)
        return torch.matmul(round_to(a, op), b_hi)

    def mm(self, a: torch.Tensor, b: torch.Tensor, operand: str | None = None) -> torch.Tensor:
        """Batched ``a @ b`` with both operands rounded to ``operand`` (default: the policy's),
        accumulated in ``accum`` (for ``bf16x3``: ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` of the bf16
        splits). An ``auto`` policy needs the tier: :class:`~solvers.chunk_state.ChunkedSystem`
        passes each chunk's."""
        return self.mm_prepared(a, self.prepare(b, operand), operand)

    def to_scalar(self, s: torch.Tensor) -> torch.Tensor:
        """A solver scalar (inner product, step length) rounded to the ``scalar`` dtype."""
        return s.to(self.scalar_dtype)


def _p(name, input, state, operand, accum="fp32", scalar="fp32"):
    return PrecisionPolicy(name, input=input, state=state, operand=operand, accum=accum, scalar=scalar)


POLICIES: dict[str, PrecisionPolicy] = {
    p.name: p
    for p in (
        _p("fp64", "fp64", "fp64", "fp64", "fp64", "fp64"),
        _p("fp32", "fp32", "fp32", "fp32"),
        _p("tf32", "fp32", "fp32", "tf32"),
        _p("bf16x3", "fp32", "fp32", "bf16x3"),
        _p("bf16-fp32state", "bf16", "fp32", "bf16"),
        _p("bf16-bf16state", "bf16", "bf16", "bf16"),
        _p("fp16-fp32state", "fp16", "fp32", "fp16"),
        _p("fp16-fp16state", "fp16", "fp16", "fp16"),
        _p("auto", "fp32", "fp32", "auto"),
    )
}
# The one default of the kernels, the layer and the guard: conditioning-aware operand precision with
# fp32 states, covered by the accuracy certificate.
DEFAULT_POLICY = "auto"
ALIASES = {"bf16": "bf16-fp32state", "fp16": "fp16-fp32state", "float64": "fp64", "float32": "fp32"}


def get_policy(policy: str | PrecisionPolicy) -> PrecisionPolicy:
    """Look up a policy by name (or alias), or return a :class:`PrecisionPolicy` unchanged."""
    if isinstance(policy, PrecisionPolicy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a PrecisionPolicy, got {type(policy).__name__}")
    name = ALIASES.get(policy, policy)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {sorted(POLICIES) + sorted(ALIASES)}")
    return POLICIES[name]
