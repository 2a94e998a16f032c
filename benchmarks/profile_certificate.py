"""Profile the accuracy certificate's cost on the GPU (torch.profiler): which kernels and host work it adds.

For each policy and setting, one forward of ``mesa_chunk`` with ``check=None`` and with
``check="warn"`` (inputs of ``bench_certificate.py``), profiled over 5 calls: the CUDA time of every
kernel per call, the wall time per call, and the registers / spills of the compiled CG and residual
kernels. Prints the tables and writes ``profile_certificate.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_certificate import SETTINGS, make_inputs  # noqa: E402
from mesa_stability.kernels import mesa as mesa_mod  # noqa: E402
from mesa_stability.kernels import mesa_chunk  # noqa: E402


def _kernel_times(prof, calls: int) -> list[tuple[str, float, int]]:
    """(name, CUDA microseconds per call, launches per call) of the device kernels, largest first."""
    from torch.autograd import DeviceType

    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        t = getattr(ev, "self_cuda_time_total", 0) if t is None else t
        if ev.device_type == DeviceType.CUDA and t > 0:
            rows.append((ev.key[:60], t / calls, ev.count // calls))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 2048, 16, 128])
    ap.add_argument("--policies", nargs="+", default=["auto", "bf16-fp32state", "fp16-fp16state"])
    ap.add_argument("--lam-min", type=float, default=0.25)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_certificate needs a CUDA GPU")
    from torch.profiler import ProfilerActivity, profile

    B, T, H, D = args.shape
    q, k, v, g, beta, lam = make_inputs(B, T, H, D, lam_min=args.lam_min)
    lines = [f"{args}", f"{torch.cuda.get_device_name()} torch {torch.__version__}"]
    calls = 5
    for policy in args.policies:
        for setting, opts in SETTINGS.items():
            for check in (None, "warn"):
                def fn(policy=policy, check=check, opts=opts):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return mesa_chunk(q, k, v, g, beta, lam, policy=policy, check=check, validate=False, **opts)
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / 20 * 1e3
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        fn()
                    torch.cuda.synchronize()
                kt = _kernel_times(prof, calls)
                lines.append(f"\n== {policy} {setting} check={check}: wall {wall:.3f} ms/call, "
                             f"kernels {sum(r[1] for r in kt) / 1e3:.3f} ms/call")
                lines += [f"  {t:9.1f} us  x{n:<3d} {name}" for name, t, n in kt[:14]]
            for name, kern in sorted(mesa_mod.LAST_LAUNCH.items()):
                md = getattr(kern, "metadata", None)
                lines.append(f"  {name}: regs {getattr(kern, 'n_regs', '?')} spills {getattr(kern, 'n_spills', '?')} "
                             f"warps {getattr(md, 'num_warps', '?')}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_certificate.txt"), "w") as fh:
        fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
