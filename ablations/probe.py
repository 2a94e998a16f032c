"""Linear probes on frozen features: closed-form ridge regression onto one-hot class targets.

The softmax temperature study (:mod:`ablations.softmax`) uses it to test whether the representations
of a model trained at temperature ``T`` carry over to text it was not trained on: the features of each
layer on out-of-distribution text are frozen and a linear map is fitted from them to a label of
that text. Everything here is float64 (features of a float32 forward are cast on entry).

Given features ``X`` (``N x d``), integer labels ``y_n`` in ``[0, K)`` and a split point ``n_train``:

* **split**: rows ``[0, n_train)`` are the training half, ``[n_train, N)`` the test half. Within the
  training half the last ``val_fraction`` of the rows (at least one) are the *validation* part and
  the rows before them the *fitting* part. The ridge parameter is chosen on the validation part;
  the test half is used once, for the reported numbers. (The caller keeps rows in text order, so each
  part is a contiguous stretch of text.)
* **standardise**: ``X' = (X - mu) / sigma`` with the mean ``mu`` and standard deviation ``sigma``
  of each feature over the rows the probe is fitted on (``sigma = 0`` is taken as 1).
* **ridge**: with one-hot targets ``Y_nk = [y_n = k]`` (``N x K``) and ``P`` the class frequencies
  over the fitted rows,
  ``W = argmin_W ||X' W - (Y - 1 P^T)||_F^2 + lambda ||W||_F^2 = (X'^T X' + lambda I)^{-1} X'^T (Y - 1 P^T)``,
  ``lambda = alpha n_fit`` (``n_fit`` the number of fitted rows), computed from the eigendecomposition
  ``X'^T X' = V diag(e) V^T`` as ``W = V diag(1 / (e + lambda)) V^T X'^T (Y - 1 P^T)``, one
  decomposition for every ``alpha``. Predictions ``Y_hat = 1 P^T + X' W``; the predicted class is
  ``argmax_k Y_hat_nk`` over the classes that occur in the fitted rows (a class never seen there
  cannot be predicted, so its test rows count as errors).
* **selection**: ``alpha`` from :data:`ALPHAS` with the highest validation accuracy (ties: the larger
  ``alpha``); the probe is then refitted with that ``alpha`` on the whole training half (``mu``,
  ``sigma``, ``P`` recomputed there).
* **reported** on the test half: ``accuracy = mean_n [argmax_k Y_hat_nk = y_n]``, ``loss = mean_n
  sum_k (Y_nk - Y_hat_nk)^2`` (the squared error the ridge minimises, per row, over all ``K``
  columns) and ``chance``, the accuracy of always answering the training half's most frequent class.

:func:`char_class` maps bytes to five character classes (letter, digit, space, punctuation, other),
the coarse label of the study's second probe task.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # lambda / n_fit, on standardised features
CHAR_CLASSES = ("letter", "digit", "space", "punct", "other")


def _class_table() -> torch.Tensor:
    table = torch.full((256,), CHAR_CLASSES.index("other"), dtype=torch.long)
    for chars, name in ((string.ascii_letters, "letter"), (string.digits, "digit"),
                        (string.whitespace, "space"), (string.punctuation, "punct")):
        table[torch.tensor([ord(c) for c in chars])] = CHAR_CLASSES.index(name)
    return table


_TABLE = _class_table()


def char_class(b: torch.Tensor) -> torch.Tensor:
    """The class index (into :data:`CHAR_CLASSES`) of every byte of ``b`` (integers in [0, 256)): ASCII
    letters, digits, whitespace (space, tab, newline, CR, VT, FF), ASCII punctuation, and other
    (control bytes, bytes >= 0x80, the document separator)."""
    if not isinstance(b, torch.Tensor) or b.dtype.is_floating_point or b.dtype == torch.bool:
        raise ValueError("char_class expects an integer tensor of byte values")
    if b.numel() and (int(b.min()) < 0 or int(b.max()) > 255):
        raise ValueError(f"byte values must lie in [0, 256), got {int(b.min())} .. {int(b.max())}")
    return _TABLE[b.long().cpu()]


@dataclass(frozen=True)
class ProbeResult:
    """A probe's test-half numbers (module docstring) and what it was fitted on."""

    accuracy: float
    loss: float
    chance: float
    alpha: float  # chosen on the validation part
    n_fit: int  # rows of the fitting part (alpha selection)
    n_val: int
    n_test: int
    classes: int  # classes that occur in the training half


class _Ridge:
    """Standardisation, class frequencies and the eigendecomposition of one set of fitted rows."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int):
        self.mu = x.mean(0)
        sd = x.std(0, correction=0)
        self.sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        xs = (x - self.mu) / self.sd
        self.n = x.shape[0]
        counts = torch.bincount(y, minlength=k).double()
        self.p = counts / self.n
        self.seen = counts > 0
        self.e, self.v = torch.linalg.eigh(xs.T @ xs)
        self.e = self.e.clamp_min(0.0)  # rounding can leave tiny negative eigenvalues
        xty = torch.zeros(x.shape[1], k, dtype=torch.float64).index_add_(1, y, xs.T)
        self.g = self.v.T @ (xty - xs.sum(0)[:, None] * self.p[None, :])  # V^T X'^T (Y - 1 P^T)

    def predict(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        a = ((x - self.mu) / self.sd) @ self.v
        return self.p[None, :] + (a / (self.e + alpha * self.n)[None, :]) @ self.g

    def classes(self, yhat: torch.Tensor) -> torch.Tensor:
        return yhat.masked_fill(~self.seen[None, :], -math.inf).argmax(1)


def _check(features, labels, n_train, num_classes, alphas, val_fraction) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError("features must be a 2-D tensor [N, d]")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError("labels must be a 1-D integer tensor [N]")
    if labels.numel() != features.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but labels {labels.numel()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())} .. {int(labels.max())}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = features.shape[0]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 2 <= n_train <= n - 1:
        raise ValueError(f"n_train must be an integer in [2, N - 1] = [2, {n - 1}] (both halves non-empty, "
                         f"a fitting and a validation row), got {n_train!r}")
    if (isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or not alphas
            or any(not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0) for a in alphas)):
        raise ValueError(f"alphas must be a non-empty sequence of finite numbers > 0, got {alphas!r}")
    x = features.detach().cpu().double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain non-finite values (NaN or inf)")
    return x, labels.detach().cpu().long()


def ridge_probe(features: torch.Tensor, labels: torch.Tensor, n_train: int, num_classes: int, *,
                alphas: Sequence[float] = ALPHAS, val_fraction: float = 0.25) -> ProbeResult:
    """Fit a ridge probe on rows ``[0, n_train)`` (``alpha`` chosen on their last ``val_fraction``),
    test it on rows ``[n_train, N)`` (module docstring). ``labels`` in ``[0, num_classes)``."""
    x, y = _check(features, labels, n_train, num_classes, alphas, val_fraction)
    n_val = min(n_train - 1, max(1, round(val_fraction * n_train)))
    n_fit = n_train - n_val
    fit = _Ridge(x[:n_fit], y[:n_fit], num_classes)
    acc = []
    for a in alphas:
        acc.append(float((fit.classes(fit.predict(x[n_fit:n_train], a)) == y[n_fit:n_train]).double().mean()))
    best = max(acc)
    alpha = max(a for a, s in zip(alphas, acc, strict=True) if s == best)
    full = _Ridge(x[:n_train], y[:n_train], num_classes)
    yhat = full.predict(x[n_train:], alpha)
    yt = y[n_train:]
    onehot = torch.zeros_like(yhat).scatter_(1, yt[:, None], 1.0)
    return ProbeResult(accuracy=float((full.classes(yhat) == yt).double().mean()),
                       loss=float((onehot - yhat).pow(2).sum(1).mean()),
                       chance=float((yt == int(full.p.argmax())).double().mean()),
                       alpha=float(alpha), n_fit=n_fit, n_val=n_val, n_test=int(yt.numel()),
                       classes=int(full.seen.sum()))


__all__ = ["ALPHAS", "CHAR_CLASSES", "ProbeResult", "char_class", "ridge_probe"]
