"""The Mesa stability suite: numerical-stability verification, kernels and ablations for the Mesa layer.

One import namespace:

* :mod:`mesa_stability.solvers`: the problem, the reference solvers, the precision policies, the
  solver spec (``SolverSpec``), the accuracy certificate;
* :mod:`mesa_stability.kernels`: the Triton kernels (``mesa_chunk``, ``mesa_step``, ``MesaLayer``);
* :mod:`mesa_stability.stability`: stress cases, references, metrics, the stability report, the
  regression guard, the production grid;
* :mod:`mesa_stability.ablations`: the ablation LM, its grid and the softmax temperature study;
* :mod:`mesa_stability.cli`: the ``mesa`` command (``python -m mesa_stability``), above the libraries,
  which never import it.

The mathematics is in docs/design.md.
"""

from .solvers import __version__

__all__ = ["__version__"]
