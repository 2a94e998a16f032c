"""Stability verification: high-precision references, error metrics (and, later, stress cases,
metamorphic properties, the stability report and the regression guard)."""

from .metrics import (
                      backward_error,
                      condition_numbers,
                      max_token_rel_error,
                      rel_error,
                      stability_ratio,
                      summarize,
                      token_rel_error,
)
from .reference import mp_solve

__all__ = ["backward_error", "condition_numbers", "max_token_rel_error", "mp_solve", "rel_error",
           "stability_ratio", "summarize", "token_rel_error"]
