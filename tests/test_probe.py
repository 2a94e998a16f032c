"""Tests of :mod:`ablations.probe` (the ridge probes of the softmax study): against a numpy reference
of the same closed form (augmented least squares), on tasks whose answer is known (linearly separable
classes: near-perfect; labels independent of the features: chance), the validation-only choice of the
ridge parameter, and the character classes against Python's own character predicates."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch

from mesa_stability.ablations.probe import ALPHAS, CHAR_CLASSES, char_class, ridge_probe


def _reference(x, y, n_train, k, alpha):
    """The probe's closed form with numpy: standardise on the fitted rows, solve the ridge problem as
    the least-squares problem [X'; sqrt(lambda) I] W = [Y - P; 0], predict on the other rows."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    xf, yf, xt, yt = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    mu, sd = xf.mean(0), xf.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    xs, xts = (xf - mu) / sd, (xt - mu) / sd
    onehot = np.eye(k)[yf]
    p = onehot.mean(0)
    lam = alpha * n_train
    a = np.vstack([xs, math.sqrt(lam) * np.eye(x.shape[1])])
    b = np.vstack([onehot - p, np.zeros((x.shape[1], k))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    yhat = p + xts @ w
    seen = onehot.sum(0) > 0
    pred = np.where(seen[None, :], yhat, -np.inf).argmax(1)
    return float((pred == yt).mean()), float(((np.eye(k)[yt] - yhat) ** 2).sum(1).mean())


def _clusters(n, d, k, seed, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    means = 5 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=gen)
    return means[y] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64), y


def test_matches_the_numpy_closed_form_at_one_alpha():
    x, y = _clusters(600, 12, 4, seed=0, spread=3.0)  # overlapping: accuracy well below 1
    for alpha in (1e-3, 1.0, 30.0):
        r = ridge_probe(x, y, 400, 6, alphas=(alpha,))  # classes 4, 5 never occur
        val = r.n_val
        assert r.n_fit + val == 400 and r.n_test == 200 and r.classes == 4 and r.alpha == alpha
        acc, loss = _reference(x, y, 400, 6, alpha)
        assert r.accuracy == pytest.approx(acc, abs=1e-12)
        assert r.loss == pytest.approx(loss, rel=1e-9)


def test_alpha_is_chosen_on_the_validation_part_only():
    x, y = _clusters(800, 20, 5, seed=1, spread=4.0)
    r = ridge_probe(x, y, 500, 5)
    # the reference's validation accuracy for each alpha: fit on the fitting part, score the validation part
    n_fit = r.n_fit
    val = [_reference(x[:500], y[:500], n_fit, 5, a)[0] for a in ALPHAS]
    assert r.alpha == max(a for a, v in zip(ALPHAS, val, strict=True) if v == max(val))
    # the test half does not move the choice
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    y2 = torch.cat([y[:500], y[500:][perm]])
    assert ridge_probe(x, y2, 500, 5).alpha == r.alpha
    assert r.accuracy == pytest.approx(_reference(x, y, 500, 5, r.alpha)[0], abs=1e-12)


def test_linearly_separable_classes_are_found():
    x, y = _clusters(2000, 16, 5, seed=3)
    r = ridge_probe(x, y, 1000, 5)
    assert r.accuracy >= 0.99 and r.chance < 0.5
    # a half-space task: the label is the side of a hyperplane through the data's centre
    gen = torch.Generator().manual_seed(4)
    xg = torch.randn(4000, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(16, generator=gen, dtype=torch.float64)
    r = ridge_probe(xg, (xg @ w > 0).long(), 2000, 2)
    assert r.accuracy >= 0.95


@pytest.mark.parametrize("k", [2, 5])
def test_random_labels_give_chance(k):
    gen = torch.Generator().manual_seed(5 + k)
    n_test = 4000
    x = torch.randn(2 * n_test, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (2 * n_test,), generator=gen)
    r = ridge_probe(x, y, n_test, k)
    # the labels are independent of everything the probe saw: its test accuracy is Binomial(n, 1/k) / n
    p = 1 / k
    assert abs(r.accuracy - p) <= 4 * math.sqrt(p * (1 - p) / n_test)
    assert abs(r.chance - p) <= 4 * math.sqrt(p * (1 - p) / n_test)


def test_unseen_classes_and_chance():
    x = torch.arange(12, dtype=torch.float64)[:, None]
    y = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0, 3])  # classes 2, 3 only in the test half
    r = ridge_probe(x, y, 8, 4)
    # chance: the training half's majority class (0) answered on the test half, right once in 4
    assert r.classes == 2 and r.chance == pytest.approx(1 / 4)
    assert r.accuracy <= 1 / 4  # the rows of the classes 2 and 3, unseen in training, are errors


def test_char_classes_follow_pythons_predicates():
    b = torch.arange(256)
    got = char_class(b)
    for i in range(256):
        c = chr(i)
        want = ("letter" if c.isascii() and c.isalpha() else "digit" if c.isascii() and c.isdigit() else
                "space" if c in string.whitespace else "punct" if c.isascii() and not c.isalnum()
                and c.isprintable() and not c.isspace() else "other")
        assert CHAR_CLASSES[int(got[i])] == want, i


def test_errors():
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="n_train"):
        ridge_probe(x, y, 10, 2)
    with pytest.raises(ValueError, match="n_train"):
        ridge_probe(x, y, 1, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ridge_probe(x, y + 2, 5, 2)
    with pytest.raises(ValueError, match="rows"):
        ridge_probe(x, y[:9], 5, 2)
    with pytest.raises(ValueError, match="non-finite"):
        ridge_probe(x.index_fill(0, torch.tensor([3]), math.nan), y, 5, 2)
    with pytest.raises(ValueError, match="alphas"):
        ridge_probe(x, y, 5, 2, alphas=(0.0,))
    with pytest.raises(ValueError, match="num_classes"):
        ridge_probe(x, y, 5, 1)
    with pytest.raises(ValueError, match="integer"):
        char_class(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="256"):
        char_class(torch.tensor([256]))
