"""The result every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .precision import PrecisionPolicy


@dataclass
class SolveResult:
    """Solution of the T systems of a :class:`~solvers.problem.MesaProblem`.

    ``x``: q-star ``(H_t + Lambda)^{-1} q_t``, ``[B,T,H,D]``; ``o``: ``G_t x_t``, ``[B,T,H,Dv]``;
    ``steps``: per-token iteration counts ``[B,T,H]`` (int64), ``None`` for direct methods;
    ``final_state``: ``(H_T [B,H,D,D], G_T [B,H,Dv,D])`` in the accumulation dtype;
    ``residual``: per-token relative residual ``||r_k|| / ||r_0||`` the iteration ended with
    (recursively updated residual), ``None`` for direct methods; ``breakdown``: per-token flag,
    True where ``p^T A p <= 0`` stopped CG early; ``info``: method-specific extras.
    """

    method: str
    policy: PrecisionPolicy
    x: torch.Tensor
    o: torch.Tensor
    final_state: tuple[torch.Tensor, torch.Tensor]
    steps: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    breakdown: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def mean_steps(self) -> float | None:
        return None if self.steps is None else float(self.steps.double().mean())

    @property
    def max_steps(self) -> int | None:
        return None if self.steps is None else int(self.steps.max())
