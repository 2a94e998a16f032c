"""Multi-query associative recall (MQAR) over bytes: does the Mesa layer's solve help a model recall,
and how does recall move with the solver's quality at evaluation time?

**The task.** A sequence of ``seq_len + 1`` bytes (inputs are the first ``seq_len``, targets the
last ``seq_len``) holds, in this order:

    pairs:    a_1 b_1 v_1   a_2 b_2 v_2   ...   a_N b_N v_N      key (a_i, b_i): two bytes in [0, 64)
                                                                  value v_i: one byte in [64, 128)
    filler:   bytes drawn uniformly from [128, 256)
    queries:  a_j b_j v_j   for Q distinct pairs j, in random order

N keys are distinct within a sequence (4096 two-byte keys). The model is trained and scored only at
the query values: the target ``v_j`` after the model has read the query key ``a_j b_j``. Recall
accuracy is the fraction of those targets that are the model's argmax over all 256 bytes (chance:
1/64 for a model that has learned the value alphabet). The distance between a pair and its query
grows with the sequence length, since the queries come last; evaluating at 4x and 16x the training
length with 2x and 4x the pairs asks for longer and denser memory.

**Arms** (one backbone, :class:`ablations.model.MesaLM`, the mixer differs): the Mesa layer trained
with k CG steps (``mesa-k1`` ... ``mesa-k30``) or to a tolerance (``mesa-tol1e-4``, cap 30); gated
linear attention on the same states and gates (``gla``: :mod:`solvers.gla`, ``o_t = G_t q_t``);
causal softmax attention (``attention``: :mod:`ablations.attention`).

**Evaluation.** Every Mesa arm at every evaluation length under eval-time CG steps (0 ... 30; 0
from ``x0 = "q"`` reads out GLA's ``G_t q_t``, 0 from ``x0 = "zero"`` gives q* = 0), tolerances and
every precision policy (the torch backend emulates the 16-bit states at every length). At the arm's
own setting the per-layer, per-head diagnostics along positions (log-spaced buckets): the gate
gamma = exp(g), the condition bound ``kappa_t <= (max lam + b_t) / min lam`` with
``b_t = gamma_t b_{t-1} + beta_t ||k_t||^2`` (``tr H_t`` for unit keys, an upper bound of its largest
eigenvalue), and the CG steps taken.

**Files** (``out``): ``runs/<arm>_s<seed>.pt`` (checkpoints, resumed), ``evals/<arm>_s<seed>.csv``
and ``evals/<arm>_s<seed>_diag.csv`` (a finished run's rows: an interrupted study resumes after its
last finished run), then ``results.csv``, ``diagnostics.csv`` (every run's rows with provenance) and
the report (:mod:`ablations.recall_report`). ``--only-train`` / ``--seed`` split a study across
machines; ``merge`` joins the parts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from mesa_stability.solvers import MesaProblem
from mesa_stability.solvers.precision import POLICIES
from mesa_stability.solvers.spec import SolverSpec

from .model import MesaLM, ModelSize, loss_per_token
from .train import TrainConfig, solver_steps, train

KEY_SYMBOLS = 64  # each key byte in [0, 64): 64^2 = 4096 distinct two-byte keys
VALUE_BASE, VALUE_SYMBOLS = 64, 64  # value bytes in [64, 128)
NOISE_BASE = 128  # filler bytes in [128, 256)
EVAL_SEED = 104729  # the evaluation sequences' seed (the same sequences for every arm and seed)
# the Mesa and GLA arms' initial forget gates (kernels.MesaLayer gate_init): heads from gamma = 0.9 to
# 0.999, memory timescales of 10 to 1000 tokens. From PyTorch's default bias (gamma near 1/2) neither
# trained past the value-alphabet plateau (6 bits per answer) in 600 steps of T = 64, 4 pairs, on the
# CPU, where softmax attention reached 96% accuracy; from this init the Mesa arm (5 steps) reached 100%.
GATE_INIT = (0.9, 0.999)


class RecallError(ValueError):
    """A recall study that cannot run as asked (bad task, unknown arm or preset)."""


@dataclass(frozen=True)
class RecallTask:
    """``seq_len`` input bytes with ``pairs`` key-value pairs and ``queries`` queries (default: all)."""

    seq_len: int
    pairs: int
    queries: int | None = None

    def __post_init__(self) -> None:
        q = self.n_queries
        if self.pairs < 1 or not 1 <= q <= self.pairs:
            raise RecallError(f"need pairs >= 1 and 1 <= queries <= pairs, got pairs={self.pairs}, queries={q}")
        if self.pairs > KEY_SYMBOLS ** 2:
            raise RecallError(f"at most {KEY_SYMBOLS ** 2} distinct keys, got pairs={self.pairs}")
        if 3 * (self.pairs + q) > self.seq_len + 1:
            raise RecallError(f"{self.pairs} pairs and {q} queries need {3 * (self.pairs + q)} bytes, more than "
                              f"seq_len + 1 = {self.seq_len + 1}")

    @property
    def n_queries(self) -> int:
        return self.pairs if self.queries is None else self.queries

    def label(self) -> str:
        return f"T{self.seq_len}_N{self.pairs}_Q{self.n_queries}"


def make_batch(task: RecallTask, batch_size: int, generator: torch.Generator):
    """``(x, y, mask, pair_index)``: inputs and targets ``[B, seq_len]`` (int64), the query-value targets
    (bool) and, there, the index of the queried pair in the sequence (0 = the earliest, farthest pair;
    -1 elsewhere)."""
    B, N, Q, L = batch_size, task.pairs, task.n_queries, task.seq_len + 1
    keys = torch.argsort(torch.rand(B, KEY_SYMBOLS ** 2, generator=generator), dim=1)[:, :N]
    vals = torch.randint(VALUE_SYMBOLS, (B, N), generator=generator) + VALUE_BASE
    seq = torch.randint(NOISE_BASE, 256, (B, L), generator=generator)
    triple = torch.stack([keys // KEY_SYMBOLS, keys % KEY_SYMBOLS, vals], dim=2)  # [B, N, 3]
    seq[:, :3 * N] = triple.reshape(B, 3 * N)
    picked = torch.argsort(torch.rand(B, N, generator=generator), dim=1)[:, :Q]  # distinct pairs
    seq[:, L - 3 * Q:] = torch.gather(triple, 1, picked[:, :, None].expand(B, Q, 3)).reshape(B, 3 * Q)
    x, y = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros(B, L - 1, dtype=torch.bool)
    pair_index = torch.full((B, L - 1), -1, dtype=torch.int64)
    at = L - 3 * Q + 3 * torch.arange(Q) + 2 - 1  # the value of query j is y at this position
    mask[:, at] = True
    pair_index[:, at] = picked
    return x, y, mask, pair_index


class RecallSampler:
    """Training batches of a task: batch ``step`` is a function of (seed, step) alone (resumable)."""

    def __init__(self, task: RecallTask, batch_size: int, seed: int):
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def batch(self, step: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x, y, mask, _ = make_batch(self.task, self.batch_size, gen)
        return x, y, mask


# --- arms ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """A trained model: its mixer and (Mesa, GLA) its training solver."""

    name: str
    mixer: str = "mesa"
    solver: SolverSpec = field(default_factory=SolverSpec)

    @property
    def mesa(self) -> bool:
        return self.mixer == "mesa" and self.solver.method == "cg"


def arms(policy: str = "auto") -> dict[str, Arm]:
    """Every arm, the Mesa ones with the given training policy."""
    out = {f"mesa-k{k}": Arm(f"mesa-k{k}", solver=SolverSpec(steps=k, policy=policy)) for k in (1, 2, 5, 30)}
    out["mesa-tol1e-4"] = Arm("mesa-tol1e-4", solver=SolverSpec(steps=30, tol=1e-4, policy=policy))
    out["gla"] = Arm("gla", solver=SolverSpec(method="gla", policy=policy))
    out["attention"] = Arm("attention", mixer="attention")
    return out


@dataclass(frozen=True)
class Preset:
    name: str
    size: ModelSize
    train_task: RecallTask
    eval_tasks: tuple[RecallTask, ...]
    arms: tuple[str, ...]
    train: TrainConfig
    seeds: tuple[int, ...]
    eval_windows: int
    eval_steps: tuple[int, ...]
    eval_tols: tuple[float, ...]
    eval_policies: tuple[str, ...]
    policy: str = "auto"
    backend: str = "auto"
    gate_init: tuple[float, float] | None = GATE_INIT
    description: str = ""


ALL_ARMS = tuple(arms())
PRESETS = {
    "smoke": Preset(
        "smoke", ModelSize(d_model=32, n_layers=2, n_heads=2, seq_len=48), RecallTask(48, 4),
        (RecallTask(48, 4), RecallTask(96, 8)), ("mesa-k2", "gla", "attention"),
        TrainConfig(steps=6, batch_size=4, warmup=2, ckpt_every=3), (0,), 4, (0, 2), (1e-2,), ("fp32",),
        description="seconds: the code paths of the study (the tests)"),
    "cpu": Preset(
        "cpu", ModelSize(d_model=64, n_layers=2, n_heads=2, seq_len=64), RecallTask(64, 4),
        (RecallTask(64, 4), RecallTask(256, 8), RecallTask(1024, 16)),
        ("mesa-k1", "mesa-k5", "mesa-tol1e-4", "gla", "attention"),
        TrainConfig(steps=600, batch_size=32, lr=3e-3, warmup=50, ckpt_every=100), (0,), 64,
        (0, 1, 2, 5, 30), (1e-2, 1e-4), ("fp32", "bf16-bf16state"), policy="fp32",
        description="about 10 minutes on 2 CPU cores: every kind of arm at one seed, fp32 (auto's emulation "
                    "on the CPU is 10x slower), eval to 16x the training length"),
    "gpu": Preset(
        "gpu", ModelSize(d_model=256, n_layers=2, n_heads=4, seq_len=512), RecallTask(512, 32),
        (RecallTask(512, 32), RecallTask(2048, 64), RecallTask(8192, 128)), ALL_ARMS,
        TrainConfig(steps=3000, batch_size=64, lr=2e-3, warmup=200, ckpt_every=250), (0, 1, 2), 64,
        (0, 1, 2, 3, 5, 10, 20, 30), (1e-2, 1e-3, 1e-4, 1e-5, 1e-6), tuple(POLICIES),
        description="one GPU: every arm, 3 seeds, eval at 512 / 2048 / 8192 with 32 / 64 / 128 pairs"),
}


def eval_specs(arm: Arm, preset: Preset) -> list[tuple[str, SolverSpec]]:
    """``(label, spec)`` of every evaluation setting of an arm: its own first (label ``"trained"``);
    Mesa arms also under each eval-time step count (and 0 steps from x0 = q), tolerance and policy."""
    out = [("trained", arm.solver)]
    if not arm.mesa:
        return out
    base = arm.solver
    for k in preset.eval_steps:
        out.append((f"steps={k}", base.replace(steps=k, tol=None, x0="zero")))
    out.append(("steps=0,x0=q", base.replace(steps=0, tol=None, x0="q")))
    for tol in preset.eval_tols:
        out.append((f"tol={tol:g}", base.replace(steps=30, tol=tol, x0="zero")))
    for pol in preset.eval_policies:
        out.append((f"policy={pol}", base.replace(policy=pol)))
    return out


def build_model(arm: Arm, preset: Preset) -> MesaLM:
    return MesaLM(preset.size, solver=arm.solver, backend=preset.backend, mixer=arm.mixer,
                  gate_init=preset.gate_init if arm.mixer == "mesa" else None)


# --- evaluation ----------------------------------------------------------------------------------

def eval_batches(task: RecallTask, windows: int):
    """The evaluation sequences of a task (the same for every arm and seed)."""
    gen = torch.Generator().manual_seed(EVAL_SEED + task.seq_len * 7 + task.pairs)
    return make_batch(task, windows, gen)


@torch.no_grad()
def evaluate_recall(model: MesaLM, task: RecallTask, solver: SolverSpec | None, windows: int,
                    batch_size: int = 8, diagnostics: bool = False) -> tuple[dict, list[dict]]:
    """Recall accuracy and bits per answer byte of ``model`` on the task's evaluation sequences under
    ``solver`` (None: the model's own), accuracy by quarter of the pair order (q1: the earliest pairs,
    farthest from their queries), CG steps; with ``diagnostics`` also the per-layer, per-head rows of
    gamma, the condition bound and the CG steps along positions (module docstring)."""
    from mesa_stability.kernels.mesa import KERNEL_X0

    device = next(model.parameters()).device
    trained_with, backend = model.solver, model.backend
    if solver is not None:
        if solver.method == "cg" and solver.x0 not in KERNEL_X0:
            model.backend = "torch"  # an initial guess only the torch backend implements (x0 = q)
        model.set_solver(solver)
    model.eval()
    x_all, y_all, m_all, p_all = eval_batches(task, windows)
    hits, n, nats, steps_sum, steps_n, steps_max = 0, 0, 0.0, 0.0, 0, 0
    q_hits, q_n = torch.zeros(4), torch.zeros(4)
    diag = _Diagnostics(model, task.seq_len) if diagnostics else None
    t0 = time.perf_counter()
    try:
        for i in range(0, x_all.shape[0], batch_size):
            x, y, m, pidx = (t[i:i + batch_size] for t in (x_all, y_all, m_all, p_all))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x.to(device))
            lt = loss_per_token(logits, y.to(device)).cpu()
            pred = logits.argmax(-1).cpu()
            ok = (pred == y) & m
            hits += int(ok.sum())
            n += int(m.sum())
            nats += float(lt[m].double().sum())
            quarter = (pidx[m] * 4) // task.pairs
            q_hits += torch.bincount(quarter, weights=ok[m].float(), minlength=4)[:4]
            q_n += torch.bincount(quarter, minlength=4)[:4].float()
            s, c, top = solver_steps(model)
            steps_sum, steps_n, steps_max = steps_sum + s, steps_n + c, max(steps_max, top)
            if diag is not None:
                diag.collect()
    finally:
        if diag is not None:
            diag.remove()
        model.backend = backend
        model.set_solver(trained_with)
    row = {"accuracy": hits / n, "bits_per_answer": nats / n / math.log(2), "answers": n,
           "mean_steps": steps_sum / steps_n if steps_n else math.nan,
           "max_steps": steps_max if steps_n else math.nan, "eval_wall_s": time.perf_counter() - t0}
    for j in range(4):
        row[f"accuracy_q{j + 1}"] = float(q_hits[j] / q_n[j]) if q_n[j] else math.nan
    return row, (diag.rows() if diag is not None else [])


def position_buckets(T: int) -> list[tuple[int, int]]:
    """Log-spaced position buckets ``[0, 16), [16, 32), [32, 64), ...`` up to T."""
    edges = [0, 16]
    while edges[-1] < T:
        edges.append(min(2 * edges[-1], T))
    return list(zip(edges[:-1], edges[1:], strict=True))


class _Diagnostics:
    """Per Mesa layer: gamma, the condition bound and the CG steps along positions (module docstring),
    summed over the evaluation batches into :func:`position_buckets`."""

    def __init__(self, model: MesaLM, T: int):
        from mesa_stability.kernels.layer import MesaLayer

        self.layers = [(i, b.mixer) for i, b in enumerate(model.blocks) if isinstance(b.mixer, MesaLayer)]
        self.buckets = position_buckets(T)
        self.inputs: dict[int, torch.Tensor] = {}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.maxes: dict[tuple[int, str], torch.Tensor] = {}
        self.count = 0
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in self.layers]

    def _hook(self, i):
        def hook(module, args):
            self.inputs[i] = args[0].detach()
        return hook

    def collect(self) -> None:
        for i, layer in self.layers:
            u = self.inputs.pop(i)
            q, k, v, g, beta, _, _ = layer._inputs(u.float(), None)
            lam = layer.lam.float()
            trace = MesaProblem(q, k, v, g, beta, lam).trace_H(torch.float32)  # b_t = tr H_t, [B, T, H]
            gam = g.float().exp()
            kappa = (lam.amax(-1) + trace) / lam.amin(-1)
            st = layer.last_steps.float() if layer.last_steps is not None else torch.full_like(gam, math.nan)
            for name, val in (("gamma", gam), ("kappa_bound", kappa), ("steps", st.to(gam.device))):
                per = torch.stack([val[:, a:e].mean(dim=(0, 1)) for a, e in self.buckets]).cpu()  # [buckets, H]
                top = torch.stack([val[:, a:e].amax(dim=(0, 1)) for a, e in self.buckets]).cpu()
                key = (i, name)
                self.sums[key] = self.sums.get(key, 0) + per
                self.maxes[key] = torch.maximum(self.maxes[key], top) if key in self.maxes else top
        self.count += 1

    def rows(self) -> list[dict]:
        out = []
        for i, _ in self.layers:
            H = self.sums[(i, "gamma")].shape[1]
            for h in range(H):
                for j, (a, e) in enumerate(self.buckets):
                    row = {"layer": i, "head": h, "pos_lo": a, "pos_hi": e}
                    for name in ("gamma", "kappa_bound", "steps"):
                        row[f"{name}_mean"] = float(self.sums[(i, name)][j, h] / self.count)
                        row[f"{name}_max"] = float(self.maxes[(i, name)][j, h])
                    out.append(row)
        return out

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()


# --- the study -----------------------------------------------------------------------------------

def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def _versions(device: torch.device) -> dict:
    import platform

    from mesa_stability.stability.production import git_commit

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "commit": git_commit()}


def run_study(preset: Preset, out: str, *, arms_sel=None, seeds=None, only_train: bool = False,
              resume: bool = False, progress: bool = True, device: str | None = None, log=print) -> int:
    """Train (or resume) and evaluate every (arm, seed) of the preset; returns the number of runs done."""
    import pandas as pd

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = arms(preset.policy)
    names = list(arms_sel or preset.arms)
    unknown = [a for a in names if a not in table]
    if unknown:
        raise RecallError(f"unknown arm(s) {unknown}; arms: {sorted(table)}")
    seeds = list(preset.seeds if seeds is None else seeds)
    for sub in ("runs", "evals"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    ver = _versions(dev)
    todo = [(a, s) for a in names for s in seeds]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"recall {preset.name}", disable=None if progress else True)
    for arm_name, seed in todo:
        arm, name = table[arm_name], run_name(arm_name, seed)
        ev_path = os.path.join(out, "evals", f"{name}.csv")
        if resume and os.path.exists(ev_path) and not only_train:
            log(f"{name}: evaluated before, skipped (--resume)")
            bar.update(1)
            continue
        torch.manual_seed(seed)
        model = build_model(arm, preset).to(dev)
        cfg = TrainConfig(**{**asdict(preset.train), "seed": seed})
        res = train(model, None, cfg, ckpt_path=os.path.join(out, "runs", f"{name}.pt"), progress=progress,
                    sampler=lambda bs, sd: RecallSampler(preset.train_task, bs, sd),
                    task={"recall": preset.train_task.label(), "arm": arm_name})
        log(f"{name}: trained {res.steps_done} steps in {res.wall_s:.0f} s, final loss "
            f"{res.losses[-1] if res.losses else float('nan'):.3f} nats{' (diverged)' if res.diverged else ''}")
        if only_train:
            bar.update(1)
            continue
        rows, diag_rows = [], []
        for task in preset.eval_tasks:
            for label, spec in eval_specs(arm, preset):
                r, d = evaluate_recall(model, task, spec, preset.eval_windows, diagnostics=label == "trained"
                                       and arm.mixer == "mesa")
                common = {"preset": preset.name, "arm": arm_name, "seed": seed, "eval": label,
                          "eval_spec": spec.label if arm.mixer == "mesa" else "attention",
                          "T": task.seq_len, "pairs": task.pairs, "queries": task.n_queries,
                          "train_T": preset.train_task.seq_len, "train_pairs": preset.train_task.pairs,
                          "train_steps": res.steps_done, "diverged": res.diverged,
                          "final_train_loss": res.losses[-1] if res.losses else math.nan}
                rows.append({**common, **r, **ver})
                diag_rows += [{**common, **x, **ver} for x in d]
        pd.DataFrame(rows).to_csv(ev_path + ".tmp", index=False)
        pd.DataFrame(diag_rows).to_csv(os.path.join(out, "evals", f"{name}_diag.csv"), index=False)
        os.replace(ev_path + ".tmp", ev_path)  # the run counts as evaluated only once its rows are whole
        bar.update(1)
    bar.close()
    if not only_train:
        collect(out)
    return len(todo)


def collect(out: str) -> tuple[str, str]:
    """``results.csv`` and ``diagnostics.csv`` of ``out`` from its finished runs' rows."""
    import pandas as pd

    ev = os.path.join(out, "evals")
    files = sorted(f for f in os.listdir(ev) if f.endswith(".csv") and not f.endswith("_diag.csv"))
    if not files:
        raise RecallError(f"no evaluated runs in {ev}")
    res = pd.concat([pd.read_csv(os.path.join(ev, f)) for f in files], ignore_index=True)
    diags = [os.path.join(ev, f[:-4] + "_diag.csv") for f in files]
    frames = [pd.read_csv(p) for p in diags if os.path.exists(p) and os.path.getsize(p) > 1]
    diag = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    paths = os.path.join(out, "results.csv"), os.path.join(out, "diagnostics.csv")
    res.to_csv(paths[0], index=False)
    diag.to_csv(paths[1], index=False)
    return paths


def merge(parts: list[str], out: str) -> int:
    """Copy the finished runs' rows of several study folders into ``out`` (a run in two parts is an
    error) and collect them; returns the number of runs."""
    import shutil

    os.makedirs(os.path.join(out, "evals"), exist_ok=True)
    seen: dict[str, str] = {}
    for part in parts:
        ev = os.path.join(part, "evals")
        if not os.path.isdir(ev):
            raise RecallError(f"{part} has no evals/ folder: not a recall study output")
        for f in sorted(os.listdir(ev)):
            if not f.endswith(".csv"):
                continue
            if f in seen and seen[f] != part:
                raise RecallError(f"run {f} is in both {seen[f]} and {part}")
            seen[f] = part
            if os.path.abspath(part) != os.path.abspath(out):
                shutil.copy(os.path.join(ev, f), os.path.join(out, "evals", f))
    collect(out)
    return sum(1 for f in seen if not f.endswith("_diag.csv"))


__all__ = ["ALL_ARMS", "Arm", "PRESETS", "Preset", "RecallError", "RecallSampler", "RecallTask", "arms",
           "collect", "eval_specs", "evaluate_recall", "make_batch", "merge", "position_buckets", "run_study"]
