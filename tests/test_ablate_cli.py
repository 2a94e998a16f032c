"""`mesa ablate`: grid specs, clear errors, and resuming a killed run gives the uninterrupted table."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from mesa_stability.ablations.grid import GridError, load_grid, parse_grid
from mesa_stability.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["bpb_validation", "bpb_test", "bpb_ood", "mean_steps", "final_train_loss", "train_steps_done"]


def test_grid_expands_lists_and_validates():
    g = parse_grid({"run": {"size": "tiny", "train_steps": 10, "warmup": 1},
                    "train": [{"steps": [5, 10]}], "eval": [{"steps": 30, "tol": [1e-2, 1e-3]}, {"method": "exact"}]})
    # no policy given: the one default, the certified "auto"
    assert [t.label for t in g.train] == ["cg/steps=5/auto", "cg/steps=10/auto"]
    assert len(g.eval) == 3 and g.train_config.steps == 10


@pytest.mark.parametrize("spec,msg", [
    ({"train": [{"method": "newton"}], "eval": [{}]}, "method must be one of"),
    ({"train": [{"stepz": 3}], "eval": [{}]}, "unknown field"),
    ({"train": [{}], "eval": []}, "non-empty array"),
    ({"run": {"size": "huge"}, "train": [{}], "eval": [{}]}, "size"),
    ({"run": {"epochs": 3}, "train": [{}], "eval": [{}]}, "unknown key"),
    ({"run": {"train_steps": 10, "warmup": 20}, "train": [{}], "eval": [{}]}, "warmup"),
    ({"train": [{"policy": "fp8"}], "eval": [{}]}, "fp8"),
    ({"train": [{}], "eval": [{}], "extra": {}}, "unknown section"),
])
def test_bad_grid_specs_say_what_is_wrong(spec, msg):
    with pytest.raises(GridError, match=msg):
        parse_grid(spec)


def test_bad_files_and_presets(tmp_path, capsys):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(path=str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsize = ")
    with pytest.raises(GridError, match="not valid TOML"):
        load_grid(path=str(bad))
    assert main(["ablate", "--grid", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate", "--preset", "no-such-preset"])


@pytest.fixture(scope="module")
def smoke_whole(tmp_path_factory):
    """One uninterrupted run of the smoke preset (seed 0), shared by the tests that compare with it."""
    out = tmp_path_factory.mktemp("smoke") / "whole"
    assert main(["ablate", "--preset", "smoke", "--out", str(out), "--no-plots", "--no-progress"]) == 0
    return out


def _ablate(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "mesa_stability", "ablate", "--preset", "smoke", "--out", str(out), "--no-plots",
            "--no-progress", *extra], env


def test_resume_after_a_killed_run_gives_the_same_table(tmp_path, smoke_whole):
    whole = pd.read_csv(smoke_whole / "results.csv")

    out = tmp_path / "killed"
    cmd, env = _ablate(out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "ckpt" / "cg_steps=5_fp32.pt"  # the second training run's checkpoint: the first is finished
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = pd.read_csv(out / "results.csv")
    assert 0 < len(partial) < len(whole)  # killed mid-grid, with finished rows written
    cmd, env = _ablate(out, "--resume")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    resumed = pd.read_csv(out / "results.csv")
    key = ["train", "eval"]
    a = whole.sort_values(key).reset_index(drop=True)
    b = resumed.sort_values(key).reset_index(drop=True)
    assert list(a[key].itertuples(index=False)) == list(b[key].itertuples(index=False))
    pd.testing.assert_frame_equal(a[METRICS], b[METRICS], rtol=1e-5)
    assert (out / "report.md").exists()
    # without --resume an existing run is not overwritten
    cmd, env = _ablate(out)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr


def test_split_grid_merges_to_the_whole_table(tmp_path, capsys, smoke_whole):
    """Training configs run as separate parts (--only-train, e.g. one per GPU) and merged (--merge)
    give the same table as one run of the whole grid."""
    common = ["ablate", "--preset", "smoke", "--no-plots", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "p1"), "--only-train", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "p0"), "--only-train", "0"]) == 0
    assert main(["ablate", "--no-plots", "--merge", str(tmp_path / "p0"), str(tmp_path / "p1"),
                 "--out", str(tmp_path / "merged")]) == 0
    key = ["train", "eval"]
    whole = pd.read_csv(smoke_whole / "results.csv").sort_values(key).reset_index(drop=True)
    merged = pd.read_csv(tmp_path / "merged" / "results.csv").sort_values(key).reset_index(drop=True)
    assert list(whole[key].itertuples(index=False)) == list(merged[key].itertuples(index=False))
    pd.testing.assert_frame_equal(whole[METRICS], merged[METRICS], rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "merged" / "curves")) == sorted(os.listdir(smoke_whole / "curves"))
    assert (tmp_path / "merged" / "report.md").exists()
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--only-train", "2"]) == 2
    assert "training configs 0..1" in capsys.readouterr().err
    assert main(["ablate", "--merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")]) == 2


def test_every_preset_parses():
    from mesa_stability.ablations.grid import PRESETS

    for name in PRESETS:
        g = load_grid(preset=name)
        assert g.train and g.eval and g.name == name
    paper = load_grid(preset="paper-gpu")
    assert {t.label for t in paper.train} >= {"cg/steps=5/bf16x3", "sherman_morrison/fp32"}
    assert {e.policy.name for e in paper.eval} == {"fp32", "tf32", "bf16-fp32state", "bf16-bf16state"}
    assert {e.method for e in paper.eval} == {"cg", "exact", "sherman_morrison"}


def test_torchrun_two_processes(tmp_path):
    """Data-parallel training under torchrun (2 CPU processes, gloo): the grid completes, rank 0 writes
    the table and the report."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mesa_stability",
           "ablate", "--preset", "smoke", "--out", str(out), "--no-plots", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4 and df.bpb_validation.notna().all() and (df.train_steps_done == 16).all()
    assert (out / "report.md").exists()


def test_resume_with_another_seed_adds_its_replicate(tmp_path, smoke_whole):
    """--seed S --resume on a finished seed-0 run trains and evaluates seed S (its own checkpoint), and
    keeps the seed-0 rows; a second identical call has nothing left to do."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_whole, out)  # the finished seed-0 run
    args = ["ablate", "--preset", "smoke", "--out", str(out), "--no-plots", "--no-progress"]
    first = pd.read_csv(out / "results.csv")
    assert main([*args, "--seed", "1", "--resume"]) == 0
    both = pd.read_csv(out / "results.csv")
    assert sorted(both.seed.unique()) == [0, 1] and len(both) == 2 * len(first)
    key = ["train", "eval"]
    seed0 = both[both.seed == 0].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(seed0[METRICS], first.sort_values(key).reset_index(drop=True)[METRICS])
    assert any(p.name.endswith("_seed1.pt") for p in (out / "ckpt").iterdir())
    mtime = os.path.getmtime(out / "results.csv")
    assert main([*args, "--seed", "1", "--resume"]) == 0
    assert os.path.getmtime(out / "results.csv") == mtime  # nothing was re-measured


def test_short_runs_scale_the_warmup_and_warmup_is_a_flag(tmp_path, capsys):
    """--train-steps below the grid's warm-up shrinks the warm-up in proportion (and says so); an
    explicit --warmup longer than the run is a usage error that names it."""
    common = ["ablate", "--preset", "smoke", "--no-plots", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "short"), "--train-steps", "1"]) == 0
    assert "warm-up 2 -> 1 steps" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "short" / "results.csv").train_steps_done.eq(1).all()
    assert main([*common, "--out", str(tmp_path / "bad"), "--train-steps", "4", "--warmup", "9"]) == 2
    assert "warmup" in capsys.readouterr().err


def test_report_effects_are_paired_t_intervals_with_the_wording_rule():
    """ablations.report.effects: eval settings paired over (model, seed) against 30 steps, training
    arms paired by seed against the arm with the most steps, diverged runs left out; the intervals
    are ablations.stats.mean_ci of the constructed differences."""
    from mesa_stability.ablations.report import effects
    from mesa_stability.ablations.stats import mean_ci

    rows = []
    base = {("cg/steps=30/fp32", 0): 1.20, ("cg/steps=30/fp32", 1): 1.26,
            ("cg/steps=5/fp32", 0): 1.21, ("cg/steps=5/fp32", 1): 1.25}
    one_step = {0: 0.010, 1: 0.012}  # eval with 1 step: worse by a consistent amount
    for (train, seed), b in base.items():
        for ev, bpb in (("cg/steps=30/fp32", b), ("cg/steps=1/fp32", b + one_step[seed] * (1 + (train[9] == "5"))),
                        ("exact/fp32", b + (0.001 if seed else -0.001))):
            rows.append(dict(train=train, seed=seed, eval=ev, bpb_validation=bpb, diverged=False))
    rows.append(dict(train="sherman_morrison/fp32", seed=0, eval="exact/fp32", bpb_validation=float("nan"),
                     diverged=True))
    eff = effects(pd.DataFrame(rows)).set_index("setting")
    d1 = [0.010, 0.012, 0.020, 0.024]  # (30-trained, seeds 0/1), (5-trained, seeds 0/1)
    assert tuple(eff.loc["cg/steps=1/fp32", ["mean", "low", "high", "n"]]) == pytest.approx(mean_ci(d1))
    assert eff.loc["cg/steps=1/fp32", "wording"] == "resolved: positive"
    assert eff.loc["exact/fp32", "wording"] == "not resolved at this scale"
    # training: 5 steps against 30 steps at the exact solver, paired by seed: +0.01 and -0.01
    tr = eff.loc["cg/steps=5/fp32"]
    assert tr["kind"] == "train" and tr["n"] == 2 and tr["wording"] == "not resolved at this scale"
    assert tr["mean"] == pytest.approx(0.0, abs=1e-12)
    assert "sherman_morrison/fp32" not in eff.index
