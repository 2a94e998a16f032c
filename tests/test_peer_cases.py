"""The peer's op-test cases in our generator (stability.peer_cases) and the peer's metric (stability.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_stability.kernels import mesa_chunk
from mesa_stability.stability.metrics import peer_close, rms_ratio
from mesa_stability.stability.peer_cases import PEER_CASES, QUANTITIES, make_peer_case, run_peer_case

SMALLEST = "chunk-B1-T63-H1-D64-gamma0.8-0.99"
MEDIUM = "chunk-B2-T500-H4-D60-gamma0.8-0.99"
SIG0, SIG1 = 0.5, 1 / (1 + math.exp(-1))  # sigmoid(0), sigmoid(1)


def test_registry_holds_the_published_cases():
    chunk = [(c.shape, c.gate_range) for c in PEER_CASES.values() if c.cu_seqlens is None]
    assert chunk == [((1, 63, 1, 64), (0.8, 0.99)), ((2, 500, 4, 60), (0.8, 0.99)), ((2, 1024, 8, 128), (0.8, 0.99)),
                     ((2, 1024, 8, 128), (0.01, 0.1)), ((2, 1024, 8, 128), (1.0, 1.0)), ((4, 2048, 8, 64), (0.8, 0.99))]
    for c in PEER_CASES.values():
        assert set(c.tolerances) == set(QUANTITIES)
        if c.cu_seqlens is None:
            assert c.cg_steps == c.shape[3]
            assert c.tolerances["o"] == 0.006 and c.tolerances["dlam"] == 0.015
            assert all(c.tolerances[q] == 0.008 for q in ("H_T", "G_T", "dq", "dk", "dv", "dbeta", "dg", "dH0", "dG0"))
        else:
            assert c.shape[0] == 1 and c.shape[1] == c.cu_seqlens[-1] and c.cg_steps == 30
    with pytest.raises(ValueError, match="unknown peer case"):
        make_peer_case("nope")


def _tensors(inp):
    return [inp.q, inp.k, inp.v, inp.g, inp.beta, inp.lam, *inp.initial_state, inp.dO, inp.dH_T, inp.dG_T]


def test_generator_is_seeded_private_and_reproducible():
    state = torch.get_rng_state()
    a, b, c = make_peer_case(MEDIUM, seed=3), make_peer_case(MEDIUM, seed=3), make_peer_case(MEDIUM, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b), strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(c), strict=True))


def test_inputs_follow_the_described_distributions():
    inp = make_peer_case(MEDIUM, seed=0)
    B, T, H, D = inp.case.shape
    f16, f32 = torch.float16, torch.float32
    assert [t.dtype for t in _tensors(inp)] == [f16, f16, f16, f32, f32, f32, f32, f32, f16, f32, f32]
    q, k, v = (t.double() for t in (inp.q, inp.k, inp.v))
    n = q.numel()
    for x in (q, v):  # U[0, 1) / 10: mean 0.05, variance 1/1200
        assert 0 <= float(x.min()) and float(x.max()) <= 0.1
        assert abs(float(x.mean()) - 0.05) < 5 * math.sqrt(1 / 1200 / n)
        assert abs(float(x.var()) - 1 / 1200) < 0.02 / 1200
    assert float(k.min()) >= 0 and float((k.norm(dim=-1) - 1).abs().max()) < 2e-3  # unit norm up to fp16 rounding
    gamma = torch.exp(inp.g.double())
    assert 0.8 - 1e-6 <= float(gamma.min()) and float(gamma.max()) <= 0.99 + 1e-6
    assert abs(float(gamma.mean()) - 0.895) < 0.005
    assert SIG0 <= float(inp.beta.min()) and float(inp.beta.max()) <= SIG1 + 1e-3
    assert 0.25 + 0.75 * SIG0 <= float(inp.lam.min()) and float(inp.lam.max()) <= 0.25 + 0.75 * SIG1 + 1e-3
    for t in (inp.beta, inp.lam):  # fp16 values, held in fp32
        assert torch.equal(t.to(f16).to(f32), t)
    H0, G0 = (s.double() for s in inp.initial_state)
    assert H0.shape == (B, H, D, D) and G0.shape == (B, H, D, D)
    assert torch.equal(H0, H0.transpose(-1, -2))
    ev = torch.linalg.eigvalsh(H0)  # rank one, PSD, trace ~ 1
    assert float(ev[..., :-1].abs().max()) < 1e-2 and float((ev[..., -1] - 1).abs().max()) < 1e-2
    for x in (G0, inp.dO.double(), inp.dH_T.double(), inp.dG_T.double()):  # U[0, 1)
        assert 0 <= float(x.min()) and float(x.max()) < 1 and abs(float(x.mean()) - 0.5) < 0.01
    assert inp.problem().T == T  # a valid MesaProblem
    assert float(make_peer_case("chunk-B2-T1024-H8-D128-gamma1-1").g.abs().max()) == 0.0  # gamma = 1: g = 0


def test_packed_cases():
    inp = make_peer_case("varlen-H4-D64-gamma0.01-0.1-N3", seed=0)
    assert inp.cu_seqlens.tolist() == [0, 256, 500, 1000]
    assert inp.initial_state[0].shape[0] == 3 and inp.dH_T.shape[0] == 3
    assert float(inp.q.min()) < 0 < float(inp.q.max())  # N(0, 1) / 10
    assert abs(float(inp.q.double().std()) - 0.1) < 0.005
    assert float(inp.dO.max()) < 0.1  # U[0, 1) / 10
    assert inp.problem().sequences()[1].T == 244


def test_peer_metric():
    ref = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    x = ref + torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64)
    want = math.sqrt(0.02 / 3) / (math.sqrt(14 / 3) + 1e-8)
    assert rms_ratio(x, ref) == pytest.approx(want, rel=1e-14)
    assert peer_close(x, ref, 0.04) == (True, pytest.approx(want), pytest.approx(0.1))
    assert not peer_close(x, ref, 0.03)[0]
    assert peer_close(ref + 5e-7, ref, 0.0)[0]  # max |err| <= 1e-6 passes outright
    assert not peer_close(ref.new_tensor([float("nan"), 0, 0]), ref, 1.0)[0]
    assert rms_ratio(torch.zeros(3), torch.zeros(3)) == 0.0


def test_our_op_passes_the_smallest_case_in_fp32():
    rows = run_peer_case(mesa_chunk, SMALLEST, backend="torch", policy="fp32")
    assert [r["quantity"] for r in rows] == list(QUANTITIES)
    assert all(r["verdict"] == "pass" for r in rows), [(r["quantity"], r["measured"]) for r in rows]
    assert max(r["measured"] for r in rows if r["quantity"] in ("o", "H_T", "G_T")) < 1e-6


def test_a_perturbed_output_fails_the_o_check():
    def perturbed(*args, **kwargs):
        o, state = mesa_chunk(*args, **kwargs)
        return o * 1.01, state

    rows = {r["quantity"]: r for r in run_peer_case(perturbed, SMALLEST, backend="torch", policy="fp32")}
    assert rows["o"]["verdict"] == "FAIL" and rows["o"]["measured"] == pytest.approx(0.01, rel=1e-3)
    assert rows["H_T"]["verdict"] == "pass"


def test_a_crashing_op_fails_every_quantity():
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    rows = run_peer_case(broken, SMALLEST)
    assert all(r["verdict"] == "FAIL" and "boom" in r["note"] for r in rows)


def test_missing_initial_state_gradients_are_not_applicable():
    def detached_state(q, k, v, g, beta, lam, *, initial_state, **kwargs):
        return mesa_chunk(q, k, v, g, beta, lam, initial_state=tuple(s.detach() for s in initial_state), **kwargs)

    rows = {r["quantity"]: r for r in run_peer_case(detached_state, SMALLEST, backend="torch", policy="fp32")}
    assert rows["dH0"]["verdict"] == rows["dG0"]["verdict"] == "n/a"
    assert rows["dq"]["verdict"] == "pass"


STRONG = "chunk-B2-T1024-H8-D128-gamma0.01-0.1"


def test_the_guard_preset_judges_each_check_pass_flagged_limit_or_silent_fail():
    """check_cases: a wrong answer the op does not report is a silent FAIL; one it reports (a
    CertificateWarning) is flagged; the fast policies' dg under strong forgetting is a documented limit,
    and nothing else is."""
    from mesa_stability.solvers.certificate import CertificateWarning
    from mesa_stability.stability.peer_cases import check_cases, known_limit

    rows = check_cases(mesa_chunk, [SMALLEST], policy="fp32", progress=False, backend="torch")
    assert {r["guard_verdict"] for r in rows} == {"pass"} and all(r["flagged"] == 0 for r in rows)

    def wrong(*args, **kw):
        o, final = mesa_chunk(*args, **kw)
        return o * 1.05, final

    def wrong_and_warned(*args, **kw):
        import warnings

        warnings.warn("accuracy certificate of x: a test", CertificateWarning, stacklevel=2)
        return wrong(*args, **kw)

    o = {r["quantity"]: r for r in check_cases(wrong, [SMALLEST], policy="fp32", progress=False,
                                               backend="torch", check=None)}["o"]
    assert o["verdict"] == "FAIL" and o["guard_verdict"] == "FAIL"
    o = {r["quantity"]: r for r in check_cases(wrong_and_warned, [SMALLEST], policy="fp32", progress=False,
                                               backend="torch", check=None)}["o"]
    assert o["guard_verdict"] == "flagged" and o["flagged"] == 1
    assert known_limit("fp16-fp16state", STRONG, "dg") and known_limit("tf32", STRONG, "dg")
    for policy, name, q in (("auto", STRONG, "dg"), ("bf16x3", STRONG, "dg"), ("fp16-fp16state", SMALLEST, "dg"),
                            ("fp16-fp16state", STRONG, "o")):
        assert known_limit(policy, name, q) is None
    with pytest.raises(ValueError, match="unknown peer case"):
        check_cases(mesa_chunk, ["nope"], progress=False)


def test_mesa_guard_preset_peer(tmp_path, capsys):
    """``mesa guard --preset peer``: exit 0 when every check passes, with peer_cases.csv and guard.md;
    usage errors (a golden case name, a size flag the cases fix) exit 2."""
    import pandas as pd

    from mesa_stability.cli import main

    out = tmp_path / "peer"
    assert main(["guard", "--preset", "peer", "--cases", SMALLEST, "--policy", "fp32", "--device", "cpu",
                 "--option", "backend=torch", "--no-progress", "--out", str(out)]) == 0
    df = pd.read_csv(out / "peer_cases.csv")
    assert len(df) == len(QUANTITIES) and set(df.guard_verdict) == {"pass"} and "commit" in df
    assert "Provenance:" in (out / "guard.md").read_text()
    assert main(["guard", "--preset", "peer", "--cases", "well_conditioned"]) == 2
    assert main(["guard", "--preset", "peer", "--steps", "5"]) == 2
    assert "--preset peer" in capsys.readouterr().err
    assert main(["guard", "--cases", SMALLEST]) == 2  # not a golden case
