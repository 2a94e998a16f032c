"""MesaProblem validation and dense materialisation."""

from __future__ import annotations

import pytest
import torch

from mesa_stability.solvers import MesaProblem, validate_inputs
from mesa_stability.stability.cases import random_problem


def _inputs(B=2, T=5, H=3, D=4, Dv=6):
    p = random_problem(B=B, T=T, H=H, D=D, Dv=Dv, seed=1)
    return dict(q=p.q, k=p.k, v=p.v, g=p.g, beta=p.beta, lam=p.lam)


def test_valid_problem_has_shapes():
    p = MesaProblem(**_inputs())
    assert (p.B, p.T, p.H, p.D, p.Dv) == (2, 5, 3, 4, 6)


def _poke(x, value):
    """A copy of x with its first element set to value."""
    x = x.clone()
    x.view(-1)[0] = value
    return x


BAD = [
    ("k", lambda a: a["k"][:, :4], "k"),
    ("v", lambda a: a["v"][:, :, :2], "v"),
    ("g", lambda a: a["g"][..., None], "g"),
    ("beta", lambda a: a["beta"][:1], "beta"),
    ("lam", lambda a: a["lam"][:, :2], "lam"),
    ("q", lambda a: _poke(a["q"], float("nan")), "q"),
    ("v", lambda a: a["v"].clone().fill_(float("inf")), "v"),
    ("lam", lambda a: _poke(a["lam"], 0.0), "lam"),
    ("lam", lambda a: -a["lam"], "lam"),
    ("g", lambda a: a["g"] + 0.5, "g"),
    ("beta", lambda a: a["beta"] + 1.0, "beta"),
    ("beta", lambda a: a["beta"] - 1.5, "beta"),
    ("q", lambda a: a["q"].to(torch.int64), "q"),
    ("k", lambda a: a["k"].to(torch.complex128), "k"),
    ("v", lambda a: a["v"].numpy(), "v"),
]


@pytest.mark.parametrize("field,mutate,named", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_validation_names_the_argument(field, mutate, named):
    args = _inputs()
    args[field] = mutate(args)
    with pytest.raises(ValueError) as err:
        MesaProblem(**args)
    assert str(err.value).split()[0] == named, str(err.value)


def test_q_with_other_head_dim_blames_k():
    args = _inputs()
    args["q"] = args["q"][..., :3]
    with pytest.raises(ValueError, match=r"^k has shape"):
        MesaProblem(**args)


def test_initial_state_validation():
    args = _inputs()
    B, H, D, Dv = 2, 3, 4, 6
    with pytest.raises(ValueError, match="initial_state"):
        MesaProblem(**args, initial_state=torch.zeros(B, H, D, D))
    with pytest.raises(ValueError, match=r"initial_state\[0\]"):
        MesaProblem(**args, initial_state=(torch.zeros(B, H, D, D + 1), torch.zeros(B, H, Dv, D)))
    with pytest.raises(ValueError, match=r"initial_state\[1\]"):
        MesaProblem(**args, initial_state=(torch.zeros(B, H, D, D), torch.zeros(B, H, D, D)))
    asym = torch.zeros(B, H, D, D, dtype=torch.float64)
    asym[..., 0, 1] = 1.0
    with pytest.raises(ValueError, match=r"symmetric"):
        MesaProblem(**args, initial_state=(asym, torch.zeros(B, H, Dv, D, dtype=torch.float64)))


def test_mixed_devices_rejected():
    args = _inputs()
    args["lam"] = args["lam"].to("meta")
    with pytest.raises(ValueError, match="different devices"):
        validate_inputs(**args)


def test_iter_states_matches_plain_recurrence_and_blocks():
    p = random_problem(B=2, T=23, H=2, D=5, Dv=3, seed=3, initial_state=True)
    Hs, Gs = (s.clone() for s in p.initial_state)
    ref_H, ref_G = [], []
    for t in range(p.T):
        gam = torch.exp(p.g[:, t])[..., None, None]
        b = p.beta[:, t][..., None, None]
        Hs = gam * Hs + b * p.k[:, t, :, :, None] * p.k[:, t, :, None, :]
        Gs = gam * Gs + b * p.v[:, t, :, :, None] * p.k[:, t, :, None, :]
        ref_H.append(Hs)
        ref_G.append(Gs)
    ref_H, ref_G = torch.stack(ref_H, 1), torch.stack(ref_G, 1)
    for block in (1, 4, 7, 64):
        got = list(p.iter_states(block=block))
        H_all = torch.cat([h for _, _, h, _ in got], 1)
        G_all = torch.cat([g for _, _, _, g in got], 1)
        assert torch.allclose(H_all, ref_H, rtol=1e-13, atol=1e-14)
        assert torch.allclose(G_all, ref_G, rtol=1e-13, atol=1e-14)
    part = list(p.iter_states(block=4, t0=9, t1=17))
    assert part[0][0] == 9 and part[-1][1] == 17
    assert torch.allclose(torch.cat([h for _, _, h, _ in part], 1), ref_H[:, 9:17], rtol=1e-13, atol=1e-14)
    assert torch.allclose(p.diag_H(), torch.diagonal(ref_H, dim1=-2, dim2=-1), rtol=1e-13, atol=1e-14)
    Hf, Gf = p.final_state()
    assert torch.allclose(Hf, ref_H[:, -1]) and torch.allclose(Gf, ref_G[:, -1])


def test_packed_sequences_validate_and_unpack():
    p = random_problem(B=1, T=30, H=2, D=4, Dv=3, seed=8)
    cu = torch.tensor([0, 7, 20, 30])
    packed = p.replace(cu_seqlens=cu)
    seqs = packed.sequences()
    assert [s.T for s in seqs] == [7, 13, 10]
    for bad, msg in ((torch.tensor([0, 7, 7, 30]), "increase strictly"), (torch.tensor([1, 30]), "from 0"),
                     (torch.tensor([0.0, 30.0]), "int32/int64"), (torch.tensor([[0, 30]]), "1-D")):
        with pytest.raises(ValueError, match=msg) as err:
            p.replace(cu_seqlens=bad)
        assert str(err.value).startswith("cu_seqlens")
    two = random_problem(B=2, T=30, H=2, D=4, seed=8)
    with pytest.raises(ValueError, match="B = 1"):
        two.replace(cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state\[0\].*\[N,H,D,D\]"):
        packed.replace(initial_state=(torch.zeros(1, 2, 4, 4, dtype=torch.float64),
                                      torch.zeros(1, 2, 3, 4, dtype=torch.float64)))
    # the dense states restart at every sequence start
    H_packed = torch.cat([h for _, _, h, _ in packed.iter_states(block=5)], 1)
    H_sep = torch.cat([torch.cat([h for _, _, h, _ in s.iter_states(block=5)], 1) for s in seqs], 1)
    assert torch.equal(H_packed, H_sep)
