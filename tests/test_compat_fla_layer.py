"""fla's layer and model on the native op (mesa_stability.compat.fla): the one-token decode in fla's
layouts, the weight mapping between fla's MesaNet and MesaLayer (from_fla / to_fla), and the kernel
swap of use_mesa_kernels. On the CPU (torch backend), and on a GPU the swap inside fla's own layer
against fla's kernels and the float64 op (benchmarks/fla_model_gpu.py does the same for the whole
model, generation and training, and records it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mesa_stability.compat import fla as compat
from mesa_stability.kernels import MesaLayer
from mesa_stability.stability import cases
from mesa_stability.stability.metrics import rel_error

OPTS = dict(policy="fp64", backend="torch", check=None)


def test_decode_step_continues_the_prefill_in_fla_layouts():
    """Prefill T tokens with chunk_mesa_net (fla's layouts), then decode token T + 1 with
    mesa_net_decoding_one_step (fla's argument order: lamb before beta): o and the states equal those of
    one chunk_mesa_net call over T + 1 tokens."""
    p = cases.random_problem(B=2, T=9, H=2, D=8, Dv=8, seed=4)
    q, k, v, g, beta, lam = p.q, p.k, p.v, p.g, p.beta, p.lam
    o_all, hkk_all, hkv_all = compat.chunk_mesa_net(q, k, v, g, beta, lam, output_final_state=True,
                                                   max_CG_iteration=60, **OPTS)
    _, hkk, hkv = compat.chunk_mesa_net(q[:, :-1], k[:, :-1], v[:, :-1], g[:, :-1], beta[:, :-1], lam,
                                        output_final_state=True, max_CG_iteration=60, **OPTS)
    o1, hkk1, hkv1 = compat.mesa_net_decoding_one_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], lam, beta[:, -1],
                                                       hkk.float(), hkv.float(), 60, **OPTS)
    assert o1.dtype == q.dtype and hkv1.shape == hkv_all.shape
    assert rel_error(o1, o_all[:, -1]) <= 1e-5  # the states pass through float32 (fla's state dtype)
    assert rel_error(hkk1.double(), hkk_all.double()) <= 1e-6
    assert rel_error(hkv1.double(), hkv_all.double()) <= 1e-6
    with pytest.raises(ValueError, match="native op's value-state layout"):
        compat.mesa_net_decoding_one_step(q[:, -1], k[:, -1], v[:, -1, :, :4], g[:, -1], lam, beta[:, -1],
                                          hkk.float(), hkv[..., :4].transpose(-1, -2).float())
    with pytest.raises(ValueError, match="prev_h_kk is required"):
        compat.mesa_net_decoding_one_step(q[:, -1], k[:, -1], v[:, -1], g[:, -1], lam, beta[:, -1], None, hkv)


def _fla_like(output_gate: bool) -> MesaLayer:
    torch.manual_seed(0)
    return MesaLayer(32, 2, 16, output_gate=output_gate, gate_cap=None, qk_norm_eps=compat.L2NORM_EPS, **OPTS)


@pytest.mark.parametrize("output_gate", [False, True])
def test_weights_round_trip_through_fla_names(output_gate):
    """to_fla gives fla's parameter names and shapes (lambda_params flattened); state_dict_from_fla
    inverts it exactly, and the reloaded layer computes the same output."""
    lay = _fla_like(output_gate).double()
    sd = compat.to_fla(lay)
    want = set(compat.FLA_PARAMETERS) - (set() if output_gate else {"g_proj.weight"})
    assert set(sd) == want and sd["lambda_params"].shape == (32,)
    back = MesaLayer(32, 2, 16, output_gate=output_gate, gate_cap=None, qk_norm_eps=compat.L2NORM_EPS,
                     **OPTS).double()
    back.load_state_dict(compat.state_dict_from_fla(sd, 2), strict=True)
    u = torch.randn(2, 11, 32, dtype=torch.float64)
    assert torch.equal(back(u), lay(u))
    fla_layers = pytest.importorskip("fla.layers")  # the names of fla's own module, where installed
    ref = fla_layers.MesaNet(hidden_size=32, num_heads=2, head_dim=16, use_output_gate=output_gate)
    assert {n: t.shape for n, t in ref.state_dict().items()} == {n: t.shape for n, t in sd.items()}
    compat.to_fla(lay, target=ref.double())
    mine = compat.from_fla(ref, **OPTS)
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), back.state_dict().values(), strict=True))


def test_fla_gate_is_the_uncapped_gate():
    """gate_cap=None is gamma = sigmoid(W_a u): the same layer as a cap of 1 (log1p(0) = 0), and
    another function than the default cap; qk_norm_eps -> 0 is F.normalize."""
    torch.manual_seed(1)
    lay = MesaLayer(16, 2, gate_cap=None, **OPTS).double()
    u = torch.randn(1, 12, 16, dtype=torch.float64) * 3
    y = lay(u)
    lay.gate_cap = 1.0
    assert rel_error(lay(u), y) <= 1e-14
    lay.gate_cap = 0.9975
    assert rel_error(lay(u), y) > 1e-6
    lay.gate_cap, lay.qk_norm_eps = None, 1e-300
    assert rel_error(lay(u), y) <= 1e-13


def test_mapping_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="gate_cap=None"):
        compat.to_fla(MesaLayer(16, 2))
    sd = compat.to_fla(_fla_like(False))
    with pytest.raises(ValueError, match=r"lack \['o_proj.weight'\]"):
        compat.state_dict_from_fla({n: t for n, t in sd.items() if n != "o_proj.weight"}, 2)
    with pytest.raises(ValueError, match="q_conv1d.bias"):
        compat.state_dict_from_fla({**sd, "q_conv1d.bias": torch.zeros(32)}, 2)
    with pytest.raises(ValueError, match="gate_cap must be"):
        MesaLayer(16, 2, gate_cap=1.5)


# A stand-in with fla's layer structure: a class named MesaNet whose forward calls the module-level
# chunk_mesa_net / mesa_net_decoding_one_step with fla's keywords (fla.layers.mesa_net). Here those
# names are kernels that must not run once the swap is on.
class FlaKernelCalled(RuntimeError):
    pass


def chunk_mesa_net(**kwargs):
    raise FlaKernelCalled("chunk")


def mesa_net_decoding_one_step(**kwargs):
    raise FlaKernelCalled("decode")


class MesaNet(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail, self.max_cg_step_training = fail, 60

    def forward(self, q, k, v, g, beta, lamb, state=None):
        if self.fail:
            raise KeyError("inside the layer")
        if state is not None:
            return mesa_net_decoding_one_step(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb, prev_h_kk=state[0],
                                              prev_h_kv=state[1], max_CG_iteration=self.max_cg_step_training)
        return chunk_mesa_net(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb, output_final_state=True,
                              max_CG_iteration=self.max_cg_step_training, use_qk_l2norm_in_kernel=True)


def test_use_mesa_kernels_swaps_the_ops_of_fla_layers_only_during_their_calls():
    p = cases.random_problem(B=1, T=7, H=2, D=8, Dv=8, seed=2)
    args = (p.q, p.k, p.v, p.g, p.beta, p.lam)
    model = nn.Sequential(nn.Identity(), MesaNet())
    layer = model[1]
    with pytest.raises(FlaKernelCalled):
        layer(*args)
    compat.use_mesa_kernels(model, **OPTS)
    o, hkk, hkv = layer(*args)
    want = compat.chunk_mesa_net(*args, output_final_state=True, max_CG_iteration=60, use_qk_l2norm_in_kernel=True,
                                 **OPTS)
    assert torch.equal(o, want[0]) and torch.equal(hkv, want[2])
    o1, _, _ = layer(p.q[:, 0], p.k[:, 0], p.v[:, 0], p.g[:, 0], p.beta[:, 0], p.lam, (hkk, hkv))
    assert o1.shape == (1, 2, 8)
    assert chunk_mesa_net is globals()["chunk_mesa_net"]  # restored after the call
    with pytest.raises(FlaKernelCalled):
        chunk_mesa_net()
    broken = compat.use_mesa_kernels(MesaNet(fail=True), **OPTS)
    with pytest.raises(KeyError):
        broken(*args)
    assert globals()["mesa_net_decoding_one_step"] is mesa_net_decoding_one_step  # restored after an error
    compat.use_fla_kernels(model)
    with pytest.raises(FlaKernelCalled):
        layer(*args)
    with pytest.raises(ValueError, match="no fla MesaNet layer"):
        compat.use_mesa_kernels(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unknown solver option"):
        compat.use_mesa_kernels(model, stepz=3)


@pytest.mark.gpu
def test_fla_layer_on_our_kernels_on_a_gpu():
    """fla's MesaNet layer (bf16 activations) with its kernels and with ours, against the same layer
    whose op is the float64 solve (a prefill; generation is benchmarks/fla_model_gpu.py's). Ours is at
    least as close to the float64 layer as fla's (fla rounds q and k to fp16), and the
    swap leaves the parameters alone."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fla_layers = pytest.importorskip("fla.layers")
    torch.manual_seed(0)
    layer = fla_layers.MesaNet(hidden_size=256, num_heads=4, head_dim=64).cuda()
    before = {n: p.detach().clone() for n, p in layer.state_dict().items()}
    u = torch.randn(2, 512, 256, device="cuda")

    def run(**opts):
        if opts:
            compat.use_mesa_kernels(layer, **opts)
        try:
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                return layer(u)[0].float()
        finally:
            compat.use_fla_kernels(layer)

    theirs = run()
    ours = run(check=None)
    ref = run(policy="fp64", backend="torch", steps=200, tol=1e-12, check=None)
    err_ours, err_fla = rel_error(ours.double(), ref.double()), rel_error(theirs.double(), ref.double())
    assert err_ours <= max(err_fla, 1e-2), (err_ours, err_fla)
    assert all(torch.equal(before[n], p) for n, p in layer.state_dict().items())
