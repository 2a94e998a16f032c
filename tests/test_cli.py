"""The `mesa` command line."""

from __future__ import annotations

import pytest

from mesa_stability import solvers
from mesa_stability.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert solvers.__version__ in capsys.readouterr().out


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "verify" in out


def test_verify_runs_and_reports_agreement(capsys):
    assert main(["verify", "--T", "12", "--D", "4", "--policies", "fp64", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "exact (fp64) vs mpmath" in out and "chebyshev" in out and "fp32" in out


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--policies", "fp8"])
    assert exc.value.code == 2
    assert main(["verify", "--T", "0"]) == 2
    assert "error" in capsys.readouterr().err


def test_an_internal_error_is_not_reported_as_a_usage_error(monkeypatch):
    """A ValueError from inside a command is a bug: it propagates with its traceback (exit 1 from the
    command line), it is not turned into 'error: ...' and exit 2."""
    import mesa_stability.cli as cli

    def broken(args):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(cli, "_cmd_verify", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["verify"])


def test_golden_checks_the_committed_fingerprints_and_names_a_changed_case(tmp_path, capsys):
    import json

    from mesa_stability.stability import golden

    assert main(["golden"]) == 0
    assert "golden cases match" in capsys.readouterr().out
    copy = tmp_path / "golden.json"
    # `--write` on two of the cases (each needs its 50-digit mpmath solve, ~1.5 s; the check above
    # covered all of them): the file written has their entries and passes the check
    refs = [golden.reference(golden.BY_NAME[n]) for n in ("tiny_lambda", "low_rank_keys")]
    assert golden.check_or_write(write=True, path=str(copy), refs=refs) == 0
    written, committed = json.loads(copy.read_text()), golden.load_committed()
    assert set(written) == {"tiny_lambda", "low_rank_keys"}
    for name, entry in written.items():
        assert entry["input_sha256"] == committed[name]["input_sha256"]
        assert entry["exact_vs_mpmath"] <= 1e-12  # the float64 reference against mpmath, as committed
    assert golden.check_or_write(path=str(copy), refs=refs) == 0
    data = json.loads(copy.read_text())
    data["tiny_lambda"]["fingerprints"]["o"][0] *= 1 + 1e-6
    copy.write_text(json.dumps(data))
    assert golden.check_or_write(path=str(copy), refs=refs) == 1
    assert "tiny_lambda" in capsys.readouterr().out


def test_a_file_as_out_and_an_interrupt_are_reported_without_a_traceback(tmp_path, monkeypatch, capsys):
    import mesa_stability.cli as cli

    f = tmp_path / "a-file"
    f.write_text("")
    assert main(["stability", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_ablate", interrupted)
    assert main(["ablate", "--preset", "smoke", "--out", str(tmp_path / "run")]) == 130
    assert "rerun with --resume" in capsys.readouterr().err


def test_verify_writes_its_table_and_takes_lower_case_size_flags(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["verify", "--t", "12", "--d", "4", "--policies", "fp64", "--out", str(out)]) == 0
    import pandas as pd

    df = pd.read_csv(out / "verify.csv")
    assert set(df.method) >= {"exact", "cg"} and (df["T"] == 12).all() and "commit" in df
    assert "Provenance:" in (out / "verify.md").read_text()
    assert main(["verify", "--T", "12", "--D", "4", "--policies", "fp64"]) == 0  # the upper-case spelling too
    assert main(["verify", "--t", "0"]) == 2


def test_quiet_prints_nothing_but_still_writes_the_results(tmp_path, capsys):
    assert main(["--quiet", "verify", "--t", "8", "--d", "4", "--policies", "fp64", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "verify.csv").exists()
    assert main(["-q", "verify", "--t", "0"]) == 2 and "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["verify", "--t", "8", "--d", "4"], ["guard"], ["stability", "--preset", "gpu"],
                                     ["ablate", "--preset", "smoke"], ["softmax", "--preset", "smoke"]])
def test_every_command_takes_device_and_refuses_a_missing_gpu(command, tmp_path, monkeypatch, capsys):
    """--device is a flag of every command that computes; naming CUDA where there is none is a usage
    error (exit 2) with a message, not a traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "cuda" in capsys.readouterr().err.lower()


def test_verify_ends_with_a_verdict_and_fails_a_wrong_solver(monkeypatch, capsys):
    """PASS with the count of checks (exit 0); a CG whose output is off by 1e-3 (far above the fp64
    budget 8 u kappa + 2 u) is a FAIL naming the row, exit 1; Sherman-Morrison is judged against its
    own problem, not Mesa's."""
    assert main(["verify", "--t", "12", "--d", "4", "--policies", "fp64"]) == 0
    out = capsys.readouterr().out
    assert "PASS: 6 checks within budget (the mpmath check and 5 solver rows)" in out and "rel_err_o_own" in out
    real = solvers.solve

    def off(problem, method="exact", policy=None, **opts):
        res = real(problem, method, policy, **opts)
        if method == "cg":
            res.o = res.o * (1 + 1e-3)
        return res

    monkeypatch.setattr(solvers, "solve", off)
    assert main(["verify", "--t", "12", "--d", "4", "--policies", "fp64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("FAIL: 2 check(s) above budget") and "cg steps=200,tol=1e-10 fp64" in err
