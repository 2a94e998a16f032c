"""A drop-in for flash-linear-attention's Mesa op: :func:`chunk_mesa_net`, with fla's signature,
layouts and dtypes, computed by :func:`mesa_stability.kernels.mesa_chunk` (any backend, the
certificate included).

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
  k by ``sqrt(sum x^2 + 1e-6)`` first (fla's in-kernel L2 norm, computed here in float32); any field of
  :class:`~mesa_stability.solvers.spec.SolverSpec` may be passed as a keyword (``tol``, ``policy``,
  ``check``, ``backend``, ...), or a whole ``spec``. fla requires float32 initial states; so does this
  function, and a missing one of the two initial states is zero.

The differences of result (fla's kernels round q and k to fp16 and run a fixed step count; the
native op's default policy is certified) are measured in ``docs/peer-cases-gpu/``.
"""

from __future__ import annotations

import torch

from mesa_stability.kernels import mesa_chunk
from mesa_stability.solvers.spec import SolverSpec, solver_spec

L2NORM_EPS = 1e-6  # fla's in-kernel L2 norm: x / sqrt(sum x^2 + 1e-6) (fla.modules.norm.l2norm)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum x^2 + eps)`` over the last dimension, in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


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
        q, k = l2norm(q), l2norm(k)
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


__all__ = ["L2NORM_EPS", "chunk_mesa_net", "l2norm"]
