"""Every user-facing error path of the ``mesa`` command, through the real CLI in a subprocess (``python -m
mesa_stability``): its exit status (2 for a usage error, 130 for an interrupt, 1 for a failed check) and its
one-line message, with no traceback."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD = ["guard", "--device", "cpu", "--cases", "well_conditioned", "--properties", "--no-backward", "--no-progress"]


def mesa(*args, env=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mesa_stability", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("flags,message", [
    (["--steps", "-5"], "SolverSpec.steps must be an int >= 0, got -5"),
    (["--tol", "0"], "SolverSpec.tol must be None or a float in (0, 1), got 0.0"),
    (["--tol", "-1"], "SolverSpec.tol must be None or a float in (0, 1), got -1.0"),
    (["--cases", "no_such_case"], "--cases ['no_such_case']"),
])
def test_guard_usage_errors_exit_2(flags, message):
    r = mesa(*GUARD, *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_verify_usage_error_and_verdict(tmp_path):
    r = mesa("verify", "--t", "-1")
    assert r.returncode == 2 and "--T must be a positive integer, got -1" in r.stderr
    r = mesa("verify", "--t", "8", "--d", "4", "--policies", "fp64")
    assert r.returncode == 0 and "PASS:" in r.stdout


def test_a_file_as_out_is_a_usage_error(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    r = mesa("stability", "--preset", "quick", "--out", str(f))
    assert r.returncode == 2 and f"--out {f} is a file" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_exits_130_with_the_resume_hint(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mesa_stability", "ablate", "--preset", "smoke", "--out", str(out),
                             "--no-plots", "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "ckpt").exists() and time.time() < deadline:  # training has started
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, err
    r = mesa("ablate", "--preset", "smoke", "--out", str(out), "--no-plots", "--no-progress")
    assert r.returncode == 2 and "pass --resume" in r.stderr  # a rerun does not silently start over


def test_a_short_run_scales_its_warmup():
    r = mesa("ablate", "--preset", "smoke", "--train-steps", "40", "--help")
    assert r.returncode == 0
    r = mesa("ablate", "--preset", "paper-gpu", "--train-steps", "40", "--warmup", "50", "--out", "/nonexistent/x")
    assert r.returncode == 2 and "warmup" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="needs an environment without Triton")
def test_the_kernels_without_triton_are_one_install_message():
    r = mesa(*GUARD, env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 2 and "pip install triton" in r.stderr and "violate" not in r.stderr, r.stderr
