"""Delivery of certificate verdicts (solvers/verdict.py): deferred on CUDA, in order, never lost.

The queue is exercised on the CPU with events that complete when the test says so; the GPU test
checks the real thing: a failing call returns without a host sync, and its warning (refined by the
float64 tier) comes when the stats are read, at the next call, or at ``flush_checks``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mesa_stability.kernels import flush_checks, mesa_chunk
from mesa_stability.kernels.mesa import _refiner
from mesa_stability.solvers import get_policy, verdict
from mesa_stability.solvers.certificate import Certificate, CertificateWarning
from mesa_stability.stability import cases


class _Event:
    def __init__(self):
        self.complete = False

    def query(self):
        return self.complete

    def synchronize(self):
        self.complete = True


def _pending(log, name, failed=True):
    p = verdict.Pending(torch.tensor(failed), _Event(), lambda: log.append(name))
    verdict._QUEUE.append(p)
    return p


def test_poll_reads_completed_verdicts_in_order_without_waiting():
    log = []
    a, b, c = (_pending(log, n) for n in "abc")
    c.event.complete = True
    verdict.poll()  # a is not ready: nothing after it is read either (stream order)
    assert log == []
    a.event.complete = True
    verdict.poll()
    assert log == ["a"]
    b.event.complete = True
    verdict.poll()
    assert log == ["a", "b", "c"] and verdict.pending() == 0


def test_wait_and_flush_read_what_is_pending_and_passing_verdicts_stay_quiet():
    log = []
    a, b = _pending(log, "a"), _pending(log, "b", failed=False)
    c = _pending(log, "c")
    verdict.wait([c])  # waits for c and reads every completed one before it
    assert "c" in log and "b" not in log
    verdict.flush()
    assert sorted(log) == ["a", "c"] and verdict.pending() == 0
    assert a.done and b.done


def _failing_certificate():
    bound = torch.tensor([[[1e-6], [0.5]]], dtype=torch.float64)
    return Certificate(bound, bound + 1, bound, torch.zeros_like(bound, dtype=torch.bool), 1e-3, 1)


def test_a_cpu_verdict_is_decided_at_once_and_names_the_call_site():
    with pytest.warns(CertificateWarning, match="worst token 1") as rec:
        assert verdict.submit(_failing_certificate(), "warn", get_policy("fp32")) is None
    assert rec[0].filename == __file__


def test_the_refinement_replaces_the_certificate_unless_the_inputs_changed():
    p = cases.make("well_conditioned", T=16, H=1, D=8)
    inputs = (p.q.float(), p.k.float(), p.v.float(), p.g.float(), p.beta.float(), p.lam.float(), None)
    x = torch.zeros(1, 16, 1, 8)
    refine = _refiner(inputs, x, get_policy("fp32"), 1e-3, torch.zeros(1, 16, 1, dtype=torch.bool))
    c = refine()
    assert c.tier == 2 and not c.ok  # x = 0 is far from the solution: the float64 residual says so
    stored = []
    with pytest.warns(CertificateWarning, match="tier 2"):
        verdict.submit(_failing_certificate(), "warn", get_policy("fp32"), refine=refine, store=stored.append)
    assert stored and stored[0].tier == 2
    inputs[0].add_(1.0)  # modified in place: tier 2 of the old inputs cannot be formed any more
    assert refine() is None


@pytest.mark.gpu
@pytest.mark.triton
def test_a_failing_gpu_call_warns_later_without_a_sync():
    p = cases.random_problem(1, 256, 2, 32, seed=0, gamma_range=(1.0, 1.0), beta_range=(1.0, 1.0),
                             lam_range=(0.25, 0.25), key_rank=2)
    inp = [t.cuda().float() for t in (p.q, p.k, p.v, p.g, p.beta, p.lam)]
    flush_checks()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, st = mesa_chunk(*inp, steps=30, policy="bf16-bf16state", return_stats=True)
        assert verdict.pending() == 1 and not w  # returned without reading the verdict
        c = st.certificate  # reading the stats waits for it
        assert verdict.pending() == 0 and c.tier == 2 and not c.ok
    assert [x.filename for x in w if issubclass(x.category, CertificateWarning)] == [__file__]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mesa_chunk(*inp, steps=30, policy="bf16-bf16state")
        torch.cuda.synchronize()
        mesa_chunk(*inp, steps=30, policy="fp32", check=None)  # the next call delivers it
        assert any(issubclass(x.category, CertificateWarning) for x in w)
