"""GPU check of torch.compile on the Triton backend: ``MesaLayer`` and the ablation LM (``MesaLM``)
compiled with ``fullgraph=True`` (inductor) run the kernels inside the registered operator
``torch.ops.mesa_stability.mesa_triton`` (:mod:`kernels.registered_op`) with no graph break.

For each model: the graph breaks counted by ``torch._dynamo.explain``, and the relative difference
of the compiled forward and of the parameter gradients from the eager model's (the same kernels:
differences come from inductor's fused elementwise code around the op), and the median time of
one eager and one compiled forward + backward (``triton.testing.do_bench``). Writes
``compile_gpu.csv`` and prints a log.

    python benchmarks/compile_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability.kernels import MesaLayer  # noqa: E402
from mesa_stability.solvers.spec import SolverSpec  # noqa: E402
from mesa_stability.stability.metrics import rel_error  # noqa: E402
from mesa_stability.stability.production import git_commit  # noqa: E402


def main(argv=None) -> int:
    import pandas as pd
    import triton
    from triton.testing import do_bench

    from mesa_stability.ablations.model import MesaLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this check needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    spec = SolverSpec(backend="triton", tol=1e-4)  # the certified default policy, certificate on
    models = {
        "MesaLayer(256, 4)": (MesaLayer(256, 4, solver=spec).cuda(), torch.randn(2, 1024, 256, device="cuda")),
        "MesaLM tiny": (MesaLM("tiny", spec).cuda(), torch.randint(0, 256, (2, 1024), device="cuda")),
    }
    rows = []
    for name, (model, x) in models.items():
        def loss_of(m, x=x):
            out = m(x)
            return out.float().square().mean()

        def grads(m, x=x, base=model):
            base.zero_grad(set_to_none=True)
            loss_of(m, x).backward()
            return {n: p.grad.detach().clone() for n, p in base.named_parameters()}

        eager_out = model(x).detach()
        eager_grads = grads(model)
        explain = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, fullgraph=True)
        comp_out = compiled(x).detach()
        comp_grads = grads(compiled)
        grad_err = max(rel_error(comp_grads[n].double(), eager_grads[n].double()) for n in eager_grads)
        t_eager = do_bench(lambda m=model: loss_of(m).backward(), warmup=10, rep=100, return_mode="median")
        t_comp = do_bench(lambda m=compiled: loss_of(m).backward(), warmup=10, rep=100, return_mode="median")
        rows.append(dict(model=name, shape=str(tuple(x.shape)), graph_breaks=explain.graph_break_count,
                         graphs=explain.graph_count, break_reasons="; ".join(str(r.reason) for r in
                                                                            explain.break_reasons)[:300],
                         fwd_rel_diff=rel_error(comp_out.double(), eager_out.double()), grad_rel_diff=grad_err,
                         eager_fwd_bwd_ms=t_eager, compiled_fwd_bwd_ms=t_comp, device=torch.cuda.get_device_name(),
                         torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                         commit=git_commit()))
        print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(os.path.join(args.out, "compile_gpu.csv"), index=False)
    print(pd.DataFrame(rows).drop(columns=["break_reasons"]).to_string())
    return 0 if all(r["graph_breaks"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
