"""GPU check of ``mesa_stability.compat.fla.use_mesa_kernels`` in flash-linear-attention's own model:
a small ``MesaNetForCausalLM`` (fla.models) run on fla's kernels and on ours, with the same weights.

1. **The op on the model's activations.** The inputs of every MesaNet layer's ``chunk_mesa_net`` call
   in a prefill (fla's kernels) are recorded; fla's op and ours are run on them and compared with the
   float64 exact solve (:func:`solvers.solve`, ``"exact"``, q and k L2-normalised in float64 as the
   layer asks): one row per layer, the relative error of o.
2. **Prefill.** The logits of the model on fla's kernels and on ours, each against the same model
   whose op is the float64 solve (``use_mesa_kernels(policy="fp64", backend="torch")``): relative
   errors over the whole window.
3. **Generation.** Greedy ``model.generate`` of ``--new-tokens`` bytes after a prompt (fla's cache, the
   one-token decode path) with each kernel: the tokens, and each step's logits against a prefill of
   the generated sequence with the float64 op.
4. **Training.** ``--train-steps`` AdamW steps from one initialisation on the same batches of the byte
   corpus (``ablations.data``, train split), bf16 autocast, once per kernel: loss, gradient norm,
   non-finite counts and step time per step.

Writes ``fla_model.csv`` (1-3, one row per measurement), ``fla_training.csv``, ``fla_training.png``
and ``env_fla_model.json`` to ``--out``.

    python benchmarks/fla_model_gpu.py --out $OUT [--train-steps 300]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mesa_stability import solvers  # noqa: E402
from mesa_stability.compat import fla as compat  # noqa: E402
from mesa_stability.solvers.certificate import CertificateWarning  # noqa: E402
from mesa_stability.stability.metrics import rel_error  # noqa: E402
from mesa_stability.stability.production import git_commit  # noqa: E402

REFERENCE = dict(policy="fp64", backend="torch", steps=200, tol=1e-12, check=None)


def make_model(T: int, seed: int = 0):
    from fla.models import MesaNetConfig, MesaNetForCausalLM

    torch.manual_seed(seed)
    cfg = MesaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, head_dim=64, vocab_size=256,
                        max_position_embeddings=max(T, 2048), fuse_cross_entropy=False, use_cache=True)
    return MesaNetForCausalLM(cfg).cuda()


def record_op_inputs(model, x):
    """The keyword arguments of every fla ``chunk_mesa_net`` call of one forward (fla's kernels)."""
    import fla.layers.mesa_net as layer_mod

    calls, real = [], layer_mod.chunk_mesa_net

    def recorder(**kw):
        calls.append({n: (t.detach().clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()})
        return real(**kw)

    layer_mod.chunk_mesa_net = recorder
    try:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(input_ids=x)
    finally:
        layer_mod.chunk_mesa_net = real
    return calls


def op_rows(calls, peer_op):
    rows = []
    for i, kw in enumerate(calls):
        q, k = kw["q"], kw["k"]
        if kw.get("use_qk_l2norm_in_kernel"):
            q64, k64 = compat.l2norm(q.double()), compat.l2norm(k.double())
        else:
            q64, k64 = q.double(), k.double()
        p = solvers.MesaProblem(q64, k64, kw["v"].double(), kw["g"].double(), kw["beta"].double(),
                                kw["lamb"].double())
        ref = solvers.solve(p, "exact").o
        args = dict(kw, output_final_state=False)
        for impl, fn in (("fla-core", peer_op), ("ours", compat.chunk_mesa_net)):
            o = fn(**args)[0]
            rows.append(dict(part="op", layer=i, impl=impl, rel_err=rel_error(o.double(), ref),
                             shape=str(tuple(q.shape)), dtype=str(q.dtype)))
    return rows


def logits(model, x):
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        return model(input_ids=x).logits.float()


def main(argv=None) -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this check needs a CUDA device (fla's kernels)")
    if min(args.T, args.batch, args.new_tokens, args.train_steps) < 1:
        ap.error("--T, --batch, --new-tokens and --train-steps must be positive")
    import fla
    import transformers
    import triton
    from fla.ops.mesa_net import chunk_mesa_net as peer_op

    from ablations.data import load_corpus

    os.makedirs(args.out, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               fla=fla.__version__, transformers=transformers.__version__, commit=git_commit(),
               python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC"), **vars(args))
    with open(os.path.join(args.out, "env_fla_model.json"), "w") as f:
        json.dump(env, f, indent=1)
    print(env, flush=True)
    data = load_corpus()["train"]
    gen = torch.Generator().manual_seed(0)

    def batch(B, T):
        s = torch.randint(0, data.numel() - T - 1, (B,), generator=gen)
        w = torch.stack([data[i:i + T + 1] for i in s.tolist()]).long().cuda()
        return w[:, :-1], w[:, 1:]

    model = make_model(args.T)
    rows = []
    x, _ = batch(args.batch, args.T)
    # 1. the op on the model's activations
    rows += op_rows(record_op_inputs(model, x), peer_op)
    # 2. prefill logits against the model with the float64 op
    ref_model = compat.use_mesa_kernels(copy.deepcopy(model), **REFERENCE)
    ref = logits(ref_model, x)
    ours_model = compat.use_mesa_kernels(copy.deepcopy(model))
    for impl, m in (("fla-core", model), ("ours", ours_model)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CertificateWarning)
            lg = logits(m, x)
        rows.append(dict(part="prefill", impl=impl, rel_err=rel_error(lg.double(), ref.double()),
                         max_abs_err=float((lg - ref).abs().max()), warnings=len(caught), shape=str(tuple(x.shape))))
    # 3. generation (the decode path) against a prefill of the generated tokens with the float64 op
    prompt = x[:2, :64]
    for impl, m in (("fla-core", model), ("ours", ours_model)):
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            out = m.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, use_cache=True)
        seq = out.sequences
        steps = torch.stack(out.scores, 1).float()  # [B, new, V]: the logits of each generated token
        full = logits(ref_model, seq)[:, prompt.shape[1] - 1:-1]
        rows.append(dict(part="generate", impl=impl, rel_err=rel_error(steps.double(), full.double()),
                         max_abs_err=float((steps - full).abs().max()), tokens=seq.shape[1] - prompt.shape[1],
                         agree_with_fla=None, shape=str(tuple(seq.shape))))
        rows[-1]["sequence"] = seq.cpu()
    a, b = rows[-2].pop("sequence"), rows[-1].pop("sequence")
    rows[-1]["agree_with_fla"] = float((a == b).float().mean())
    pd.DataFrame(rows).assign(**{k: env[k] for k in ("device", "commit", "fla", "torch", "triton")}).to_csv(
        os.path.join(args.out, "fla_model.csv"), index=False)
    print(pd.DataFrame(rows).to_string(), flush=True)
    # 4. training from one initialisation on the same batches
    init = copy.deepcopy(model.state_dict())
    batches = [batch(args.batch, args.T) for _ in range(args.train_steps)]
    train = []
    for impl in ("fla-core", "ours"):
        m = make_model(args.T)
        m.load_state_dict(init)
        if impl == "ours":
            compat.use_mesa_kernels(m)
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0)
        for step, (xb, yb) in enumerate(batches):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CertificateWarning)
                with torch.autocast("cuda", torch.bfloat16):
                    lg = m(input_ids=xb).logits
                loss = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), yb.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                bad_grads = sum(int((~torch.isfinite(p.grad)).sum()) for p in m.parameters() if p.grad is not None)
                if torch.isfinite(loss) and bad_grads == 0:
                    opt.step()
            torch.cuda.synchronize()
            train.append(dict(impl=impl, step=step, loss_bits_per_byte=float(loss) / math.log(2),
                              grad_norm=float(gn), nonfinite_grads=bad_grads,
                              nonfinite_loss=int(not torch.isfinite(loss)), certificate_warnings=len(caught),
                              ms=(time.perf_counter() - t0) * 1e3))
            if step % 50 == 0:
                print(train[-1], flush=True)
    df = pd.DataFrame(train).assign(device=env["device"], commit=env["commit"])
    df.to_csv(os.path.join(args.out, "fla_training.csv"), index=False)
    plot_training(df, os.path.join(args.out, "fla_training.png"), env)
    print(df.groupby("impl")[["loss_bits_per_byte", "grad_norm", "nonfinite_grads", "certificate_warnings",
                              "ms"]].agg(["first", "last", "sum", "median"]).to_string())
    return 0


def plot_training(df, path, env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl, sub in df.groupby("impl"):
        axes[0].plot(sub.step, sub.loss_bits_per_byte, label=impl, lw=1)
        axes[1].plot(sub.step, sub.grad_norm, label=impl, lw=1)
    axes[0].set(xlabel="step", ylabel="training loss (bits/byte)", title="Loss, same init and batches")
    axes[1].set(xlabel="step", ylabel="gradient norm (before clipping at 1)", title="Gradient norm", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"fla MesaNetForCausalLM (2 layers, 4 x 64 heads), fla's kernels vs ours - {env['device']}, "
                 f"commit {env['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
