"""The kernels' operand vocabulary (kernels/operands.py): the software rounding branch (SOFT) that the
interpreter runs computes the GPU's numbers.

``SOFT`` is the one interpreter-specific branch of the kernels. It rounds operands on the bit
pattern and multiplies the rounded fp32 tiles in IEEE fp32; the compiled kernels cast and run the
low-precision MMA. Three levels of check:

* ``round_to`` / ``operand`` against PyTorch's round-to-nearest-even casts, bit for bit, on values
  that exercise the rounding: ties (to even, both ways), the largest finite values and the overflow
  past them, subnormals, signed zeros, inf and NaN. In the interpreter this checks SOFT; on the GPU
  both branches.
* (GPU) a product ``mm`` per operand code with SOFT on and off: the products of the rounded
  operands are exact in fp32, so the two may differ only by the fp32 accumulation's summation
  order, ``|c_soft - c_mma| <= 2 n 2^-24 (|a| |b|)`` entrywise for an inner dimension n (the
  standard bound ``gamma_n``, once for each of the two sums).
* (GPU) the whole op, forward and backward, under every kernel policy with
  :func:`kernels.operands.emulated_rounding` against the plain launch.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402

from mesa_stability import kernels, solvers  # noqa: E402
from mesa_stability.kernels import operands  # noqa: E402
from mesa_stability.kernels.mesa import KERNEL_POLICIES  # noqa: E402
from mesa_stability.stability import cases, metrics  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
pytestmark = pytest.mark.triton
gpu_only = pytest.mark.skipif(INTERPRET, reason="compares the SOFT branch with the compiled casts and MMAs")
# Branches to check: in the interpreter only SOFT is right (its casts truncate); on the GPU both.
BRANCHES = (True,) if INTERPRET else (True, False)
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
OP_OF = {torch.bfloat16: operands.OP_CODES["bf16"], torch.float16: operands.OP_CODES["fp16"]}
BLOCK = 1024


@triton.jit
def _round_kernel(x_ptr, r_ptr, o_ptr, n, DTYPE: tl.constexpr, OP: tl.constexpr, SOFT: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    tl.store(r_ptr + offs, operands.round_to(x, DTYPE, SOFT), mask=m)
    tl.store(o_ptr + offs, operands.operand(x, OP, SOFT).to(tl.float32), mask=m)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, OP: tl.constexpr,
               SOFT: tl.constexpr):
    o_m, o_k, o_n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :])
    b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :])
    b_hi, b_lo = operands.split(b, OP, SOFT)
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], operands.mm(a, b_hi, b_lo, OP, SOFT, False))


def _rounding_probe(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values around every kind of rounding decision of ``dtype``."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4096, generator=gen) * torch.logspace(-8, 8, 4096)
    # exact ties: a value of the target format plus half its ulp, even and odd last bits
    # (base = m 2^e with m in [0.5, 1): its ulp is eps 2^(e-1); base +- ulp/2 is exact in fp32)
    base = torch.randn(512, generator=gen).to(dtype).to(torch.float32)
    ulp = info.eps * torch.ldexp(torch.ones_like(base), torch.frexp(base).exponent - 1)
    ties = torch.cat([base + ulp / 2, base - ulp / 2])
    edges = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4, -info.tiny / 3,
                          float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38])
    near_max = info.max * (1 + torch.linspace(-2, 2, 65) * info.eps)  # rounds down, ties, overflows
    nans = torch.tensor([0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0xFF800001], dtype=torch.int64)
    nans = nans.to(torch.int32).view(torch.float32)  # NaN payloads the bit trick must not carry into inf / 0
    return torch.cat([grid, ties, edges, near_max.to(torch.float32), nans])


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal as values, NaN where NaN (payloads aside), with the sign of zero."""
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return False
    return torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("soft", BRANCHES, ids=lambda s: "soft" if s else "compiled")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounding_matches_round_to_nearest_even_casts(dtype, soft):
    """round_to and operand give PyTorch's fp32 -> bf16 / fp16 cast (round to nearest even), bit for bit."""
    x = _rounding_probe(dtype)
    want = x.to(dtype).to(torch.float32)
    xd = x.to(DEVICE)
    r, o = torch.empty_like(xd), torch.empty_like(xd)
    _round_kernel[(triton.cdiv(x.numel(), BLOCK),)](xd, r, o, x.numel(), DTYPE=TL_DTYPES[dtype], OP=OP_OF[dtype],
                                                     SOFT=soft, BLOCK=BLOCK)
    assert _same_bits(r.cpu(), want)
    assert _same_bits(o.cpu(), want)


def test_emulated_rounding_forces_soft_and_restores():
    """emulated_rounding() turns SOFT on for every launch inside the block, and off again after it."""
    fn = kernels.chunk_cg._chunk_cg_kernel
    assert operands.software_rounding(fn) is INTERPRET
    with operands.emulated_rounding():
        assert operands.software_rounding(fn) is True
    assert operands.software_rounding(fn) is INTERPRET


@gpu_only
@pytest.mark.parametrize("op", sorted(operands.OP_CODES), ids=str)
def test_soft_products_equal_the_mma_up_to_summation_order(op):
    """mm with SOFT (rounded fp32 tiles, IEEE dots) against the compiled MMA of the same operand code:
    within 2 n 2^-24 (|a||b|) entrywise; a different operand rounding (truncation, say) is 2^-8 to
    2^-11 relative per product, far above it."""
    M = K = N = 64
    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(M, K, generator=gen) * torch.logspace(-2, 2, K)).to(DEVICE)
    b = torch.randn(K, N, generator=gen).to(DEVICE)
    c = {}
    for soft in (True, False):
        c[soft] = torch.empty(M, N, device=DEVICE)
        _mm_kernel[(1,)](a, b, c[soft], M=M, K=K, N=N, OP=operands.OP_CODES[op], SOFT=soft)
    bound = 2 * K * 2.0**-24 * (a.abs() @ b.abs())
    excess = ((c[True] - c[False]).abs() - bound).max().item()
    assert excess <= 0, f"{op}: SOFT and the MMA differ by {excess:.3g} beyond the summation-order bound"


def _op_and_grads(leaves, e, **options):
    """o and the gradients of (o . e) with respect to q, k, v, g, beta, lam, as float64 tensors."""
    xs = [t.detach().clone().requires_grad_(True) for t in leaves]
    o = kernels.mesa_chunk(*xs, check=None, chunk_size=32, **options)
    return [o.detach().double()] + [gr.double() for gr in torch.autograd.grad(o, xs, e.to(o.dtype))]


@gpu_only
@pytest.mark.parametrize("policy", KERNEL_POLICIES)
def test_the_op_computes_the_same_numbers_with_software_rounding(policy):
    """The whole op (chunk states, CG, certificate, backward) with emulated_rounding() against the
    compiled low-precision casts and MMAs, on a well-conditioned case (kappa below ~10), for o and
    every gradient, both compared with the float64 reference (the torch backend's fp64 policy on the
    same inputs): d the difference of the branches, e the compiled result's error.

    Both branches round the same operands the same way; they differ in the fp32 summation order of
    the products (the MMA's against IEEE FMAs), a relative difference delta ~ n 2^-24 (n = 32, the
    inner dimension). Where delta moves a value across a rounding boundary of a later operand of unit
    roundoff u (probability ~ delta / u per element), that element moves by one ulp, so the rounding
    noise of the two branches differs by an RMS of about sqrt(delta / u) times the noise itself:
    d ~ sqrt(delta / u) e. The test allows 4 sqrt(n 2^-24 / u) e (0.09 e for bf16 operands, 0.25 e
    for fp16 and tf32), plus kappa 2^-18 for the policies whose error is that of the fp32 arithmetic
    (fp32, bf16x3). A branch that rounds differently (truncation against round to nearest, as the
    GPU's tf32 MMA does with raw fp32 operands) has d ~ e (measured 1.2 e) and fails."""
    p = cases.make("well_conditioned", B=1, T=96, H=2, D=32, Dv=32, seed=3)
    f32 = [t.to(DEVICE, torch.float32) for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    leaves = [t.to(torch.bfloat16) if i < 3 else t for i, t in enumerate(f32)]
    e = torch.randn(p.v.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    ref = _op_and_grads([t.double() for t in leaves], e, steps=200, tol=1e-14, policy="fp64", backend="torch")
    hw = _op_and_grads(leaves, e, steps=30, policy=policy, backend="triton")
    with operands.emulated_rounding():
        soft = _op_and_grads(leaves, e, steps=30, policy=policy, backend="triton")
    kappa = metrics.condition_numbers(p).max().item()
    allowed = 4 * math.sqrt(32 * 2.0**-24 / solvers.get_policy(policy).u)
    report, bad = [], []
    for name, r, h, s in zip(("o", "dq", "dk", "dv", "dg", "dbeta", "dlam"), ref, hw, soft, strict=True):
        err = ((h - r).norm() / r.norm()).item()
        d = ((s - h).norm() / r.norm()).item()
        report.append(f"{name}: d {d:.2e} e {err:.2e}")
        if not d <= allowed * err + kappa * 2.0**-18:
            bad.append(name)
    assert not bad, f"{policy}: SOFT and compiled differ beyond {allowed:.2g} e in {bad}: " + "; ".join(report)
