"""Triton kernels of the Mesa layer (DESIGN.md section 7).

Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter: set the environment
variable ``TRITON_INTERPRET=1`` before importing this package (triton decides at import time).
Importing works without triton installed; calling a kernel then raises ``ImportError``.

* :func:`mesa_chunk`: the Mesa layer forward (chunkwise prefill) with early-exit CG per chunk;
* :func:`mesa_step`: one decode step (state update, CG, output);
* :func:`chunk_states`: chunk-boundary states ``(H_c, G_c)`` of the chunkwise Mesa recurrence.
"""

from .chunk_state import chunk_states
from .mesa import DEFAULT_POLICY, MesaStats, mesa_chunk, mesa_step

__all__ = ["DEFAULT_POLICY", "MesaStats", "chunk_states", "mesa_chunk", "mesa_step"]
