"""Hypothesis strategies that draw valid Mesa problems of random shapes, gates and dtypes.

Import this module only where hypothesis is installed (the test extra). Problems are built by
:func:`stability.cases.random_problem` from drawn sizes, ranges and a seed, so a failing example
is reproducible from its printed arguments.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .cases import random_problem

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@st.composite
def problem_kwargs(draw, max_B: int = 2, max_T: int = 40, max_H: int = 2, max_D: int = 8, max_Dv: int = 6,
                   dtypes=(torch.float64,)):
    """Keyword arguments for :func:`random_problem`: sizes, gate and regulariser ranges, dtype."""
    gamma_lo = draw(st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.05]))
    gamma_hi = draw(st.sampled_from([g for g in (1.0, 0.99, 0.9, 0.5, 0.1) if g >= gamma_lo] or [1.0]))
    lam_lo = draw(st.sampled_from([0.05, 0.25, 1.0]))
    return dict(
        B=draw(st.integers(1, max_B)),
        T=draw(st.integers(1, max_T)),
        H=draw(st.integers(1, max_H)),
        D=draw(st.integers(1, max_D)),
        Dv=draw(st.integers(1, max_Dv)),
        seed=draw(st.integers(0, 2**31 - 1)),
        gamma_range=(gamma_lo, gamma_hi),
        beta_range=(0.0, draw(st.sampled_from([0.0, 0.5, 1.0]))),
        lam_range=(lam_lo, lam_lo + draw(st.sampled_from([0.0, 1.0]))),
        initial_state=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
    )


def problems(**limits):
    """Strategy of valid :class:`~solvers.MesaProblem` instances (see :func:`problem_kwargs`)."""
    return problem_kwargs(**limits).map(lambda kw: random_problem(**kw))
