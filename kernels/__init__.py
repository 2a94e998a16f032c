"""Triton kernels of the Mesa layer (docs/design.md section 7).

Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter: set the environment
variable ``TRITON_INTERPRET=1`` before importing this package (triton decides at import time).
Importing works without triton installed; calling a kernel then raises ``ImportError``.

* :func:`mesa_chunk`: the Mesa layer forward (chunkwise prefill) with early-exit CG per chunk;
* :func:`mesa_step`: one decode step (state update, CG, output);
* :func:`chunk_states`: chunk-boundary states ``(H_c, G_c)`` of the chunkwise Mesa recurrence;
* :class:`MesaLayer`: the Mesa sequence mixer module (projections, conv, gates, norm, prefill and
  one-token decode with a :class:`MesaCache`).

``mesa_chunk`` is differentiable on both backends (``"triton"``, ``"torch"``) through the implicit
backward of :mod:`solvers.implicit`. On CUDA, the accuracy certificate's ``check="warn"`` verdicts are
read without a host sync (:mod:`solvers.verdict`): a warning comes at the latest when the call's
stats are read, at a later call, or at :func:`flush_checks`.
"""

from mesa_stability.solvers.precision import DEFAULT_POLICY
from mesa_stability.solvers.spec import SolverSpec
from mesa_stability.solvers.verdict import flush as flush_checks

from . import registered_op  # noqa: F401 - registers torch.ops.mesa_stability.mesa_triton (torch.compile)
from .chunk_state import chunk_states
from .layer import MesaCache, MesaLayer
from .mesa import MesaStats, mesa_chunk, mesa_step

__all__ = ["DEFAULT_POLICY", "MesaCache", "MesaLayer", "MesaStats", "SolverSpec", "chunk_states", "flush_checks",
           "mesa_chunk", "mesa_step"]
