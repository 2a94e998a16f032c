"""The softmax temperature study (docs/design.md section 9): rank deficit bias of byte-level Mesa LMs.

For every temperature ``T`` and seed the same model (size, solver, AdamW optimiser and schedule,
steps, the seed's data stream) is trained with the loss ``cross-entropy(softmax(z / T), y)``
(:class:`ablations.train.TrainConfig` ``temperature``), ``z = RMSNorm(h) E^T`` the logits of the
tied unembedding. Adam normalises gradient scale, so the ``1 / T`` factor of the gradient does not
change the step size: the runs differ in the geometry the loss asks for, not in their learning rate.
Each trained model is then measured (:func:`measure`):

* **bits per byte** ``mean(-log2 softmax(z / T)_y)`` on validation, test and out-of-distribution
  (sympy source) text: the model's own predictive distribution;
* **spectra** of three matrices computed in float64 from a float32 forward pass (no bf16 autocast:
  bf16 rounding, ``2^-8`` relative, would sit above the ``1e-3`` threshold and fake rank):
  ``Z = H_last E^T`` (``N x 256``, the logits), ``H_last = RMSNorm(h)`` (``N x d_model``, the
  last hidden representations), one row per position of the first ``rank_windows`` validation
  windows, and the logits restricted to the classes that occur, row-centred:
  ``Z_U^c = Z[:, U] (I - 1 1^T / |U|)`` with ``U`` the ``C_used = |U|`` byte classes that occur as
  targets of those rows (``byte_classes``; :func:`ablations.spectra.row_centred`). Centring removes
  the direction ``1`` that ``softmax`` ignores, so ``rank(Z_U^c) <= min(C_used - 1, d_model)``: the
  ``logits_used_rank_ratio = rank(Z_U^c) / (C_used - 1)`` is 1 when the model uses every direction
  it could use to tell the occurring classes apart. Numerical rank ``#{i : s_i > tau s_1}``
  (``tau = rank_threshold``, default ``1e-3``), the same at each threshold of the sweep
  ``tau in {1e-4, 1e-3, 1e-2, 1e-1}`` (``<matrix>_rank_at_<tau>``, for ``Z`` and ``Z_U^c``), and
  entropy effective rank ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum_j s_j``
  (:mod:`ablations.spectra`). All are invariant to scaling, so ``Z`` and ``Z / T`` have the same
  ranks. With tied embeddings ``rank(Z) <= rank(H_last) <= d_model``; the all-256 rank also counts
  directions in the columns of bytes that never occur, so the comparison with the classes is the
  restricted, centred one;
* **out-of-distribution detection**: per-token scores of ``softmax(z / T)``, maximum softmax
  probability ``MSP = max_c softmax(z / T)_c`` and energy ``T logsumexp(z / T)`` (higher = in
  distribution), float64 from float32 logits, averaged per window; AUROC of test windows (positive)
  against sympy windows (negative), per window of ``seq_len`` bytes, per token, and per
  ``short_window``-byte window (default 64; ``auroc_msp_short``, ``auroc_energy_short``): the same
  bytes tiled into short windows, each run through the model on its own, so a detector sees only
  ``short_window`` bytes of context and evidence (the long windows' AUROC saturates near 1);
* **linear probes** of the frozen features on OOD text (:func:`probe_metrics`,
  :mod:`ablations.probe`: closed-form ridge regression in float64, its parameter chosen on a
  validation part of the training half): for each layer ``l`` -- ``h0`` the byte embedding,
  ``h1 .. hL`` the residual stream after each block, ``last`` = ``H_last`` -- a probe from the
  features at each position of the first ``probe_windows`` sympy windows to (``next``) the next
  byte and (``class``) the character class of the next byte (letter, digit, space, punctuation,
  other), trained on the first half of the windows and tested on the second:
  ``probe_<task>_acc_<layer>``, ``probe_<task>_loss_<layer>`` (mean squared error of the one-hot
  target), ``probe_<task>_alpha_<layer>`` (the chosen ``lambda / n_fit``) and
  ``probe_<task>_chance`` (the test accuracy of the training half's most frequent class). This
  measures whether the representations carry over to text the model was not trained on;
* **final training loss**: the mean of the last 5% of the training losses (nats per byte of
  ``softmax(z / T)``), for the parity check ``|L_T - L_1| <= loss_band * L_1`` (:func:`parity`).
  ``loss_band`` (default 0.15) is this study's tolerance: docs/design.md states none for the paper
  ("the in-distribution loss changes little").

:func:`run_study` writes one row per (T, seed) to ``out/results.csv`` as soon as it is measured
(an interrupted study resumes: finished rows are kept, an unfinished training continues from its
checkpoint in ``out/ckpt``), the training curves to ``out/curves/T<T>_seed<s>.csv`` and the singular
values to ``out/spectra/T<T>_seed<s>.csv`` (matrices ``logits``, ``hidden``, ``logits_used``);
``out/study.json`` records the settings and the study's format (:data:`STUDY_FORMAT`), and a resumed
or merged study must have the same ones: a folder of an earlier format (whose rows lack today's
measurements) is refused with a message to run it again. :mod:`ablations.softmax_report` renders
the report, of earlier formats too (without the sections whose columns they lack).
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
from .data import VOCAB, eval_windows
from .grid import copy_part_files, earlier_checkpoints
from .model import SIZES, MesaLM
from .probe import CHAR_CLASSES, char_class, ridge_probe
from .train import TrainConfig, evaluate, train

TEMPERATURES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LOSS_TAIL = 0.05  # final training loss: mean over the last 5% of the steps (one step is one noisy batch)
TRAJECTORY_POINTS = 12  # log-spaced steps at which the ranks are measured during training
# 2: the restricted centred logits' ranks, the threshold sweep, the probes and the short-window AUROC (study.json
# without "format" is 1: its rows lack those columns)
STUDY_FORMAT = 2
PROBE_TASKS = ("next", "class")  # the next byte (256 classes); the next byte's character class (CHAR_CLASSES)

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
                  max_bytes=60_000, eval_windows=4, rank_windows=4, probe_windows=4, ckpt_every=4),
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
    loss_band: float = 0.15  # parity: |L_T - L_1| <= loss_band * L_1 (the paper's tolerance is not known here)
    probe_windows: int = 64  # sympy windows of the linear probes: the first half trains, the second tests
    short_window: int = 64  # bytes of the short-window OOD detection
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
        if self.probe_windows < 2:
            raise StudyError(f"probe_windows must be >= 2 (a training and a test half), got {self.probe_windows}")
        if not 1 <= self.short_window <= SIZES[self.size].seq_len:
            raise StudyError(f"short_window must be in [1, {SIZES[self.size].seq_len}] (the model's window), "
                             f"got {self.short_window}")
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


@torch.no_grad()
def _streams_fp32(model: MesaLM, x: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """:meth:`MesaLM.residual_streams` ``[n, L, d]`` each, float32 (autocast off), on the CPU, in batches."""
    device = next(model.parameters()).device
    parts = []
    with torch.autocast(device.type, enabled=False):
        for i in range(0, x.shape[0], batch_size):
            parts.append([h.float().cpu() for h in model.residual_streams(x[i:i + batch_size].to(device))])
    return [torch.cat(p) for p in zip(*parts, strict=True)]


def _scores(model: MesaLM, data: torch.Tensor, windows: int, temperature: float, length: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token MSP and energy of ``softmax(z / T)`` on the first ``windows`` windows of ``length``
    bytes (default the model's ``seq_len``), each run on its own: ``[n, length]`` each, float64."""
    x, _ = eval_windows(data, length or model.size.seq_len, windows)
    z = model.unembed(_forward_fp32(model, x)).cpu()
    return spectra.max_softmax_probability(z, temperature), spectra.energy_score(z, temperature)


def sweep_column(which: str, tau: float) -> str:
    """The results column of the numerical rank of ``which`` (``logits``, ``logits_used``) at threshold ``tau``."""
    return f"{which}_rank_at_{tau:.0e}"


def layer_names(n_layers: int) -> list[str]:
    """The probed layers of a model of ``n_layers`` blocks: ``h0`` (embedding), ``h1 .. hL``, ``last`` (H_last)."""
    return [f"h{i}" for i in range(n_layers + 1)] + ["last"]


def _held_out(model: MesaLM, corpus, study: Study) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank rows: the first ``rank_windows`` validation windows, inputs and targets."""
    return eval_windows(corpus["validation"], model.size.seq_len, study.rank_windows)


def rank_metrics(model: MesaLM, x: torch.Tensor, y: torch.Tensor, study: Study, temperature: float
                 ) -> tuple[dict, dict]:
    """Ranks of ``Z = H_last E^T``, ``H_last`` and the restricted centred logits ``Z_U^c`` (``U``: the
    classes among the targets ``y``; module docstring) on the rows ``x`` (float64 from a float32
    forward), the threshold sweep of ``Z`` and ``Z_U^c``, the cross-entropy of ``softmax(Z / T)`` on
    ``y`` (nats per byte, ``rows_loss``) and the RMS of ``Z / T`` (the scale the softmax sees); also the
    singular values ``{"logits", "hidden", "logits_used"}``."""
    was_training = model.training
    model.eval()
    h = _forward_fp32(model, x).reshape(-1, model.size.d_model).cpu().double()
    model.train(was_training)
    z = h @ model.embed.weight.detach().cpu().double().t()  # Z = H_last E^T in float64
    used = torch.unique(y.reshape(-1))
    sv = {"logits": spectra.singular_values(z), "hidden": spectra.singular_values(h),
          "logits_used": spectra.singular_values(spectra.row_centred(z, used))}
    zt = z / temperature
    loss = torch.nn.functional.cross_entropy(zt, y.reshape(-1).long())
    tau = study.rank_threshold
    used_rank = spectra.numerical_rank(sv["logits_used"], tau)
    m = {"rows_loss": float(loss),
         "logits_rank": spectra.numerical_rank(sv["logits"], tau),
         "logits_erank": spectra.effective_rank(sv["logits"]),
         "hidden_rank": spectra.numerical_rank(sv["hidden"], tau),
         "hidden_erank": spectra.effective_rank(sv["hidden"]),
         "logits_used_rank": used_rank,
         "logits_used_erank": spectra.effective_rank(sv["logits_used"]),
         "logits_used_rank_ratio": used_rank / (used.numel() - 1) if used.numel() > 1 else math.nan,
         "logits_rms": float(zt.pow(2).mean().sqrt())}
    for which in ("logits", "logits_used"):
        m.update({sweep_column(which, t): r for t, r in spectra.rank_sweep(sv[which]).items()})
    return m, sv


def probe_metrics(model: MesaLM, ood: torch.Tensor, study: Study) -> dict:
    """Ridge probes (:mod:`ablations.probe`) of every layer's frozen features (float32 forward, float64
    probe) on the first ``probe_windows`` windows of ``ood``: trained on the first half of the windows
    (``alpha`` chosen on the last quarter of that half), tested on the second half; tasks
    :data:`PROBE_TASKS`. Columns in the module docstring."""
    x, y = eval_windows(ood, model.size.seq_len, study.probe_windows)
    if x.shape[0] < 2:
        raise StudyError(f"the OOD split has {x.shape[0]} window(s) of {model.size.seq_len} bytes: the probe needs 2")
    was_training = model.training
    model.eval()
    feats = _streams_fp32(model, x)
    model.train(was_training)
    n_train = (x.shape[0] // 2) * x.shape[1]  # whole windows: the first half trains
    labels = {"next": (y.reshape(-1), VOCAB), "class": (char_class(y.reshape(-1)), len(CHAR_CLASSES))}
    row = {"probe_rows_train": n_train, "probe_rows_test": y.numel() - n_train}
    for task in PROBE_TASKS:
        lab, k = labels[task]
        for name, f in zip(layer_names(model.size.n_layers), feats, strict=True):
            r = ridge_probe(f.reshape(-1, f.shape[-1]), lab, n_train, k)
            row.update({f"probe_{task}_acc_{name}": r.accuracy, f"probe_{task}_loss_{name}": r.loss,
                        f"probe_{task}_alpha_{name}": r.alpha})
        row[f"probe_{task}_chance"] = r.chance  # the same for every layer: the labels' majority class
    return row


def measure(model: MesaLM, corpus, study: Study, temperature: float) -> tuple[dict, dict]:
    """The metrics of one trained model (module docstring) and its singular values
    ``{"logits": s(Z), "hidden": s(H_last), "logits_used": s(Z_U^c)}``, float64."""
    row = {}
    for split in ("validation", "test", "ood"):
        row[f"bpb_{split}"] = evaluate(model, corpus[split], model.solver, max_windows=study.eval_windows,
                                       temperature=temperature)["bits_per_byte"]
    x, y = _held_out(model, corpus, study)
    ranks, sv = rank_metrics(model, x, y, study, temperature)
    row.update(rank_rows=x.numel(), rank_threshold=study.rank_threshold,
               byte_classes=int(torch.unique(y).numel()), **ranks)  # C_used: byte classes among the rows' targets
    msp_id, en_id = _scores(model, corpus["test"], study.eval_windows, temperature)
    msp_ood, en_ood = _scores(model, corpus["ood"], study.eval_windows, temperature)
    row.update(auroc_msp=spectra.auroc(msp_id.mean(1), msp_ood.mean(1)),
               auroc_energy=spectra.auroc(en_id.mean(1), en_ood.mean(1)),
               auroc_msp_token=spectra.auroc(msp_id, msp_ood), auroc_energy_token=spectra.auroc(en_id, en_ood),
               msp_id=float(msp_id.mean()), msp_ood=float(msp_ood.mean()))
    row.update(short_window_auroc(model, corpus, study, temperature))
    row.update(probe_metrics(model, corpus["ood"], study))
    return row, sv


def short_window_auroc(model: MesaLM, corpus, study: Study, temperature: float) -> dict:
    """MSP and energy AUROC of test (positive) against sympy (negative) windows of ``short_window``
    bytes: the bytes of the first ``eval_windows`` long windows tiled into short ones, each run through
    the model on its own, per-token scores averaged per window (float64 from float32 logits)."""
    n_short = study.eval_windows * model.size.seq_len // study.short_window
    msp_id, en_id = _scores(model, corpus["test"], n_short, temperature, study.short_window)
    msp_ood, en_ood = _scores(model, corpus["ood"], n_short, temperature, study.short_window)
    return {"short_window": study.short_window, "short_windows": min(msp_id.shape[0], msp_ood.shape[0]),
            "auroc_msp_short": spectra.auroc(msp_id.mean(1), msp_ood.mean(1)),
            "auroc_energy_short": spectra.auroc(en_id.mean(1), en_ood.mean(1))}


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


def check_format(meta: dict, path: str) -> None:
    """Refuse a study.json of another :data:`STUDY_FORMAT` (its rows lack or differ in columns), saying what to do."""
    fmt = meta.get("format", 1)
    if fmt != STUDY_FORMAT:
        raise StudyError(f"{path} is a study of format {fmt} and this code writes format {STUDY_FORMAT}"
                         + (" (its rows lack the restricted centred ranks, the threshold sweep, the linear probes "
                            "and the short-window AUROC)" if fmt == 1 else "")
                         + ": it cannot be resumed or merged; run the study again into a new --out (its report "
                           "can still be written with `write_report`)")


def _check_settings(out: str, study: Study) -> None:
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        try:
            with open(path) as fh:
                meta = json.load(fh)
            stored = meta["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StudyError(f"{path} is damaged ({type(err).__name__}: {err}); restore it, or remove the folder "
                             "and run the study again") from err
        check_format(meta, path)
        stored = normalised_settings(stored)
        mine = json.loads(json.dumps(study.settings()))
        differ = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        if differ:
            raise StudyError(f"{out} holds a study with other settings ({', '.join(differ)}): use another --out")


def _write_settings(out: str, name: str, settings: dict, temperatures, seeds) -> None:
    """``out/study.json``: the study's format, name, the temperatures and seeds it holds, its settings."""
    text = json.dumps({"format": STUDY_FORMAT, "name": name, "temperatures": sorted(temperatures),
                       "seeds": sorted(seeds), "settings": settings}, indent=1)
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
               f"(restricted centred {row['logits_used_rank']} of {row['byte_classes'] - 1}), AUROC msp "
               f"{row['auroc_msp']:.3f} ({study.short_window} bytes {row['auroc_msp_short']:.3f}), probe accuracy "
               f"H_last next byte {row['probe_next_acc_last']:.3f}")
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
        check_format(meta, js)
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
