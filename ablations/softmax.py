"""The softmax temperature study (docs/design.md section 9): rank deficit bias of byte-level Mesa LMs.

For every temperature ``T`` and seed the same model (size, solver, AdamW optimiser and schedule,
steps, the seed's data stream) is trained with the loss ``cross-entropy(softmax(z / T), y)``
(:class:`ablations.train.TrainConfig` ``temperature``), ``z = RMSNorm(h) E^T`` the logits of the
tied unembedding. Adam normalises gradient scale, so the ``1 / T`` factor of the gradient does not
change the step size: the runs differ in the geometry the loss asks for, not in their learning rate.
Each trained model is then measured (:func:`measure`):

* **bits per byte** ``mean(-log2 softmax(z / T)_y)`` on validation, test and out-of-distribution
  (sympy source) text: the model's own predictive distribution;
* **spectra** of two matrices computed in float64 from a float32 forward pass (no bf16 autocast:
  bf16 rounding, ``2^-8`` relative, would sit above the ``1e-3`` threshold and fake rank):
  ``Z = H_last E^T`` (``N x 256``, the logits) and ``H_last = RMSNorm(h)`` (``N x d_model``, the
  last hidden representations), one row per position of the first ``rank_windows`` validation
  windows. Numerical rank ``#{i : s_i > tau s_1}`` (``tau = rank_threshold``, default ``1e-3``) and
  entropy effective rank ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum_j s_j``
  (:mod:`ablations.spectra`). Both are invariant to scaling, so ``Z`` and ``Z / T`` have the same
  ranks. With tied embeddings ``rank(Z) <= rank(H_last) <= d_model``, so the comparison that
  measures a rank deficit is against ``T = 1`` and the byte classes that occur, not against 256;
* **out-of-distribution detection**: per-token scores of ``softmax(z / T)``, maximum softmax
  probability ``MSP = max_c softmax(z / T)_c`` and energy ``T logsumexp(z / T)`` (higher = in
  distribution), averaged per window; AUROC of test windows (positive) against sympy windows
  (negative), and the same per token;
* **final training loss**: the mean of the last 5% of the training losses (nats per byte of
  ``softmax(z / T)``), for the parity check ``|L_T - L_1| <= loss_band * L_1`` (:func:`parity`).

:func:`run_study` writes one row per (T, seed) to ``out/results.csv`` as soon as it is measured
(an interrupted study resumes: finished rows are kept, an unfinished training continues from its
checkpoint in ``out/ckpt``), the training curves to ``out/curves/T<T>_seed<s>.csv`` and the singular
values to ``out/spectra/T<T>_seed<s>.csv``; ``out/study.json`` records the settings, and a resumed or
merged study must have the same ones. :mod:`ablations.softmax_report` renders the report.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from mesa_stability.solvers.spec import SolverSpec
from mesa_stability.stability.provenance import provenance
from mesa_stability.stability.results_store import atomic_write, folder_lock, read_table, write_table

from . import spectra
from .data import eval_windows
from .grid import copy_part_files, earlier_checkpoints
from .model import SIZES, MesaLM
from .train import TrainConfig, evaluate, train

TEMPERATURES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LOSS_TAIL = 0.05  # final training loss: mean over the last 5% of the steps (one step is one noisy batch)
TRAJECTORY_POINTS = 12  # log-spaced steps at which the ranks are measured during training

PRESETS = {
    # 2 CPU cores, under 10 minutes: 7 temperatures x 2 seeds of the tiny model (d_model = 64, so
    # rank(Z) <= 64); CG to tolerance 1e-4 (docs/ablate-paper-gpu: as good as 30 steps, ~5 steps)
    "cpu": dict(size="tiny", seeds=(0, 1), train_steps=300, batch_size=16, lr=3e-3, warmup=30,
                max_bytes=2_000_000, eval_windows=32, rank_windows=32),
    # one GPU (or one per seed, merged): the small model (d_model = 256) with the training settings and
    # solver of the paper-gpu ablation (10 CG steps in bf16x3: as good as 30 there, 1.5 min per run on an H100)
    "gpu": dict(size="small", seeds=(0, 1), train_steps=2000, batch_size=32, lr=2e-3, warmup=200,
                solver=SolverSpec(method="cg", steps=10, policy="bf16x3"), eval_windows=128, rank_windows=16),
    # for tests: seconds on a CPU
    "smoke": dict(size="tiny", temperatures=(1.0, 10.0), seeds=(0,), train_steps=8, batch_size=4, warmup=2,
                  max_bytes=60_000, eval_windows=4, rank_windows=4, ckpt_every=4),
}


class StudyError(ValueError):
    """A bad study setting or output folder, with a message that says what to fix."""


@dataclass
class Study:
    """The settings of one softmax temperature study (every (T, seed) run shares all but T and seed)."""

    name: str = "custom"
    size: str = "tiny"
    temperatures: tuple = TEMPERATURES
    seeds: tuple = (0,)
    train_steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    max_bytes: int | None = None
    solver: SolverSpec = field(default_factory=lambda: SolverSpec(method="cg", steps=30, tol=1e-4, policy="fp32"))
    eval_windows: int = 64  # windows per split for bits per byte and for the OOD scores
    rank_windows: int = 32  # validation windows whose positions are the rows of Z and H_last
    rank_threshold: float = 1e-3  # tau of the numerical rank
    loss_band: float = 0.15  # parity: |L_T - L_1| <= loss_band * L_1
    ckpt_every: int = 100
    device: str | None = None  # default: cuda when available, else cpu
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise StudyError(f"unknown model size {self.size!r}; sizes: {sorted(SIZES)}")
        self.temperatures = tuple(float(t) for t in self.temperatures)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.temperatures or any(not (math.isfinite(t) and t > 0) for t in self.temperatures):
            raise StudyError(f"temperatures must be finite numbers > 0, got {self.temperatures}")
        if len(set(self.temperatures)) != len(self.temperatures) or len(set(self.seeds)) != len(self.seeds):
            raise StudyError("temperatures and seeds must not repeat")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise StudyError(f"seeds must be integers >= 0, got {self.seeds}")
        if not 0 < self.rank_threshold < 1:
            raise StudyError(f"rank_threshold must be in (0, 1), got {self.rank_threshold}")
        if not self.loss_band > 0:
            raise StudyError(f"loss_band must be > 0, got {self.loss_band}")
        if self.eval_windows < 2 or self.rank_windows < 1:
            raise StudyError("eval_windows must be >= 2 (an AUROC needs windows) and rank_windows >= 1")
        if isinstance(self.solver, dict):
            self.solver = SolverSpec.from_dict(self.solver)
        try:
            self.train_config(self.temperatures[0], self.seeds[0])
        except ValueError as err:
            raise StudyError(str(err)) from err

    def train_config(self, temperature: float, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.train_steps, batch_size=self.batch_size, lr=self.lr, warmup=self.warmup,
                           seed=seed, ckpt_every=self.ckpt_every, temperature=temperature)

    def settings(self) -> dict:
        """Everything that must agree between a study and its resumed or merged parts."""
        d = asdict(self)
        for k in ("name", "temperatures", "seeds", "ckpt_every", "device", "backend"):
            d.pop(k)
        d["solver"] = self.solver.to_dict()
        return d


def load_study(preset: str, **overrides) -> Study:
    """A preset with overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise StudyError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(kw) - {f.name for f in fields(Study)}
    if unknown:
        raise StudyError(f"unknown study setting(s) {sorted(unknown)}")
    return Study(name=preset, **kw)


def run_name(temperature: float, seed: int) -> str:
    """File stem of a (T, seed) run: ``T<T>_seed<s>`` (``T`` in ``%g``)."""
    return f"T{temperature:g}_seed{seed}"


@torch.no_grad()
def _forward_fp32(model: MesaLM, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Last hidden representations ``[n, L, d]`` in float32 (autocast off), in batches."""
    device = next(model.parameters()).device
    out = []
    with torch.autocast(device.type, enabled=False):
        for i in range(0, x.shape[0], batch_size):
            out.append(model.hidden(x[i:i + batch_size].to(device)).float())
    return torch.cat(out)


def _scores(model: MesaLM, data: torch.Tensor, windows: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token MSP and energy of ``softmax(z / T)`` on the first ``windows`` windows: ``[n, L]`` each."""
    x, _ = eval_windows(data, model.size.seq_len, windows)
    z = model.unembed(_forward_fp32(model, x)).cpu()
    return spectra.max_softmax_probability(z, temperature), spectra.energy_score(z, temperature)


def _held_out(model: MesaLM, corpus, study: Study) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank rows: the first ``rank_windows`` validation windows, inputs and targets."""
    return eval_windows(corpus["validation"], model.size.seq_len, study.rank_windows)


def rank_metrics(model: MesaLM, x: torch.Tensor, y: torch.Tensor, study: Study, temperature: float
                 ) -> tuple[dict, dict]:
    """Ranks of ``Z = H_last E^T`` and ``H_last`` on the rows ``x`` (float64 from a float32 forward),
    the cross-entropy of ``softmax(Z / T)`` on their targets ``y`` (nats per byte, ``rows_loss``) and
    the RMS of ``Z / T`` (the scale the softmax sees); also the singular values."""
    was_training = model.training
    model.eval()
    h = _forward_fp32(model, x).reshape(-1, model.size.d_model).cpu().double()
    model.train(was_training)
    z = h @ model.embed.weight.detach().cpu().double().t()  # Z = H_last E^T in float64
    sv = {"logits": spectra.singular_values(z), "hidden": spectra.singular_values(h)}
    zt = z / temperature
    loss = torch.nn.functional.cross_entropy(zt, y.reshape(-1).long())
    return {"rows_loss": float(loss),
            "logits_rank": spectra.numerical_rank(sv["logits"], study.rank_threshold),
            "logits_erank": spectra.effective_rank(sv["logits"]),
            "hidden_rank": spectra.numerical_rank(sv["hidden"], study.rank_threshold),
            "hidden_erank": spectra.effective_rank(sv["hidden"]),
            "logits_rms": float(zt.pow(2).mean().sqrt())}, sv


def measure(model: MesaLM, corpus, study: Study, temperature: float) -> tuple[dict, dict]:
    """The metrics of one trained model (module docstring) and its singular values
    ``{"logits": s(Z), "hidden": s(H_last)}``, float64."""
    row = {}
    for split in ("validation", "test", "ood"):
        row[f"bpb_{split}"] = evaluate(model, corpus[split], model.solver, max_windows=study.eval_windows,
                                       temperature=temperature)["bits_per_byte"]
    x, y = _held_out(model, corpus, study)
    ranks, sv = rank_metrics(model, x, y, study, temperature)
    row.update(rank_rows=x.numel(), rank_threshold=study.rank_threshold,
               byte_classes=int(torch.unique(y).numel()), **ranks)  # byte classes among the rows' targets
    msp_id, en_id = _scores(model, corpus["test"], study.eval_windows, temperature)
    msp_ood, en_ood = _scores(model, corpus["ood"], study.eval_windows, temperature)
    row.update(auroc_msp=spectra.auroc(msp_id.mean(1), msp_ood.mean(1)),
               auroc_energy=spectra.auroc(en_id.mean(1), en_ood.mean(1)),
               auroc_msp_token=spectra.auroc(msp_id, msp_ood), auroc_energy_token=spectra.auroc(en_id, en_ood),
               msp_id=float(msp_id.mean()), msp_ood=float(msp_ood.mean()))
    return row, sv


def snapshot_steps(steps: int, n: int = TRAJECTORY_POINTS) -> list[int]:
    """About ``n`` log-spaced steps in ``[1, steps]``, ``steps`` included: where the trajectory is measured."""
    return sorted({max(1, min(steps, round(steps ** (i / (n - 1))))) for i in range(n)} | {steps})


class Trajectory:
    """The ranks and held-out loss along one training run (:func:`rank_metrics` at
    :func:`snapshot_steps`), appended to a CSV as measured; a resumed run re-measures only the steps
    after its checkpoint (a step measured twice keeps the later row)."""

    def __init__(self, model: MesaLM, corpus, study: Study, temperature: float, path: str):
        self.model, self.study, self.temperature, self.path = model, study, temperature, path
        self.x, self.y = _held_out(model, corpus, study)
        self.at = set(snapshot_steps(study.train_steps))

    def __call__(self, step: int, loss: float) -> None:
        if step not in self.at:
            return
        import pandas as pd

        m, _ = rank_metrics(self.model, self.x, self.y, self.study, self.temperature)
        new = pd.DataFrame([{"step": step, "train_loss": loss, **m}])
        old = read_table(self.path)
        if len(old):
            new = pd.concat([old[old.step != step], new], ignore_index=True).sort_values("step")
        write_table(new, self.path)  # atomic: a kill inside the write keeps the earlier snapshots


def normalised_settings(stored: dict) -> dict:
    """Stored :meth:`Study.settings` in today's form: a solver written with fewer SolverSpec fields (an
    older study.json) gets their defaults."""
    out = dict(stored)
    if isinstance(out.get("solver"), dict):
        out["solver"] = SolverSpec.from_dict(out["solver"]).to_dict()
    return out


def _check_settings(out: str, study: Study) -> None:
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        try:
            with open(path) as fh:
                stored = json.load(fh)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StudyError(f"{path} is damaged ({type(err).__name__}: {err}); restore it, or remove the folder "
                             "and run the study again") from err
        stored = normalised_settings(stored)
        mine = json.loads(json.dumps(study.settings()))
        differ = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if differ:
            raise StudyError(f"{out} holds a study with other settings ({', '.join(differ)}): use another --out")


def _write_settings(out: str, name: str, settings: dict, temperatures, seeds) -> None:
    """``out/study.json``: the study's name, the temperatures and seeds it holds, its settings."""
    text = json.dumps({"name": name, "temperatures": sorted(temperatures), "seeds": sorted(seeds),
                       "settings": settings}, indent=1)
    atomic_write(os.path.join(out, "study.json"), text.encode())


def run_study(study: Study, out: str, *, resume: bool = False, progress: bool = True, log=print,
              retrain: bool = False):
    """Train and measure every (T, seed) of ``study`` not yet in ``out/results.csv``, holding the
    folder's writer lock (stability/results_store.py); returns the results DataFrame. ``retrain``:
    a damaged checkpoint, or one from other settings, is replaced by a run from scratch."""
    os.makedirs(out, exist_ok=True)
    with folder_lock(out, "mesa softmax"):
        return _run_study(study, out, resume, progress, log, retrain)


def _run_study(study: Study, out: str, resume, progress, log, retrain):
    import pandas as pd

    from .data import load_corpus

    csv = os.path.join(out, "results.csv")
    if not resume and (os.path.exists(csv) or earlier_checkpoints(out)):
        what = csv if os.path.exists(csv) else f"{os.path.join(out, 'ckpt')} (checkpoints of an interrupted study)"
        raise StudyError(f"{what} exists: pass --resume to continue that study, or choose another --out")
    _check_settings(out, study)
    done = read_table(csv, columns=["temperature", "seed"])
    _write_settings(out, study.name, study.settings(), set(done.temperature) | set(study.temperatures),
                    set(done.seed) | set(study.seeds))
    for d in ("ckpt", "curves", "spectra", "trajectory"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    have = {(float(t), int(s)) for t, s in zip(done.temperature, done.seed, strict=True)}
    pending = [(t, s) for s in study.seeds for t in study.temperatures if (t, s) not in have]
    device = torch.device(study.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = load_corpus(study.max_bytes)
    rows = done.to_dict("records")
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc=f"softmax study {study.name}", unit="run", disable=None)
    log(f"softmax study {study.name}: {len(pending)} of {len(pending) + len(have)} (T, seed) runs to do -> {out}")
    for t, s in pending:
        name = run_name(t, s)
        torch.manual_seed(s)
        model = MesaLM(study.size, study.solver, backend=study.backend).to(device)
        ck = os.path.join(out, "ckpt", name + ".pt")
        traj = Trajectory(model, corpus, study, t, os.path.join(out, "trajectory", name + ".csv"))
        res = train(model, corpus["train"], study.train_config(t, s), ckpt_path=ck, progress=progress, on_step=traj,
                    retrain=retrain)
        pd.DataFrame({"step": range(1, len(res.losses) + 1), "loss": res.losses}).to_csv(
            os.path.join(out, "curves", name + ".csv"), index=False)
        tail = res.losses[-max(1, math.ceil(LOSS_TAIL * len(res.losses))):] if res.losses else [float("nan")]
        row = {"study": study.name, "temperature": t, "seed": s, **provenance(str(device)),
               "corpus": corpus.provenance, "size": study.size,
               "solver": study.solver.label,
               "train_steps": study.train_steps, "steps_done": res.steps_done, "diverged": res.diverged,
               "final_train_loss": sum(tail) / len(tail), "train_wall_s": res.wall_s,
               "train_tokens_per_s": res.tokens_per_s}
        t0 = time.perf_counter()
        if not res.diverged:
            m, sv = measure(model, corpus, study, t)
            row.update(m)
            pd.concat([pd.DataFrame({"matrix": k, "index": range(1, v.numel() + 1), "singular_value": v.numpy()})
                       for k, v in sv.items()]).to_csv(os.path.join(out, "spectra", name + ".csv"), index=False)
        row["measure_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        write_table(pd.DataFrame(rows), csv)  # after every run, atomically: an interrupted study keeps it
        msg = (f"T={t:g} seed {s}: diverged at step {res.steps_done}" if res.diverged else
               f"T={t:g} seed {s}: loss {row['final_train_loss']:.3f}, validation {row['bpb_validation']:.3f} "
               f"bits/byte, rank logits {row['logits_rank']} hidden {row['hidden_rank']}, "
               f"AUROC msp {row['auroc_msp']:.3f}")
        if bar is not None:
            bar.update(1)
            bar.write(msg)
        else:
            log(msg)
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows)


def merge_studies(parts: list[str], out: str) -> int:
    """Merge study parts run separately (other seeds / temperatures, GPUs or sessions) into ``out``:
    their settings must agree; rows keyed by (T, seed), the first part's row kept; curves and spectra
    copied. Returns the number of rows."""
    import pandas as pd

    settings, frames, temps, seeds, name = None, [], set(), set(), None
    for part in parts:
        csv, js = os.path.join(part, "results.csv"), os.path.join(part, "study.json")
        if not (os.path.exists(csv) and os.path.exists(js)):
            raise StudyError(f"part {part!r} has no results.csv and study.json")
        try:
            with open(js) as fh:
                meta = json.load(fh)
            missing = [k for k in ("settings", "name", "temperatures", "seeds") if k not in meta]
            if missing:
                raise KeyError(f"no {missing}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StudyError(f"{js} is damaged ({type(err).__name__}: {err})") from err
        if settings is not None and meta["settings"] != settings:
            raise StudyError(f"part {part!r} was run with other settings than {parts[0]!r}")
        settings, name = meta["settings"], name or meta["name"]
        temps |= set(meta["temperatures"])
        seeds |= set(meta["seeds"])
        frames.append(read_table(csv))
    merged = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["temperature", "seed"], keep="first")
    merged = merged.sort_values(["seed", "temperature"]).reset_index(drop=True)
    os.makedirs(out, exist_ok=True)
    with folder_lock(out, "mesa softmax --merge"):
        write_table(merged, os.path.join(out, "results.csv"))
        _write_settings(out, name, settings, temps, seeds)
        copy_part_files(parts, out, ("curves", "spectra", "trajectory"))
    return len(merged)


def parity(df, loss_band: float):
    """Per temperature, the seed-mean final training loss ``L_T``, its relative gap to the T = 1 loss
    ``|L_T - L_1| / L_1`` and whether it is within ``loss_band`` (a diverged run fails)."""
    import pandas as pd

    g = df.groupby("temperature")
    tab = pd.DataFrame({"final_train_loss": g.final_train_loss.mean(), "diverged": g.diverged.any()})
    if 1.0 not in tab.index:
        raise StudyError("the parity check needs the T = 1 runs")
    ref = tab.loc[1.0, "final_train_loss"]
    tab["rel_gap"] = (tab.final_train_loss - ref).abs() / ref
    tab["within_band"] = (tab.rel_gap <= loss_band) & ~tab.diverged
    return tab.reset_index()


def rank_trend(df) -> dict:
    """Spearman correlations of each rank column with T over all finished (T, seed) rows."""
    ok = df[~df.diverged.astype(bool)]
    return {c: spectra.spearman(ok[c].to_numpy(float), ok.temperature.to_numpy(float))
            for c in ("logits_rank", "logits_erank", "hidden_rank", "hidden_erank")}
