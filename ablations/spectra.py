"""Spectral and detection metrics for the softmax-temperature study of the byte-level ablation model.

Inputs are a logits matrix ``Z`` (``N x 256``) and hidden representations ``H`` (``N x d``). Everything
is computed in float64; ``s_1 >= s_2 >= ... >= s_k >= 0`` are the singular values of a matrix.

* :func:`singular_values`: ``s = svdvals(X)`` (``torch.linalg.svdvals`` of ``X`` in float64).
* :func:`numerical_rank`: ``#{i : s_i > tau * s_1}`` with relative threshold ``tau`` in (0, 1)
  (default ``1e-3``); the zero matrix has rank 0. Same count as
  ``numpy.linalg.matrix_rank(X, tol=tau * s_1)``.
* :func:`rank_sweep`: the numerical rank at each of several thresholds, ``{tau: #{i : s_i > tau s_1}}``
  (:data:`SWEEP_THRESHOLDS` = 1e-4, 1e-3, 1e-2, 1e-1 by default): how far a rank depends on ``tau``.
* :func:`row_centred`: the logits restricted to a set ``U`` of classes and centred per row,
  ``Z_U^c = Z[:, U] (I - 1 1^T / |U|)``, i.e. ``Z_U^c[n, j] = Z[n, U_j] - (1 / |U|) sum_k Z[n, U_k]``.
  ``softmax`` over ``U`` is invariant to adding a constant to a row (the direction ``1``); centring
  removes that direction, so ``Z_U^c 1 = 0`` and ``rank(Z_U^c) <= min(N, |U| - 1)``; for logits
  ``Z = H E^T`` also ``rank(Z_U^c) <= rank(H) <= d``. ``|U| - 1`` is the largest rank a model can use
  to separate the classes in ``U``.
* :func:`effective_rank` (Roy & Vetterli, 2007): ``p_i = s_i / sum_j s_j``,
  ``erank = exp(-sum_i p_i log p_i)`` with ``0 log 0 = 0``; the zero matrix has erank 0. For a nonzero
  matrix ``1 <= erank <= #{i : s_i > 0}``, with equality on the right iff the nonzero ``s_i`` are equal.
* :func:`auroc`: for scores where higher means positive, ``AUROC = P(a > b) + P(a = b) / 2`` with
  ``a`` a positive and ``b`` a negative score, computed as the Mann-Whitney statistic
  ``U = R_pos - n_pos (n_pos + 1) / 2`` over ``n_pos n_neg``, where ``R_pos`` is the sum of the
  positives' average ranks in the pooled sample (``O(n log n)``).
* :func:`spearman`: ``rho = pearson(rank(x), rank(y))`` with average ranks for ties; NaN if either rank
  vector is constant. Without ties this equals ``1 - 6 sum_i d_i^2 / (n (n^2 - 1))``,
  ``d_i = rank(x_i) - rank(y_i)``.
* :func:`max_softmax_probability` (MSP): ``max_c softmax(z / T)_c`` per row, ``T > 0``.
* :func:`energy_score`: ``E(z; T) = T logsumexp(z / T) = T log sum_c exp(z_c / T)`` per row, the
  negative free energy of Liu et al. (2020), higher meaning more in-distribution. It satisfies
  ``E(T z; T) = T E(z; 1)`` and ``E(z + c; T) = E(z; T) + c``.

Average ranks (:func:`_ranks`) are 1-based: tied values all get the mean of the positions they occupy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "SWEEP_THRESHOLDS",
    "auroc",
    "effective_rank",
    "energy_score",
    "max_softmax_probability",
    "numerical_rank",
    "rank_sweep",
    "row_centred",
    "singular_values",
    "spearman",
]

SWEEP_THRESHOLDS = (1e-4, 1e-3, 1e-2, 1e-1)  # relative thresholds of :func:`rank_sweep`

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _as_float64(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a float64 tensor (tensors keep their device; lists and numpy arrays accepted)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double()
    try:
        return torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: read-only arrays are fine
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric (tensor, numpy array or sequence of numbers)") from exc


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based average ranks of the flattened ``x`` (float64): ties get the mean of their positions."""
    x = x.detach().double().reshape(-1)
    order = torch.argsort(x, stable=True)
    _, counts = torch.unique_consecutive(x[order], return_counts=True)
    ends = torch.cumsum(counts, 0)  # last 1-based position of each run of equal values
    mean_rank = (2 * ends - counts + 1).double() / 2  # (first + last) / 2, first = end - count + 1
    ranks = torch.empty_like(x)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of the 2-D matrix ``x`` in float64, descending."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"singular_values expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"singular_values expects a 2-D matrix, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"singular_values expects a non-empty matrix, got shape {tuple(x.shape)}")
    x = x.detach().double()
    _check_finite(x, "matrix")
    return torch.linalg.svdvals(x)


def _spectrum(s_or_x: torch.Tensor) -> torch.Tensor:
    """Singular values from either a 1-D tensor of them (validated) or a 2-D matrix."""
    if not isinstance(s_or_x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(s_or_x).__name__}")
    if s_or_x.ndim == 2:
        return singular_values(s_or_x)
    if s_or_x.ndim != 1:
        raise ValueError(
            f"expected a 1-D tensor of singular values or a 2-D matrix, got shape {tuple(s_or_x.shape)}")
    s = s_or_x.detach().double()
    if s.numel() == 0:
        raise ValueError("singular values must be non-empty")
    _check_finite(s, "singular values")
    if bool((s < 0).any()):
        raise ValueError("singular values must be non-negative")
    return s


def numerical_rank(s_or_x: torch.Tensor, rel_threshold: float = 1e-3) -> int:
    """Number of singular values strictly greater than ``rel_threshold * s_max`` (0 for the zero matrix)."""
    if isinstance(rel_threshold, bool) or not isinstance(rel_threshold, numbers.Real):
        raise ValueError(f"rel_threshold must be a real number in (0, 1), got {rel_threshold!r}")
    if not 0.0 < float(rel_threshold) < 1.0:
        raise ValueError(f"rel_threshold must be in (0, 1), got {rel_threshold!r}")
    s = _spectrum(s_or_x)
    s_max = float(s.max())
    if s_max == 0.0:
        return 0
    return int((s > float(rel_threshold) * s_max).sum())


def rank_sweep(s_or_x: torch.Tensor, thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> dict[float, int]:
    """``{tau: numerical_rank(s, tau)}`` for every relative threshold ``tau`` in ``thresholds``."""
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence) or not len(thresholds):
        raise ValueError(f"thresholds must be a non-empty sequence of numbers in (0, 1), got {thresholds!r}")
    s = _spectrum(s_or_x)  # one SVD for all thresholds
    return {float(t): numerical_rank(s, t) for t in thresholds}


def row_centred(z: torch.Tensor, columns: ArrayLike) -> torch.Tensor:
    """``Z[:, U] - mean_U(Z[:, U])`` per row, float64: the columns ``U = columns`` of the 2-D ``z``
    (distinct integer indices in ``[0, z.shape[1])``), each row minus its mean over them."""
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        raise ValueError(f"row_centred expects a 2-D torch.Tensor, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    cols = columns.detach().cpu() if isinstance(columns, torch.Tensor) else torch.as_tensor(np.asarray(columns))
    if cols.ndim != 1 or cols.numel() == 0 or cols.dtype.is_floating_point or cols.dtype == torch.bool:
        raise ValueError(f"columns must be a non-empty 1-D sequence of integer indices, got {columns!r}")
    cols = cols.long()
    if int(cols.min()) < 0 or int(cols.max()) >= z.shape[1]:
        raise ValueError(f"columns must lie in [0, {z.shape[1]}), got {int(cols.min())} .. {int(cols.max())}")
    if torch.unique(cols).numel() != cols.numel():
        raise ValueError("columns must not repeat")
    zu = z.detach().double()[:, cols.to(z.device)]
    _check_finite(zu, "matrix")
    return zu - zu.mean(dim=1, keepdim=True)


def effective_rank(s_or_x: torch.Tensor) -> float:
    """Entropy effective rank ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum_j s_j`` (0.0 for the zero matrix)."""
    s = _spectrum(s_or_x)
    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    p = s / total
    entropy = -torch.special.xlogy(p, p).sum()  # xlogy(0, 0) = 0
    return math.exp(float(entropy))


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve, ``P(pos > neg) + P(pos = neg) / 2``, from average ranks (Mann-Whitney U)."""
    p = _as_float64(pos, "pos").reshape(-1)
    n = _as_float64(neg, "neg").reshape(-1)
    if p.numel() == 0 or n.numel() == 0:
        raise ValueError(f"auroc needs non-empty pos and neg, got {p.numel()} and {n.numel()} scores")
    _check_finite(p, "pos")
    _check_finite(n, "neg")
    n_pos, n_neg = p.numel(), n.numel()
    ranks = _ranks(torch.cat([p, n.to(p.device)]))
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either is constant.

    NaN inputs raise ``ValueError`` (their rank is undefined); +-inf are ordinary extreme values.
    """
    xt = _as_float64(x, "x").reshape(-1)
    yt = _as_float64(y, "y").reshape(-1)
    if xt.numel() != yt.numel():
        raise ValueError(f"spearman needs x and y of equal length, got {xt.numel()} and {yt.numel()}")
    if xt.numel() < 2:
        raise ValueError(f"spearman needs at least 2 points, got {xt.numel()}")
    if bool(torch.isnan(xt).any()) or bool(torch.isnan(yt).any()):
        raise ValueError("spearman inputs contain NaN")
    n = xt.numel()
    # Average ranks always have mean (n + 1) / 2 exactly; centring with it keeps the deviations exact.
    dx = _ranks(xt) - (n + 1) / 2
    dy = _ranks(yt).to(dx.device) - (n + 1) / 2
    sxx, syy, sxy = float((dx * dx).sum()), float((dy * dy).sum()), float((dx * dy).sum())
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def _scaled_logits(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., C] with C >= 1, got {tuple(logits.shape)}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    z = logits.detach().double()
    _check_finite(z, "logits")
    return z / t, t


def max_softmax_probability(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``max_c softmax(logits / T)_c`` in float64, shape ``logits.shape[:-1]``."""
    z, _ = _scaled_logits(logits, temperature)
    return torch.softmax(z, dim=-1).amax(dim=-1)


def energy_score(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``T * logsumexp(logits / T)`` in float64 (negative free energy; higher = more in-distribution)."""
    z, t = _scaled_logits(logits, temperature)
    return t * torch.logsumexp(z, dim=-1)
