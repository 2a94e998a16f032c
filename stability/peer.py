"""Adapter: the peer kernel ``fla.ops.mesa_net.chunk_mesa_net`` (PyPI ``fla-core``, optional) in the
call shape of :func:`kernels.mesa_chunk`, so that ``mesa guard --impl stability.peer:chunk_mesa_net``
and the property checks can run it.

Mapping (ours -> the peer's arguments):

* ``q, k, v, g, beta, lam`` -> the same tensors (the peer calls lam ``lamb``; it needs ``Dv = D``);
* ``steps`` -> ``max_CG_iteration`` (the peer always runs that many steps);
* ``initial_state = (H_0 [N,H,D,D], G_0 [N,H,Dv,D])`` -> ``h_kk_init = H_0`` and
  ``h_kv_init = G_0^T`` (the peer keeps the value state as ``[K, V]``, ours as ``[Dv, D]``), both
  float32; the final states come back the same way round;
* ``cu_seqlens`` -> ``cu_seqlens`` (int64);
* ``chunk_size`` is accepted and ignored (the peer's chunking is internal; the chunk-size property
  then compares identical runs);
* ``tol`` is not supported (the peer has no tolerance): ``NotImplementedError``, which the guard
  reports as "n/a"; any other option is an error.
"""

from __future__ import annotations

import torch


def chunk_mesa_net(q, k, v, g, beta, lam, *, steps: int = 30, tol: float | None = None, chunk_size: int | None = None,
                   initial_state=None, output_final_state: bool = False, cu_seqlens=None, **options):
    """``kernels.mesa_chunk``-shaped call of the peer's ``chunk_mesa_net``."""
    if tol is not None:
        raise NotImplementedError("the peer runs a fixed number of CG steps; it has no tolerance")
    if options:
        raise TypeError(f"the peer adapter takes no option(s) {sorted(options)}")
    try:
        from fla.ops.mesa_net import chunk_mesa_net as peer
    except ImportError as err:
        raise ImportError("the peer adapter needs fla-core (pip install fla-core einops) on a CUDA machine") from err
    if v.shape[-1] != k.shape[-1]:
        raise NotImplementedError(f"the peer needs Dv = D, got D = {k.shape[-1]}, Dv = {v.shape[-1]}")
    h_kk = h_kv = None
    if initial_state is not None:
        H0, G0 = initial_state
        h_kk = H0.to(torch.float32).contiguous()
        h_kv = G0.to(torch.float32).transpose(-1, -2).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64)
    o, (H_T, kv_T) = _split(peer(q, k, v, g, beta, lam, h_kk_init=h_kk, h_kv_init=h_kv,
                                 output_final_state=output_final_state, max_CG_iteration=steps, cu_seqlens=cu))
    if output_final_state:
        return o, (H_T, kv_T.transpose(-1, -2))
    return o


def _split(out):
    """(o, (kk, kv)) from the peer's return value. fla-core 0.6.0 returns the flat triple
    ``(o, kk, kv)`` (its docstring shows ``(o, (kk, kv))``); both, and a bare ``o``, are accepted."""
    if not isinstance(out, tuple):
        return out, (None, None)
    if len(out) == 3:
        return out[0], (out[1], out[2])
    states = out[1] if len(out) == 2 and isinstance(out[1], tuple) else (None, None)
    return out[0], states
