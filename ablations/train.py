"""Training and evaluation of one ablation model (docs/design.md section 8).

Training: AdamW (decoupled weight decay on matrices only), linear warm-up then cosine decay of the
learning rate to ``min_lr_ratio`` of its peak, gradient clipping by global norm, bf16 autocast on
CUDA, loss ``cross-entropy(softmax(logits / T))`` with the softmax temperature ``T`` of
:class:`TrainConfig` (1 except in the softmax temperature study, docs/design.md section 9), seeded data
stream (:class:`ablations.data.WindowSampler`: batch i depends only on the seed and i). A checkpoint
(model, optimiser, step, RNG-free data position, loss history) is written atomically every
``ckpt_every`` steps and at the end, so :func:`train` with the same ``ckpt_path`` continues an
interrupted run exactly where the last checkpoint left it (a checkpoint written with other training
settings is refused, not silently continued).

Under ``torchrun`` (:func:`init_distributed`) the model is wrapped in DistributedDataParallel: each
process draws ``batch_size / world`` windows from its own seeded stream, gradients are averaged,
the logged loss is the global batch's, and rank 0 writes the checkpoints.

A non-finite loss stops the run and is reported (``diverged``), never silently skipped: a solver
that blows up (Sherman-Morrison's decayed regulariser under forgetting) is a result.

Evaluation: bits per byte ``mean cross-entropy / ln 2`` over a fixed tiling of a split
(:func:`ablations.data.eval_windows`), the loss by position bucket (early vs late tokens of the
windows), and the mean / max CG steps of every Mesa layer, under any :class:`solvers.spec.SolverSpec`.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from mesa_stability.solvers.spec import SolverSpec
from mesa_stability.stability.results_store import atomic_write, sha256

from .data import WindowSampler, eval_windows
from .model import MesaLM, loss_per_token


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50
    temperature: float = 1.0  # softmax temperature T of the loss: cross-entropy of softmax(logits / T)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.clip > 0):
            raise ValueError("lr and clip must be > 0 and min_lr_ratio in [0, 1]")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job (``torchrun``), or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU) and
    return this process's device (cuda:LOCAL_RANK, or the CPU); else the default device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _optimizer(model: MesaLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


@dataclass
class TrainResult:
    steps_done: int
    losses: list = field(default_factory=list)  # training loss (nats / byte) per step
    diverged: bool = False
    wall_s: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: damaged, or written with other settings (named)."""


def checkpoint_spec(cfg: TrainConfig, model: MesaLM, task: dict | None = None) -> dict:
    """What a checkpoint was trained with, compared on resume: the training config (but
    ``ckpt_every``), the model size, its solver spec, its mixer (when not Mesa) and the task (when
    not the byte corpus: the recall study's)."""
    tc = {k: v for k, v in asdict(cfg).items() if k != "ckpt_every"}
    out = {"train_config": tc, "size": asdict(model.size), "solver": model.solver.to_dict()}
    if getattr(model, "mixer", "mesa") != "mesa":  # (absent from the checkpoints of Mesa models)
        out["mixer"] = model.mixer
    if getattr(model, "gate_init", None) is not None:
        out["gate_init"] = list(model.gate_init)
    if task is not None:
        out["task"] = task
    return out


def _save(path: str, payload: dict, spec: dict) -> None:
    """The checkpoint file: ``{"payload": bytes, "sha256": of them, "spec": ..., "spec_sha256": ...}``,
    written atomically (stability/results_store.py)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = buf.getvalue()
    out = io.BytesIO()
    torch.save({"payload": raw, "sha256": sha256(raw), "spec": spec,
                "spec_sha256": sha256(json.dumps(spec, sort_keys=True))}, out)
    atomic_write(path, out.getvalue())


def load_checkpoint(path: str, spec: dict, device) -> dict:
    """The payload of the checkpoint at ``path``, after its checks: readable, its content hash, and
    its spec equal to ``spec`` (else :class:`CheckpointError` naming the file and the differing
    fields)."""
    try:
        outer = torch.load(path, map_location="cpu", weights_only=False)
        raw = outer["payload"]
    except Exception as err:  # truncated, empty, not a checkpoint of this format
        raise CheckpointError(f"checkpoint {path} is damaged or not one of ours ({type(err).__name__}: "
                              f"{str(err)[:120]})") from err
    if sha256(raw) != outer.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match its SHA-256")
    stored = outer.get("spec", {})
    if sha256(json.dumps(stored, sort_keys=True)) != outer.get("spec_sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged: its settings do not match their SHA-256")
    if stored != spec:
        differ = []
        for part in ("train_config", "solver"):
            a, b = stored.get(part, {}), spec.get(part, {})
            differ += [f"{part}.{k}: {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (now)"
                       for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        for part in ("size", "mixer", "gate_init", "task"):
            if stored.get(part) != spec.get(part):
                differ.append(f"{part}: {stored.get(part)!r} (checkpoint) vs {spec.get(part)!r} (now)")
        raise CheckpointError(f"checkpoint {path} was trained with other settings ({'; '.join(differ)})")
    return torch.load(io.BytesIO(raw), map_location=device, weights_only=False)


def train(model: MesaLM, data: torch.Tensor | None, cfg: TrainConfig, *, ckpt_path: str | None = None,
          progress: bool = False, stop_after: int | None = None, on_step=None, retrain: bool = False,
          sampler=None, task: dict | None = None) -> TrainResult:
    """Train ``model`` on the byte tensor ``data`` with the model's current solver configuration.

    With ``ckpt_path`` an existing checkpoint is resumed (model, optimiser, step, history) and new
    ones are written every ``cfg.ckpt_every`` steps and at the end. A checkpoint carries the SHA-256
    of its content and of its settings (:func:`checkpoint_spec`); one that is damaged or from other
    settings raises :class:`CheckpointError` naming the file and the fields, or with ``retrain`` is
    replaced by a run from scratch. ``stop_after`` ends the call
    after that many steps of this call without a final checkpoint, as a killed run would (for tests
    of resuming). ``on_step(steps_done, loss)`` is called on rank 0 after every completed step (the
    softmax study measures the rank along training with it); it may run the model under
    ``torch.no_grad`` and must leave it as it found it.

    ``sampler(batch_size, seed)`` (default: windows of ``data``) makes each process's batch source,
    whose ``batch(step)`` returns ``(x, y)`` or ``(x, y, mask)``: the loss is then the mean over the
    positions where mask is true (the recall study scores the answers only); ``task`` (a dict) is
    part of the checkpoint's settings."""
    device = next(model.parameters()).device
    rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    res = TrainResult(0)
    spec = checkpoint_spec(cfg, model, task)
    if ckpt_path and os.path.exists(ckpt_path):
        try:
            ck = load_checkpoint(ckpt_path, spec, device)
        except CheckpointError as err:
            if not retrain:
                raise CheckpointError(f"{err}; pass --retrain to train this run from scratch") from None
            warnings.warn(f"{err}: training from scratch (--retrain)", RuntimeWarning, stacklevel=2)
            ck = None
    else:
        ck = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        res = TrainResult(ck["step"], ck["losses"], ck["diverged"], ck["wall_s"], ck["tokens"])
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    # each process draws its own share of the global batch (its own seeded stream)
    if sampler is None:
        src = WindowSampler(data, model.size.seq_len, cfg.batch_size // world, cfg.seed + 7919 * rank)
    else:
        src = sampler(cfg.batch_size // world, cfg.seed + 7919 * rank)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    autocast = device.type == "cuda"
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=res.steps_done, desc=f"train {model.solver.label}", leave=False,
                   disable=None)
    t0, done_here = time.perf_counter(), 0
    wall0 = res.wall_s

    def checkpoint():
        if ckpt_path and rank == 0:
            _save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": res.steps_done,
                              "losses": res.losses, "diverged": res.diverged, "wall_s": res.wall_s,
                              "tokens": res.tokens}, spec)
        if world > 1:
            torch.distributed.barrier()

    model.train()
    killed = False
    while res.steps_done < cfg.steps and not res.diverged:
        if stop_after is not None and done_here >= stop_after:
            killed = True
            break
        step = res.steps_done
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y, *mask = (t.to(device) for t in src.batch(step))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            lt = loss_per_token(net(x), y, cfg.temperature)
            loss = lt.mean() if not mask else (lt * mask[0]).sum() / mask[0].sum().clamp_min(1)
        # the global batch's loss (every process sees the same history and stops together)
        shown = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(shown)
            shown /= world
        if not torch.isfinite(shown):
            res.diverged = True
            res.losses.append(float("nan"))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        res.losses.append(float(shown))
        res.steps_done += 1
        res.tokens += x.numel() * world
        done_here += 1
        res.wall_s = wall0 + time.perf_counter() - t0
        if on_step is not None and rank == 0:
            on_step(res.steps_done, res.losses[-1])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{res.losses[-1]:.3f}")
        if res.steps_done % cfg.ckpt_every == 0:
            checkpoint()
    res.wall_s = wall0 + time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if not killed:
        checkpoint()
    return res


def solver_steps(model: MesaLM) -> tuple[float, int, int]:
    """``(sum, count, max)`` of the CG steps of the model's latest forward, over its Mesa layers' tokens
    and heads (``MesaLayer.last_steps``; layers without a count add nothing)."""
    total, n, top = 0.0, 0, 0
    for b in model.blocks:
        st = getattr(b.mixer, "last_steps", None)
        if st is not None:
            total += float(st.double().sum())
            n += st.numel()
            top = max(top, int(st.max()))
    return total, n, top


@torch.no_grad()
def evaluate(model: MesaLM, data: torch.Tensor, solver: SolverSpec, *, max_windows: int = 64,
             batch_size: int = 16, buckets: int = 4, temperature: float = 1.0) -> dict:
    """Bits per byte of ``data`` under ``solver`` (of the predictive distribution ``softmax(z / T)``,
    ``T = temperature``, the one the model was trained with), loss by position bucket, mean / max CG
    steps, tokens per second. The model's training solver is restored afterwards."""
    device = next(model.parameters()).device
    trained_with = model.solver
    model.set_solver(solver)
    model.eval()
    x_all, y_all = eval_windows(data, model.size.seq_len, max_windows)
    T = x_all.shape[1]
    sums = torch.zeros(T, dtype=torch.float64)
    steps_sum, steps_max, steps_n = 0.0, 0, 0
    t0 = time.perf_counter()
    try:
        for i in range(0, x_all.shape[0], batch_size):
            x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                lt = loss_per_token(model(x), y, temperature)
            sums += lt.double().sum(0).cpu()
            s, n, m = solver_steps(model)
            steps_sum, steps_n, steps_max = steps_sum + s, steps_n + n, max(steps_max, m)
    finally:
        model.set_solver(trained_with)
    wall = time.perf_counter() - t0
    per_pos = sums / x_all.shape[0]
    edges = torch.linspace(0, T, buckets + 1).long().tolist()
    out = {"bits_per_byte": float(per_pos.mean()) / math.log(2), "tokens_per_s": x_all.numel() / wall,
           "eval_wall_s": wall, "windows": int(x_all.shape[0]),
           "mean_steps": steps_sum / steps_n if steps_n else float("nan"),
           "max_steps": steps_max if steps_n else float("nan")}
    for j in range(buckets):
        out[f"bpb_pos{edges[j]}_{edges[j + 1]}"] = float(per_pos[edges[j]:edges[j + 1]].mean()) / math.log(2)
    return out
