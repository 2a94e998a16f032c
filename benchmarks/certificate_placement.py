"""GPU benchmark: the launch shape of the accuracy certificate's kernel (``kernels.mesa.CERTIFY_*``).

For each policy and setting of ``bench_certificate.py`` (its inputs and shape), the median forward
time (``triton.testing.do_bench``) without the certificate, and with it at 4 or 8 warps and 16 or 32
columns of H_c on chip; also the registers and spills of the kernels that ran. Writes
``certificate_placement.csv`` (one row per measurement) and prints it.
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
from mesa_stability.kernels import mesa as km  # noqa: E402
from mesa_stability.kernels import mesa_chunk  # noqa: E402
from mesa_stability.stability.production import git_commit  # noqa: E402

VARIANTS = {"off": None, "w4_j32": (4, 32), "w8_j32": (8, 32), "w4_j16": (4, 16), "w8_j16": (8, 16)}


def main(argv=None) -> int:
    import pandas as pd
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 2048, 16, 128])
    ap.add_argument("--policies", nargs="+", default=["auto", "bf16x3", "bf16-fp32state", "fp16-fp16state"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("certificate_placement needs a CUDA GPU")
    inp = make_inputs(*args.shape)
    rows = []
    for pol in args.policies:
        for sname, sopts in SETTINGS.items():
            for vname, var in VARIANTS.items():
                if var is not None:
                    km.CERTIFY_WARPS, km.CERTIFY_BLOCK_J = var
                km.LAST_LAUNCH.clear()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with torch.no_grad():
                        ms = do_bench(lambda: mesa_chunk(*inp, policy=pol, validate=False,  # noqa: B023
                                                         check=None if var is None else "warn", **sopts),  # noqa: B023
                                      warmup=25, rep=200, return_mode="median")
                res = {n: f"{k.n_regs}/{k.n_spills}" for n, k in km.LAST_LAUNCH.items()}
                rows.append(dict(device=torch.cuda.get_device_name(), shape=str(tuple(args.shape)), policy=pol,
                                 setting=sname, variant=vname, fwd_ms=ms, regs_spills=str(res),
                                 commit=git_commit(), torch=torch.__version__,
                                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
                print(rows[-1], flush=True)
                pd.DataFrame(rows).to_csv(os.path.join(args.out, "certificate_placement.csv"), index=False)
    km.CERTIFY_WARPS, km.CERTIFY_BLOCK_J = 4, 32
    df = pd.DataFrame(rows)
    off = df[df.variant == "off"].set_index(["policy", "setting"]).fwd_ms
    df["cost"] = [r.fwd_ms / off[(r.policy, r.setting)] - 1 for r in df.itertuples()]
    print(df.pivot_table(index=["policy", "setting"], columns="variant", values="cost").round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
