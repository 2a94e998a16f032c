"""Interfaces of other libraries on top of the suite's ops (:mod:`mesa_stability.compat.fla`: the
flash-linear-attention Mesa op)."""
