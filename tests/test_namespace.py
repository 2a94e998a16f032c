"""One import namespace (mesa_stability): the packages live under it, nothing else is installed at the
top level, and the libraries never import the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("solvers", "kernels", "stability", "ablations")


def test_the_packages_are_the_top_level_folders_under_one_name():
    import mesa_stability

    for name in LIBRARIES:
        link = os.path.join(ROOT, "mesa_stability", name)
        assert os.path.realpath(link) == os.path.join(ROOT, name), name
    assert mesa_stability.__version__
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        cfg = tomllib.load(fh)
    assert cfg["tool"]["setuptools"]["packages"] == ["mesa_stability", *(f"mesa_stability.{p}" for p in LIBRARIES),
                                                     "mesa_stability.compat"]
    assert cfg["project"]["scripts"]["mesa"] == "mesa_stability.cli:main"


def test_importing_everything_registers_no_top_level_library_module():
    code = ("import sys, mesa_stability.kernels, mesa_stability.solvers, mesa_stability.stability.guard, "
            "mesa_stability.ablations.grid, mesa_stability.cli; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {LIBRARIES!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.strip() == "[]"


def test_the_libraries_never_import_the_cli_or_a_bare_package_name():
    bare = re.compile(rf"^\s*(from|import) ({'|'.join(LIBRARIES)})\b", re.M)
    for lib in LIBRARIES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, lib)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                text = open(os.path.join(dirpath, f)).read()
                assert "mesa_stability.cli" not in text and "from ..cli" not in text, f
                assert not bare.search(text), f"{f}: imports a library by its bare name"
