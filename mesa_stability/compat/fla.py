"""Drop-ins for flash-linear-attention (fla) users, on the native op:

* :func:`chunk_mesa_net` and :func:`mesa_net_decoding_one_step`: fla's ops (``fla.ops.mesa_net``) with
  fla's signatures, layouts and dtypes, computed by :func:`mesa_stability.kernels.mesa_chunk` /
  :func:`~mesa_stability.kernels.mesa_step` (any backend, the certificate included);
* :func:`use_mesa_kernels` (and :func:`use_fla_kernels`): an fla model (``MesaNetForCausalLM``, or any
  module holding ``fla.layers.MesaNet`` layers) runs on these ops, its parameters unchanged;
* :func:`from_fla` / :func:`to_fla`: fla MesaNet layer weights into a
  :class:`~mesa_stability.kernels.MesaLayer` that computes fla's layer (``gate_cap=None``: fla's
  uncapped gate; ``qk_norm_eps=1e-6``: fla's L2 norm), and back (:data:`FLA_PARAMETERS` maps the names).

fla-core's ``fla.ops.mesa_net.chunk_mesa_net`` and the native op compute the same layer,
``o_t = G_t (H_t + diag(lamb))^{-1} q_t``, with these differences of interface:

* **The value state.** fla's ``h_kv`` is ``[N, H, K, V]``, the sum of ``beta_t k_t v_t^T``; the
  native op's G is ``[N, H, V, K]``, the sum of ``beta_t v_t k_t^T``: the transpose. This function
  takes and returns fla's layout. A state in the native layout is rejected by its shape when
  V != K; when V == K the two layouts have the same shape and cannot be told apart, so pass
  ``h_kv_init`` exactly as fla returned it.
* **The return value.** fla always returns ``(o, h_kk_final, h_kv_final)``: o in v's dtype, the final
  states (float32) or None when ``output_final_state`` is False. The native op returns o in float32
  and the states only when asked.
* **Options.** ``max_CG_iteration`` is the spec's ``steps``; ``use_qk_l2norm_in_kernel`` divides q and
  k by ``sqrt(sum x^2 + 1e-6)`` first (fla's in-kernel L2 norm, computed and kept in float32); any field of
  :class:`~mesa_stability.solvers.spec.SolverSpec` may be passed as a keyword (``tol``, ``policy``,
  ``check``, ``backend``, ...), or a whole ``spec``. fla requires float32 initial states; so does this
  function, and a missing one of the two initial states is zero.

The differences of result (fla's kernels round q and k to fp16 and run a fixed step count; the
native op's default policy is certified) are measured in ``docs/peer-cases-gpu/``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from mesa_stability.kernels import MesaLayer, mesa_chunk, mesa_step
from mesa_stability.kernels.layer import CONV_SIZE, LAM_FLOOR, decodes
from mesa_stability.kernels.layer import l2norm as layer_l2norm
from mesa_stability.solvers.spec import SolverSpec, solver_spec

L2NORM_EPS = 1e-6  # fla's in-kernel L2 norm: x / sqrt(sum x^2 + 1e-6) (fla.modules.norm.l2norm)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """fla's L2 norm, ``x / sqrt(sum x^2 + eps)`` over the last dimension (:func:`kernels.layer.l2norm`:
    formed in float32 at least, returned in x's dtype)."""
    return layer_l2norm(x, eps)


def _check_state(name: str, s: torch.Tensor | None, shape: tuple, layout: str, native: tuple | None = None) -> None:
    """A float32 tensor of ``shape`` (fla's ``layout``), or None; ``native``: the shape of the native
    op's layout of the same state, named in the error when it is what was given."""
    if s is None:
        return
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(s).__name__}")
    if s.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (as in fla), got {s.dtype}")
    if tuple(s.shape) != shape:
        hint = ""
        if native is not None and tuple(s.shape) == native:
            hint = ": this is the native op's value-state layout [N, H, V, K]; fla's h_kv is its transpose"
        raise ValueError(f"{name} has shape {tuple(s.shape)}, expected {layout} = {list(shape)}{hint}")


def chunk_mesa_net(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   lamb: torch.Tensor, h_kk_init: torch.Tensor | None = None, h_kv_init: torch.Tensor | None = None,
                   output_final_state: bool = False, max_CG_iteration: int = 30, use_qk_l2norm_in_kernel: bool = False,
                   cu_seqlens: torch.Tensor | None = None, *, spec: SolverSpec | None = None, **options):
    """fla's ``chunk_mesa_net`` on the native op (module docstring): returns ``(o, h_kk_final, h_kv_final)``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g (log decay, <= 0), beta: ``[B, T, H]``;
            lamb: ``[H, K]``; h_kk_init ``[N, H, K, K]``, h_kv_init ``[N, H, K, V]`` (fla's layout,
            float32); cu_seqlens: ``[N + 1]`` for packed sequences (B = 1).
        max_CG_iteration: CG steps (the spec's ``steps``: a cap when ``tol`` is given).
        spec, options: the native op's :class:`SolverSpec` and its fields (default: ``SolverSpec()``,
            the certified ``auto`` policy with the certificate on).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a [B, T, H, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    N = q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    _check_state("h_kk_init", h_kk_init, (N, H, K, K), "[N, H, K, K]")
    _check_state("h_kv_init", h_kv_init, (N, H, K, V), "[N, H, K, V]", native=(N, H, V, K) if V != K else None)
    spec = solver_spec(spec, **{"steps": max_CG_iteration, **options})
    if use_qk_l2norm_in_kernel:
        # kept in float32 at least, as inside fla's kernel: rounding the unit vectors back to bf16 added
        # about 2e-3 relative error to o on fla's model activations (docs/fla-gpu)
        q, k = (l2norm(x.to(torch.promote_types(x.dtype, torch.float32))) for x in (q, k))
    init = None
    if h_kk_init is not None or h_kv_init is not None:
        ref = h_kk_init if h_kk_init is not None else h_kv_init
        H0 = h_kk_init if h_kk_init is not None else ref.new_zeros(N, H, K, K)
        G0 = h_kv_init.transpose(-1, -2) if h_kv_init is not None else ref.new_zeros(N, H, V, K)
        init = (H0, G0)
    out = mesa_chunk(q, k, v, g, beta, lamb, spec, initial_state=init, output_final_state=output_final_state,
                     cu_seqlens=cu_seqlens)
    if not output_final_state:
        return out.to(v.dtype), None, None
    o, (H_T, G_T) = out
    return o.to(v.dtype), H_T.float(), G_T.float().transpose(-1, -2)


def mesa_net_decoding_one_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               lamb: torch.Tensor, beta: torch.Tensor, prev_h_kk: torch.Tensor,
                               prev_h_kv: torch.Tensor, max_CG_iteration: int = 30, *, spec: SolverSpec | None = None,
                               **options):
    """fla's one-token decode (``fla.ops.mesa_net.mesa_net_decoding_one_step``, same argument order)
    on the native step: returns ``(o [B, H, V]`` in q's dtype, ``h_kk [B, H, K, K]``, ``h_kv [B, H, K,
    V]``) (float32; ``h_kv`` a transposed view of the native G).

    q, k are used as given (fla's layer L2-normalises them before this call); ``spec``, ``options``
    as in :func:`chunk_mesa_net`. The decode kernel (:func:`kernels.mesa_step`) runs where
    ``MesaLayer.step`` would run it (:func:`kernels.layer.decodes`: the Triton backend and its
    policies, no gradient wanted); otherwise :func:`kernels.mesa_chunk` on the one token."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a [B, H, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, H, K, V = *q.shape, v.shape[-1]
    for name, st, shape, layout in (("prev_h_kk", prev_h_kk, (B, H, K, K), "[B, H, K, K]"),
                                    ("prev_h_kv", prev_h_kv, (B, H, K, V), "[B, H, K, V]")):
        if st is None:
            raise ValueError(f"{name} is required (the state after the prefill)")
        _check_state(name, st, shape, layout, native=(B, H, V, K) if name == "prev_h_kv" and V != K else None)
    spec = solver_spec(spec, **{"steps": max_CG_iteration, **options})
    state = (prev_h_kk, prev_h_kv.transpose(-1, -2))
    if decodes(spec, q):
        o, (H_n, G_n) = mesa_step(q, k, v, g, beta, lamb, state, spec)
    else:
        o, (H_n, G_n) = mesa_chunk(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], lamb, spec,
                                   initial_state=state, output_final_state=True)
        o = o[:, 0]
    return o.to(q.dtype), H_n.float(), G_n.float().transpose(-1, -2)


# ---------------------------------------------------------------------------------------------------
# fla's layer (fla.layers.MesaNet) and MesaLayer
#
# fla's parameter -> MesaLayer's: the same projections, convolutions and norm under other names;
# lambda_params [H*K] is lam_theta [H, K] flattened (lam = 0.25 + softplus of it in both).
FLA_PARAMETERS = {
    "q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight",
    "a_proj.weight": "a_proj.weight", "a_proj.bias": "a_proj.bias",
    "b_proj.weight": "b_proj.weight", "b_proj.bias": "b_proj.bias",
    "q_conv1d.weight": "q_conv.weight", "k_conv1d.weight": "k_conv.weight",
    "lambda_params": "lam_theta", "o_norm.weight": "norm_weight",
    "g_proj.weight": "z_proj.weight", "o_proj.weight": "o_proj.weight",
}


def state_dict_from_fla(sd: dict, num_heads: int) -> dict:
    """fla ``MesaNet`` weights -> ``MesaLayer`` weights (:data:`FLA_PARAMETERS`); an unknown or
    missing parameter is a ValueError naming it (``g_proj.weight`` exists only with an output gate)."""
    unknown = sorted(set(sd) - set(FLA_PARAMETERS))
    if unknown:
        raise ValueError(f"not parameters of fla's MesaNet (with conv_bias=False): {unknown}")
    missing = sorted(set(FLA_PARAMETERS) - set(sd) - {"g_proj.weight"})
    if missing:
        raise ValueError(f"fla MesaNet weights lack {missing}")
    out = {FLA_PARAMETERS[n]: t for n, t in sd.items()}
    out["lam_theta"] = sd["lambda_params"].reshape(num_heads, -1)
    return out


def state_dict_to_fla(sd: dict) -> dict:
    """``MesaLayer`` weights -> fla ``MesaNet`` weights, the inverse of :func:`state_dict_from_fla`."""
    back = {native: name for name, native in FLA_PARAMETERS.items()}
    unknown = sorted(set(sd) - set(back))
    if unknown:
        raise ValueError(f"not parameters of MesaLayer: {unknown}")
    out = {back[n]: t for n, t in sd.items()}
    out["lambda_params"] = sd["lam_theta"].reshape(-1)
    return out


def from_fla(layer: nn.Module, *, spec: SolverSpec | None = None, **options) -> MesaLayer:
    """A :class:`~mesa_stability.kernels.MesaLayer` computing what fla's ``MesaNet`` layer computes,
    with its weights (copied, each in its own dtype, on its device): ``gate_cap=None`` (fla's gate,
    sigmoid(W_a u), uncapped), ``qk_norm_eps=1e-6`` (fla's L2 norm), fla's output gate and norm eps.
    ``spec`` / ``options`` give the solver (default ``SolverSpec()`` with fla's
    ``max_cg_step_training`` steps). fla options the layer does not have are a ValueError."""
    for attr, want in (("conv_size", CONV_SIZE), ("conv_bias", False), ("lambda_lower_bound", LAM_FLOOR)):
        got = getattr(layer, attr, None)
        if got != want:
            raise ValueError(f"fla MesaNet with {attr}={got!r}: MesaLayer has {attr}={want!r} only")
    H, D = layer.num_heads, layer.head_dim
    if getattr(layer, "head_v_dim", D) != D:
        raise ValueError(f"fla MesaNet with head_v_dim={layer.head_v_dim} != head_dim={D}")
    gate = bool(layer.use_output_gate)
    if gate and getattr(layer.o_norm, "activation", "swish") not in ("swish", "silu"):
        raise ValueError(f"fla MesaNet with an output-gate activation {layer.o_norm.activation!r}: MesaLayer's "
                         "gate is silu")
    options.setdefault("steps", layer.max_cg_step_training)
    weight = layer.q_proj.weight
    ours = MesaLayer(layer.hidden_size, H, D, output_gate=gate, norm_eps=layer.o_norm.eps, gate_cap=None,
                     qk_norm_eps=L2NORM_EPS, solver=spec, **options).to(weight.device)
    sd = {n: t.detach().clone() for n, t in layer.state_dict().items()}
    ours.load_state_dict(state_dict_from_fla(sd, H), strict=True, assign=True)
    return ours


def to_fla(layer: MesaLayer, target: nn.Module | None = None) -> dict:
    """fla ``MesaNet`` weights of a MesaLayer that computes fla's function (``gate_cap=None``,
    ``qk_norm_eps=1e-6``, value dim = head dim; else ValueError), loaded into ``target`` (strictly)
    when given."""
    if layer.gate_cap is not None or layer.qk_norm_eps != L2NORM_EPS or layer.value_dim != layer.head_dim:
        raise ValueError("only a MesaLayer with gate_cap=None, qk_norm_eps=1e-6 and value_dim == head_dim computes "
                         f"fla's layer; this one has gate_cap={layer.gate_cap}, qk_norm_eps={layer.qk_norm_eps}, "
                         f"value_dim={layer.value_dim}, head_dim={layer.head_dim}")
    sd = state_dict_to_fla({n: t.detach() for n, t in layer.state_dict().items()})
    if target is not None:
        target.load_state_dict(sd, strict=True)
    return sd


# ---------------------------------------------------------------------------------------------------
# Our kernels inside an fla model


def _fla_mesa_layers(model: nn.Module) -> list:
    """The modules of ``model`` that are fla's MesaNet layer: a class named MesaNet whose forward
    calls the module-level ``chunk_mesa_net`` and ``mesa_net_decoding_one_step`` (fla.layers.mesa_net)."""
    found = []
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        glob = getattr(fwd, "__globals__", {})
        if type(m).__name__ == "MesaNet" and "chunk_mesa_net" in glob and "mesa_net_decoding_one_step" in glob:
            found.append(m)
    return found


def use_mesa_kernels(model: nn.Module, *, spec: SolverSpec | None = None, **options) -> nn.Module:
    """Make every fla MesaNet layer of ``model`` (a ``MesaNetForCausalLM``, an ``fla.layers.MesaNet``,
    ...) run on the native op, with its parameters unchanged: during each such layer's forward, the
    names ``chunk_mesa_net`` and ``mesa_net_decoding_one_step`` of its module are this module's
    functions (with ``spec`` / ``options``; the layer's own step counts are kept unless ``steps`` is
    given). Returns ``model``; :func:`use_fla_kernels` undoes it. The names are swapped for the
    duration of a call, so do not run fla MesaNet layers of other models in other threads meanwhile."""
    layers = _fla_mesa_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no fla MesaNet layer (fla.layers.mesa_net.MesaNet)")
    solver_spec(spec, **options)  # an unknown option fails here, not at the first forward
    for m in layers:
        _swap_forward(m, spec, options)
    return model


def use_fla_kernels(model: nn.Module) -> nn.Module:
    """Undo :func:`use_mesa_kernels`: the fla MesaNet layers of ``model`` run fla's kernels again."""
    for m in _fla_mesa_layers(model):
        if getattr(m.__dict__.get("forward"), "mesa_kernels", None) is not None:
            del m.forward
    return model


def _swap_forward(m: nn.Module, spec, options) -> None:
    forward_cls = type(m).forward
    names = forward_cls.__globals__
    ours = {"chunk_mesa_net": functools.partial(chunk_mesa_net, spec=spec, **options),
            "mesa_net_decoding_one_step": functools.partial(mesa_net_decoding_one_step, spec=spec, **options)}

    def forward(*args, **kwargs):
        saved = {n: names[n] for n in ours}
        names.update(ours)
        try:
            return forward_cls(m, *args, **kwargs)
        finally:
            names.update(saved)

    forward.mesa_kernels = (spec, dict(options))
    m.forward = forward


__all__ = ["FLA_PARAMETERS", "L2NORM_EPS", "chunk_mesa_net", "from_fla", "l2norm", "mesa_net_decoding_one_step",
           "state_dict_from_fla", "state_dict_to_fla", "to_fla", "use_fla_kernels", "use_mesa_kernels"]
