"""Fault injection on the smoke presets (stability/results_store.py, ablations/train.py's checkpoints).

Faults: a kill at random points (SIGKILL), an injected fault inside a write (``MESA_STORE_FAULT``),
a truncated last row, a damaged row, a corrupted checkpoint, a checkpoint of another training
config, two writers on one folder (``mesa ablate``, ``mesa softmax``, ``mesa stability``). In every
case nothing finished is lost, nothing damaged is used, and the table after ``--resume`` equals the
uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest

from mesa_stability.cli import main
from mesa_stability.stability import results_store as store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = ["train", "eval", "seed"]
METRICS = ["bpb_validation", "bpb_test", "bpb_ood", "mean_steps", "max_steps", "final_train_loss", "train_steps_done"]
SECOND = "cg_steps=5_fp32"  # the smoke grid's second training config (its checkpoint name)
FIRST = "cg_steps=2_fp32"


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted smoke grid (seed 0)."""
    out = tmp_path_factory.mktemp("fault") / "whole"
    assert main(["ablate", "--preset", "smoke", "--out", str(out), "--no-plots", "--no-progress"]) == 0
    return out


def _cmd(out, *extra, command="ablate"):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("MESA_STORE_FAULT", None)
    return [sys.executable, "-m", "mesa_stability", command, "--preset", "smoke", "--out", str(out), "--no-plots",
            "--no-progress", *extra], env


def _same_table(out, whole) -> None:
    a = store.read_table(os.path.join(whole, "results.csv")).sort_values(KEY).reset_index(drop=True)
    b = store.read_table(os.path.join(out, "results.csv")).sort_values(KEY).reset_index(drop=True)
    assert list(a[KEY].itertuples(index=False)) == list(b[KEY].itertuples(index=False))
    pd.testing.assert_frame_equal(a[METRICS], b[METRICS], rtol=1e-5)


def _resume(out, *extra):
    cmd, env = _cmd(out, "--resume", *extra)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


# --- the store itself ---------------------------------------------------------------------------

def test_rows_round_trip_and_damaged_rows_are_dropped(tmp_path):
    path = str(tmp_path / "t.csv")
    df = pd.DataFrame({"a": [1, 2, 3], "x": [0.1, 1 / 3, float("nan")], "s": ["p, q", "two\nlines", "r"]})
    store.write_table(df, path)
    back = store.read_table(path)
    assert list(back.columns) == ["a", "x", "s"] and back.x.iloc[1] == 1 / 3 and back.s.iloc[1] == "two lines"
    lines = open(path).read().split("\n")
    with open(path, "w") as fh:  # the last row cut mid-line, the first row's value edited
        fh.write("\n".join([lines[0], lines[1].replace("1,", "7,", 1), lines[2], lines[3][: len(lines[3]) // 2]]))
    with pytest.warns(store.DamagedRowsWarning, match=r"2 damaged row\(s\) dropped \(line\(s\) 2, 4"):
        kept = store.read_table(path)
    assert kept.a.tolist() == [2]
    open(path, "w").close()
    with pytest.warns(store.DamagedRowsWarning, match="is empty"):
        assert len(store.read_table(path, columns=["a"])) == 0


def test_a_fault_inside_the_write_keeps_the_previous_table(tmp_path, monkeypatch):
    path = str(tmp_path / "t.csv")
    store.write_table(pd.DataFrame({"a": [1]}), path)
    monkeypatch.setattr(store, "_WRITES", 0)
    monkeypatch.setenv("MESA_STORE_FAULT", "1")
    with pytest.raises(store.StoreFault):
        store.write_table(pd.DataFrame({"a": [1, 2]}), path)
    assert store.read_table(path).a.tolist() == [1]


def test_the_folder_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    with store.folder_lock(str(tmp_path), "first"):
        with pytest.raises(store.StoreLocked, match=f"pid {os.getpid()}.*first"):
            with store.folder_lock(str(tmp_path), "second"):
                pass
    assert not (tmp_path / store.LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / store.LOCK_NAME).write_text(
        f'{{"pid": {dead.pid}, "host": "{__import__("socket").gethostname()}", "command": "gone"}}')
    with pytest.warns(RuntimeWarning, match="stale"):
        with store.folder_lock(str(tmp_path), "third"):
            pass


# --- the commands, on the smoke presets --------------------------------------------------------

@pytest.mark.parametrize("n", [2, 5])
def test_a_fault_inside_the_nth_write_then_resume(tmp_path, whole, n):
    """MESA_STORE_FAULT=n: the run stops inside its n-th write (a table or a checkpoint); what was
    written before stays readable, and --resume completes the table of the uninterrupted run."""
    out = tmp_path / "run"
    cmd, env = _cmd(out)
    r = subprocess.run(cmd, env=dict(env, MESA_STORE_FAULT=str(n)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "StoreFault" in r.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error", store.DamagedRowsWarning)  # no damaged row: the fault hit a temporary
        store.read_table(str(out / "results.csv"))
    assert _resume(out).returncode == 0
    _same_table(out, whole)


def test_kills_at_random_points_then_resume(tmp_path, whole):
    """Two SIGKILLs at seeded random times of one run's life, each followed by --resume."""
    out = tmp_path / "run"
    rng = random.Random(0)
    cmd, env = _cmd(out)
    for i in range(2):
        proc = subprocess.Popen(cmd if i == 0 else cmd + ["--resume"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 12.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / store.LOCK_NAME).exists():  # the killed writer's lock: stale, taken over by the next run
            assert str(proc.pid) in (out / store.LOCK_NAME).read_text()
    r = _resume(out)
    assert r.returncode == 0, r.stderr
    _same_table(out, whole)


def test_a_truncated_last_row_is_measured_again(tmp_path, whole):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    text = (out / "results.csv").read_text().rstrip("\n")
    (out / "results.csv").write_text(text[: len(text) - 40])  # the last row cut off mid-line
    r = _resume(out)
    assert r.returncode == 0 and "1 damaged row(s) dropped" in r.stderr
    _same_table(out, whole)


def _drop_second(out) -> None:
    """The rows of the second training config removed: --resume must evaluate it from its checkpoint."""
    df = store.read_table(str(out / "results.csv"))
    store.write_table(df[df.train != "cg/steps=5/fp32"], str(out / "results.csv"))


def test_a_corrupted_checkpoint_is_refused_then_retrained(tmp_path, whole):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    _drop_second(out)
    ck = out / "ckpt" / f"{SECOND}.pt"
    raw = bytearray(ck.read_bytes())
    for i in range(8):  # eight flipped bytes inside the weights
        raw[len(raw) // 3 + 997 * i] ^= 0x40
    ck.write_bytes(bytes(raw))
    r = _resume(out)
    assert r.returncode == 2 and str(ck) in r.stderr and "damaged" in r.stderr and "--retrain" in r.stderr
    ck.write_bytes(b"")  # an empty file: refused the same way, no traceback
    r = _resume(out)
    assert r.returncode == 2 and "damaged" in r.stderr and "Traceback" not in r.stderr
    r = _resume(out, "--retrain")
    assert r.returncode == 0, r.stderr
    _same_table(out, whole)


def test_a_foreign_checkpoint_is_refused_naming_the_fields(tmp_path, whole):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    _drop_second(out)
    shutil.copy(out / "ckpt" / f"{FIRST}.pt", out / "ckpt" / f"{SECOND}.pt")  # trained with 2 CG steps, not 5
    r = _resume(out)
    assert r.returncode == 2 and "solver.steps: 2 (checkpoint) vs 5 (now)" in r.stderr
    assert _resume(out, "--retrain").returncode == 0
    _same_table(out, whole)


def test_a_second_writer_is_refused_and_the_first_finishes(tmp_path, capsys, whole):
    """The second writer runs in this process (it reaches the lock within a second of the first
    taking it, while the first trains for several)."""
    out = tmp_path / "run"
    cmd, env = _cmd(out)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / store.LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.02)
    code = main(["ablate", "--preset", "smoke", "--out", str(out), "--no-plots", "--no-progress", "--resume"])
    running = first.poll() is None
    assert code == 2 and f"pid {first.pid}" in capsys.readouterr().err and running
    assert first.wait(timeout=300) == 0
    _same_table(out, whole)


@pytest.mark.parametrize("command", ["softmax", "stability"])
def test_the_other_commands_hold_the_lock_too(tmp_path, capsys, command):
    out = str(tmp_path / "run")
    preset = "smoke" if command == "softmax" else "quick"
    with store.folder_lock(out, "a test holding the folder"):
        assert main([command, "--preset", preset, "--out", out, "--no-plots", "--no-progress"]) == 2
    assert "a test holding the folder" in capsys.readouterr().err


def test_appended_rows_are_checked_too(tmp_path):
    """The production grid's append-only log (parallel jobs append under a file lock): a torn last
    append fails its hash and is dropped on reading."""
    path = str(tmp_path / "log.csv")
    store.append_rows(pd.DataFrame({"a": [1, 2]}), path)
    store.append_rows(pd.DataFrame({"a": [3]}), path)
    with open(path, "a") as fh:
        fh.write("4,deadbeef")  # a row cut before its newline, with a wrong hash
    with pytest.warns(store.DamagedRowsWarning, match="line"):
        assert store.read_table(path).a.tolist() == [1, 2, 3]
