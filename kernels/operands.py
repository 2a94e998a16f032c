"""Triton helpers: the kernels' one vocabulary of product precisions and roundings.

Every product of a kernel rounds its operands to an operand precision ``OP`` (a constexpr code of
:data:`OP_CODES`, named as in :mod:`solvers.precision`) and accumulates in float32:

* ``fp32`` (0): true IEEE fp32 products (``input_precision="ieee"``; the GPU default would be TF32);
* ``tf32`` (1): tensor cores with a 10-bit mantissa, the operands rounded to nearest even first (the
  H100/H200 MMA truncates the fp32 values it is given: ``benchmarks/tf32_rounding.py``);
* ``bf16`` (2), ``fp16`` (3): tensor cores;
* ``bf16x3`` (4): operands split into bf16 ``hi + lo`` parts (``hi = bf16(a)``, ``lo = bf16(a - hi)``),
  ``a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi``: three bf16 MMAs, about 16 significant bits. A factor
  that is exactly bf16 (bf16 keys, say) has ``lo = 0``, and the product with it costs two.

A stored state is rounded to its dtype by :func:`round_to` (the state codes are the dtypes
themselves: float32, bfloat16 or float16, read off the output pointer).

``SOFT`` (software rounding) is how the same arithmetic runs in the Triton interpreter, whose fp32
-> bf16 cast truncates and whose bf16 dot multiplies raw bit patterns: operands are rounded in
software to fp32 values exactly representable in the operand precision (round to nearest even, as
the GPU's conversions), and a dot of two such tiles in IEEE fp32 equals the low-precision MMA with
fp32 accumulation up to summation order, since the products of such values are exact in fp32. It is
the one interpreter-specific branch of the kernels. :func:`software_rounding` decides it per launch;
on the GPU, :func:`emulated_rounding` forces it, so that a test can compare both branches on the
same inputs (``tests/test_operands.py``).
"""

from __future__ import annotations

import contextlib

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# Operand precisions of the products (solvers.precision names -> kernel codes).
OP_CODES = {"fp32": 0, "tf32": 1, "bf16": 2, "fp16": 3, "bf16x3": 4}

_FORCED = {"soft": False}


def is_interpreted(fn) -> bool:
    """Whether ``triton.jit`` made ``fn`` an interpreter function (``TRITON_INTERPRET=1`` at import);
    a ``triton.heuristics`` wrapper is looked through."""
    while type(fn).__name__ == "Heuristics":
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def software_rounding(fn) -> bool:
    """The ``SOFT`` flag of a launch of ``fn``: interpreted, or forced by :func:`emulated_rounding`."""
    return _FORCED["soft"] or is_interpreted(fn)


@contextlib.contextmanager
def emulated_rounding():
    """Launch every kernel with ``SOFT = True`` inside the block (compiled kernels too): the
    interpreter's arithmetic on the GPU, to check that it computes the GPU's numbers."""
    before = _FORCED["soft"]
    _FORCED["soft"] = True
    try:
        yield
    finally:
        _FORCED["soft"] = before


if triton is not None:

    @triton.jit
    def round_to(x, DTYPE: tl.constexpr, SOFT: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in ``DTYPE``, returned as fp32 (exactly representable in DTYPE)."""
        if SOFT and DTYPE == tl.bfloat16:
            # the interpreter's fp32 -> bf16 cast truncates (triton 3.6), so round on the bit pattern:
            # add 0x7FFF (half a bf16 ulp minus one) plus the parity of the last kept bit (bit 16),
            # then clear the 16 dropped mantissa bits; a finite value past bf16's largest rounds to
            # inf, as the cast does. NaN keeps its value (the bit trick could carry it into inf or 0).
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        else:
            y = x.to(DTYPE).to(tl.float32)
        return y

    @triton.jit
    def operand(x, OP: tl.constexpr, SOFT: tl.constexpr):
        """An fp32 tile as a product operand of precision OP (SOFT: rounded fp32 values)."""
        if OP == 2:
            if SOFT:
                y = round_to(x, tl.bfloat16, True)
            else:
                y = x.to(tl.bfloat16)
        elif OP == 3:
            if SOFT:
                y = round_to(x, tl.float16, True)
            else:
                y = x.to(tl.float16)
        elif OP == 1:
            # round to tf32 (10 explicit mantissa bits) to nearest even on the bit pattern, as
            # solvers.precision.round_tf32 does, on the GPU too: its tf32 MMA truncates the fp32
            # operands it is given (benchmarks/tf32_rounding.py), which would double the unit
            # roundoff, and the interpreter's tf32 dot is an fp32 dot; the rounded values are exact
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & 0xFFFFE000
            y = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        else:
            y = x
        return y

    @triton.jit
    def dot(a, b, OP: tl.constexpr, SOFT: tl.constexpr):
        """a @ b with operands already in precision OP, accumulated in fp32."""
        if OP == 0:
            # ieee: true fp32 products (the GPU default would be tf32)
            c = tl.dot(a, b, input_precision="ieee")
        elif OP == 1 and not SOFT:
            c = tl.dot(a, b, input_precision="tf32")
        elif SOFT:
            # interpreter: tf32/bf16/fp16 operands are rounded fp32 tiles; a product of two such values
            # is exact in fp32, so an ieee fp32 dot equals the low-precision MMA
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def split(x, OP: tl.constexpr, SOFT: tl.constexpr):
        """(hi, lo) operand parts of an fp32 tile: bf16 hi and lo for bf16x3, else (operand, unused)."""
        if OP == 4:
            hi = operand(x, 2, SOFT)
            lo = operand(x - hi.to(tl.float32), 2, SOFT)
        else:
            hi = operand(x, OP, SOFT)
            lo = hi
        return hi, lo

    @triton.jit
    def mm_parts(a_hi, a_lo, b_hi, b_lo, OP: tl.constexpr, SOFT: tl.constexpr, A_EXACT: tl.constexpr,
                 B_EXACT: tl.constexpr):
        """a @ b for two prepared operands a = (a_hi, a_lo), b = (b_hi, b_lo) (see :func:`split`).

        bf16x3: a_hi b_hi + a_lo b_hi (unless a is exactly bf16, A_EXACT) + a_hi b_lo (unless B_EXACT);
        otherwise one product of the operands."""
        if OP == 4:
            c = dot(a_hi, b_hi, 2, SOFT)
            if not A_EXACT:
                c += dot(a_lo, b_hi, 2, SOFT)
            if not B_EXACT:
                c += dot(a_hi, b_lo, 2, SOFT)
        else:
            c = dot(a_hi, b_hi, OP, SOFT)
        return c

    @triton.jit
    def mm(a, b_hi, b_lo, OP: tl.constexpr, SOFT: tl.constexpr, B_EXACT: tl.constexpr):
        """a @ b for an fp32 tile a and a prepared operand b = (b_hi, b_lo) (see :func:`split`)."""
        a_hi, a_lo = split(a, OP, SOFT)
        return mm_parts(a_hi, a_lo, b_hi, b_lo, OP, SOFT, False, B_EXACT)
