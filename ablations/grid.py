"""The ablation grid: training-time solver configs x evaluation-time solver configs (docs/design.md section 8).

A grid spec (a TOML file, or a built-in preset) has a ``[run]`` table (model size, training
settings, data slice) and two arrays of solver configurations, ``[[train]]`` and ``[[eval]]``,
each entry the fields of :class:`solvers.spec.SolverSpec`. A sweep can be written compactly
with a list in one field, e.g. ``steps = [1, 2, 5]``, which expands to one config per value.

:func:`run_grid` trains one model per training config (checkpointed under ``out/ckpt``, resumed
if interrupted), then evaluates it under every evaluation config on the validation, test and
out-of-distribution splits (rank 0 only under ``torchrun``: training is data-parallel, see
:func:`ablations.train.train`), appending one row per (training config, evaluation config) to
``out/results.csv`` as soon as it is measured; with ``resume`` the rows already there for the same
(training config, evaluation config, seed) are kept and skipped, so a run with another seed adds
its replicate. Training curves and checkpoints go to ``out/curves/<train label>[_seed<n>].csv`` and
``out/ckpt/<train label>[_seed<n>].pt``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from dataclasses import dataclass, field

import torch

from mesa_stability.solvers.spec import SPEC_FIELDS, SolverSpec
from mesa_stability.stability.provenance import provenance
from mesa_stability.stability.results_store import folder_lock, read_table, write_table

from .model import SIZES, MesaLM
from .train import TrainConfig, evaluate, train

RUN_KEYS = {"size", "train_steps", "batch_size", "lr", "warmup", "seed", "max_bytes", "eval_windows",
            "ckpt_every", "device", "backend"}
SOLVER_KEYS = set(SPEC_FIELDS)
EVAL_SPLITS = ("validation", "test", "ood")

PRESETS = {
    # the README main job: one tiny model on 2 CPU cores, evaluated with 0..30 steps and tolerances
    "tiny-cpu": {
        "run": {"size": "tiny", "train_steps": 1200, "batch_size": 16, "lr": 3e-3, "warmup": 100, "seed": 0,
                "max_bytes": 2_000_000, "eval_windows": 64},
        "train": [{"method": "cg", "steps": 30, "policy": "fp32"}],
        "eval": [{"method": "cg", "steps": [0, 1, 2, 5, 10, 30], "policy": "fp32"},
                 {"method": "cg", "steps": 30, "tol": [1e-2, 1e-3, 1e-4], "policy": "fp32"},
                 {"method": "exact", "policy": "fp32"}],
    },
    # one GPU, each training run a few minutes: models trained with 5, 10, 30 CG steps and with
    # Sherman-Morrison, each evaluated over steps, tolerances and policies
    "paper-gpu": {
        "run": {"size": "small", "train_steps": 2000, "batch_size": 32, "lr": 2e-3, "warmup": 200, "seed": 0,
                "eval_windows": 256},
        # training in the kernels' default policy (bf16x3: fp32 IEEE products would be ~6x slower)
        "train": [{"method": "cg", "steps": [5, 10, 30], "policy": "bf16x3"},
                  {"method": "sherman_morrison", "policy": "fp32"}],
        "eval": [{"method": "cg", "steps": [1, 2, 3, 5, 10, 15, 20, 30], "policy": "fp32"},
                 {"method": "cg", "steps": 30, "tol": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6], "policy": "fp32"},
                 {"method": "cg", "steps": 30, "policy": ["fp32", "tf32", "bf16-fp32state", "bf16-bf16state"]},
                 # the solved problem itself: exact, and Sherman-Morrison's decayed regulariser
                 {"method": "exact", "policy": "fp32"}, {"method": "sherman_morrison", "policy": "fp32"}],
    },
    # for tests: seconds on a CPU
    "smoke": {
        "run": {"size": "tiny", "train_steps": 16, "batch_size": 4, "warmup": 2, "seed": 0, "max_bytes": 100_000,
                "eval_windows": 4, "ckpt_every": 4},
        "train": [{"method": "cg", "steps": [2, 5], "policy": "fp32"}],
        "eval": [{"method": "cg", "steps": [0, 5], "policy": "fp32"}],
    },
}


class GridError(ValueError):
    """A bad grid spec, with a message that says what to fix."""


@dataclass
class Grid:
    run: dict
    train: list[SolverSpec]
    eval: list[SolverSpec]
    name: str = "custom"
    extra: dict = field(default_factory=dict)

    @property
    def train_config(self) -> TrainConfig:
        r = self.run
        try:
            return TrainConfig(steps=r.get("train_steps", 300), batch_size=r.get("batch_size", 16),
                               lr=r.get("lr", 3e-3), warmup=r.get("warmup", 30), seed=r.get("seed", 0),
                               ckpt_every=r.get("ckpt_every", 50))
        except ValueError as err:  # the [run] table's values: a usage error
            raise GridError(f"[run]: {err}") from None


def _expand(entries, where: str) -> list[SolverSpec]:
    if not isinstance(entries, list) or not entries:
        raise GridError(f"[[{where}]] must be a non-empty array of solver configs")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise GridError(f"[[{where}]] entry {i} must be a table of solver fields, got {e!r}")
        unknown = set(e) - SOLVER_KEYS
        if unknown:
            raise GridError(f"[[{where}]] entry {i}: unknown field(s) {sorted(unknown)}; solver fields are "
                            f"{sorted(SOLVER_KEYS)}")
        keys = list(e)
        values = [v if isinstance(v, list) else [v] for v in e.values()]
        for combo in itertools.product(*values):
            try:
                out.append(SolverSpec(**dict(zip(keys, combo, strict=True))))
            except (ValueError, KeyError, TypeError) as err:
                raise GridError(f"[[{where}]] entry {i}: {err}") from err
    return out


def parse_grid(spec: dict, name: str = "custom") -> Grid:
    """A :class:`Grid` from a spec dict (a parsed TOML file or a preset); raises :class:`GridError`."""
    if not isinstance(spec, dict):
        raise GridError("a grid spec is a table with [run], [[train]] and [[eval]]")
    unknown = set(spec) - {"run", "train", "eval"}
    if unknown:
        raise GridError(f"unknown section(s) {sorted(unknown)}; a grid has [run], [[train]] and [[eval]]")
    run = dict(spec.get("run", {}))
    bad = set(run) - RUN_KEYS
    if bad:
        raise GridError(f"[run]: unknown key(s) {sorted(bad)}; keys are {sorted(RUN_KEYS)}")
    if run.get("size", "tiny") not in SIZES:
        raise GridError(f"[run] size {run.get('size')!r} is not one of {sorted(SIZES)}")
    grid = Grid(run, _expand(spec.get("train"), "train"), _expand(spec.get("eval"), "eval"), name)
    try:
        grid.train_config  # noqa: B018 - validates the training settings
    except ValueError as err:
        raise GridError(f"[run]: {err}") from err
    return grid


def load_grid(preset: str | None = None, path: str | None = None) -> Grid:
    """A preset by name, or a TOML grid file."""
    if (preset is None) == (path is None):
        raise GridError("give exactly one of a preset name or a grid file")
    if preset is not None:
        if preset not in PRESETS:
            raise GridError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        return parse_grid(PRESETS[preset], preset)
    if not os.path.exists(path):
        raise GridError(f"grid file {path!r} does not exist")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            spec = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"grid file {path!r} is not valid TOML: {err}") from err
    return parse_grid(spec, os.path.splitext(os.path.basename(path))[0])


def run_name(train_label: str, seed: int = 0) -> str:
    """Stem of one training run's files, its curve in ``out/curves`` and its checkpoint in ``out/ckpt``
    (seed replicates other than 0 get a suffix, so that they never share a checkpoint)."""
    return _slug(train_label) + ("" if seed == 0 else f"_seed{seed}")


def curve_name(train_label: str, seed: int = 0) -> str:
    """File name of a training curve in ``out/curves``."""
    return run_name(train_label, seed) + ".csv"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)


def run_grid(grid: Grid, out: str, *, resume: bool = False, progress: bool = True, log=print,
             retrain: bool = False):
    """Train and evaluate the whole grid; returns the results DataFrame (also in ``out/results.csv``).
    Rank 0 holds the folder's writer lock (:func:`stability.results_store.folder_lock`); ``retrain``
    trains a run from scratch where its checkpoint is damaged or from other settings (else that is
    an error naming the file and the differing fields)."""
    from .train import dist_info, init_distributed

    device = init_distributed() if not grid.run.get("device") else torch.device(grid.run["device"])
    rank, world = dist_info()
    os.makedirs(out, exist_ok=True)
    with folder_lock(out, "mesa ablate") if rank == 0 else contextlib.nullcontext():
        return _run_grid(grid, out, resume, progress, log, retrain, device, rank, world)


def _run_grid(grid: Grid, out: str, resume, progress, log, retrain, device, rank, world):
    import pandas as pd

    from .data import load_corpus

    os.makedirs(os.path.join(out, "ckpt"), exist_ok=True)
    os.makedirs(os.path.join(out, "curves"), exist_ok=True)
    csv = os.path.join(out, "results.csv")
    if not resume and (os.path.exists(csv) or earlier_checkpoints(out)):
        what = csv if os.path.exists(csv) else f"{os.path.join(out, 'ckpt')} (checkpoints of an interrupted run)"
        raise GridError(f"{what} exists: pass --resume to continue that run, or choose another --out")
    done = read_table(csv)  # the rows that pass their integrity check (stability/results_store.py)
    # a row is done for its (train, eval, seed); tables written before the seed column are seed 0
    seeds = done["seed"].fillna(0).astype(int) if "seed" in done else [0] * len(done)
    have = set(zip(done.get("train", []), done.get("eval", []), seeds, strict=False))
    r = grid.run
    corpus = load_corpus(r.get("max_bytes"))
    tcfg = grid.train_config
    rows = done.to_dict("records")
    prov = {**provenance(str(device)), "corpus": corpus.provenance}
    for tsolver in grid.train:
        pending = [e for e in grid.eval if (tsolver.label, e.label, tcfg.seed) not in have]
        if not pending:
            continue
        torch.manual_seed(tcfg.seed)
        model = MesaLM(r.get("size", "tiny"), tsolver, backend=r.get("backend", "auto")).to(device)
        ck = os.path.join(out, "ckpt", run_name(tsolver.label, tcfg.seed) + ".pt")
        if rank == 0:
            log(f"train {tsolver.label}: {tcfg.steps} steps" + (" (resuming)" if os.path.exists(ck) else "")
                + (f" on {world} processes" if world > 1 else ""))
        res = train(model, corpus["train"], tcfg, ckpt_path=ck, progress=progress, retrain=retrain)
        if rank != 0:
            continue  # evaluation and the table are rank 0's
        pd.DataFrame({"step": range(1, len(res.losses) + 1), "loss": res.losses}).to_csv(
            os.path.join(out, "curves", curve_name(tsolver.label, tcfg.seed)), index=False)
        for esolver in pending:
            row = {"grid": grid.name, "train": tsolver.label, "eval": esolver.label, "seed": tcfg.seed, **prov,
                   **{f"train_{k}": v for k, v in tsolver.to_dict().items()},
                   **{f"eval_{k}": v for k, v in esolver.to_dict().items()},
                   "train_steps_done": res.steps_done, "diverged": res.diverged,
                   "final_train_loss": res.losses[-1] if res.losses else float("nan"),
                   "train_tokens_per_s": res.tokens_per_s, "train_wall_s": res.wall_s}
            t0 = time.perf_counter()
            for split in EVAL_SPLITS:
                if res.diverged:
                    row[f"bpb_{split}"] = float("nan")
                    continue
                m = evaluate(model, corpus[split], esolver, max_windows=r.get("eval_windows", 64))
                row[f"bpb_{split}"] = m.pop("bits_per_byte")
                if split == "validation":
                    row.update({k: v for k, v in m.items() if k not in ("windows", "eval_wall_s")})
            row["eval_wall_s"] = time.perf_counter() - t0
            rows.append(row)
            write_table(pd.DataFrame(rows), csv)  # after every row, atomically: an interrupted grid keeps it
            log(f"  eval {esolver.label}: validation {row['bpb_validation']:.4f} bits/byte")
    return pd.DataFrame(rows)


def earlier_checkpoints(out: str) -> list[str]:
    """The checkpoints an earlier run left in ``out/ckpt``."""
    folder = os.path.join(out, "ckpt")
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []


def merge_parts(parts: list[str], out: str) -> int:
    """Merge grid parts run separately (``--only-train``, other GPUs or sessions) into ``out``: the
    rows of every ``part/results.csv`` (a (train, eval, seed) triple measured twice keeps the first
    part's row) and the training curves. Returns the number of rows in ``out/results.csv``."""
    import pandas as pd

    frames = []
    for part in parts:
        csv = os.path.join(part, "results.csv")
        if not os.path.exists(csv):
            raise GridError(f"part {part!r} has no results.csv")
        frames.append(read_table(csv))
    os.makedirs(os.path.join(out, "curves"), exist_ok=True)
    target = os.path.join(out, "results.csv")
    if os.path.exists(target) and os.path.abspath(out) not in {os.path.abspath(p) for p in parts}:
        frames.insert(0, read_table(target))
    merged = pd.concat(frames, ignore_index=True)
    key = ["train", "eval"] + (["seed"] if "seed" in merged else [])  # seed replicates are separate rows
    merged = merged.drop_duplicates(subset=key, keep="first")
    with folder_lock(out, "mesa ablate --merge"):
        write_table(merged, target)
        copy_part_files(parts, out, ("curves",))
    return len(merged)


def copy_part_files(parts: list[str], out: str, folders: tuple[str, ...]) -> None:
    """Copy the files of each ``part/<folder>`` into ``out/<folder>`` (per-run files: curves, spectra)."""
    import shutil

    for folder in folders:
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        for part in parts:
            src = os.path.join(part, folder)
            for name in sorted(os.listdir(src)) if os.path.isdir(src) else []:
                dst = os.path.join(out, folder, name)
                if os.path.abspath(os.path.join(src, name)) != os.path.abspath(dst):
                    shutil.copyfile(os.path.join(src, name), dst)
