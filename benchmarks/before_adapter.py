"""The Mesa kernels as they stood before the current changes, importable next to the new ones.

``.before/`` (next to ``benchmarks/``) holds plain copies of the earlier ``kernels`` and ``solvers``
packages. They are loaded here under the private package names ``_mesa_before.kernels`` and
``_mesa_before.solvers``, so that both generations live in one process:

* while they load, every ``sys.modules`` entry named ``solvers``, ``solvers.*``, ``kernels`` or
  ``kernels.*`` (the new packages) is set aside and restored afterwards, untouched: the new packages
  keep their module objects, and no old module is ever registered under a public name;
* every absolute import of ``solvers...`` or ``kernels...`` inside the old modules, at load time and
  at call time (the old ``kernels.chunk_bwd`` imports ``solvers.get_policy`` inside its functions),
  resolves to the private package: each old module gets its own ``__import__`` that rewrites the name
  (``from solvers import get_policy`` -> ``from _mesa_before.solvers import get_policy``). Relative
  imports resolve through the private package names by themselves.

:func:`mesa_chunk_before` is the old op with the call shape of the new ``kernels.mesa_chunk`` (for
``mesa guard --impl benchmarks.before_adapter:mesa_chunk_before``): it drops the options the old op
lacks (``check``, ``check_tol``: it has no accuracy certificate, so its results can never be
flagged) and maps the policy: ``"auto"`` did not exist, the old default was ``"bf16x3"``; a policy
object is passed on by name.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

BEFORE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".before")
PRIVATE = "_mesa_before"  # private root package of the old tree
PACKAGES = ("solvers", "kernels")  # loaded in this order (kernels imports solvers)
OLD_DEFAULT_POLICY = "bf16x3"  # the old kernels' default policy (they have no "auto")
# The last commit before the accuracy certificate, the auto policy and the fp32 state fix: the
# "before" of docs/trust-gpu and docs/production-gpu.
BEFORE_REV = "4224cd4"
DROPPED_OPTIONS = ("check", "check_tol")  # options of the new op that the old one lacks

_real_import = builtins.__import__


def _public(name: str) -> bool:
    return name.partition(".")[0] in PACKAGES


def _redirected_import(name, globals=None, locals=None, fromlist=(), level=0):
    """``__import__`` of the old modules: absolute ``solvers...`` / ``kernels...`` -> the private package."""
    if level == 0 and _public(name):
        mod = _real_import(f"{PRIVATE}.{name}", globals, locals, fromlist, 0)
        # `import solvers.x` binds the top package: the private `solvers`, not the private root
        return mod if fromlist else sys.modules[f"{PRIVATE}.{name.partition('.')[0]}"]
    return _real_import(name, globals, locals, fromlist, level)


_BUILTINS = dict(vars(builtins), __import__=_redirected_import)


class _Loader(importlib.machinery.SourceFileLoader):
    """A source loader that hands the module the redirecting ``__import__`` before its code runs
    (functions capture their builtins when they are created)."""

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__["__builtins__"] = _BUILTINS
        super().exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``_mesa_before.<package>[.<module>]`` in ``.before/``; nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] != PRIVATE or len(parts) < 2 or parts[1] not in PACKAGES:
            return None
        base = os.path.join(BEFORE_DIR, *parts[1:])
        if os.path.isdir(base):
            file, locations = os.path.join(base, "__init__.py"), [base]
        elif os.path.isfile(base + ".py"):
            file, locations = base + ".py", None
        else:
            return None
        return importlib.util.spec_from_file_location(fullname, file, loader=_Loader(fullname, file),
                                                      submodule_search_locations=locations)


def _module_names(package: str) -> list[str]:
    """The package and every module file in it (all are loaded up front: nothing loads lazily later)."""
    folder = os.path.join(BEFORE_DIR, package)
    files = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")
    return [f"{PRIVATE}.{package}"] + [f"{PRIVATE}.{package}.{f}" for f in files]


def snapshot(rev: str | None = None) -> str:
    """``BEFORE_DIR``, first written from git if it is missing: ``git archive REV kernels solvers
    stability`` unpacked there, REV = ``$MESA_BEFORE_REV`` or :data:`BEFORE_REV`. (A machine without the
    repository's history, such as a GPU host that receives only the working tree, needs the folder
    carried instead.)"""
    if os.path.isdir(os.path.join(BEFORE_DIR, "kernels")):
        return BEFORE_DIR
    import io
    import subprocess
    import tarfile

    rev = rev or os.environ.get("MESA_BEFORE_REV", BEFORE_REV)
    repo = os.path.dirname(BEFORE_DIR)
    try:
        data = subprocess.run(["git", "archive", "--format=tar", rev, *PACKAGES, "stability"], cwd=repo,
                              capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise ImportError(f"no snapshot of the earlier kernels at {BEFORE_DIR}/kernels, and git could not write "
                          f"one from {rev} ({err}); carry the folder or set MESA_BEFORE_REV") from err
    os.makedirs(BEFORE_DIR, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        try:
            tar.extractall(BEFORE_DIR, filter="data")
        except TypeError:  # Python without extraction filters (before 3.10.12 / 3.11.4): our own archive
            tar.extractall(BEFORE_DIR)
    return BEFORE_DIR


def load(reload: bool = False) -> dict[str, types.ModuleType]:
    """Load the old ``solvers`` and ``kernels`` (once; ``reload=True`` loads them afresh) and return them
    by their old public names (``"kernels.mesa"`` -> the old module); the snapshot is written from git
    first when it is missing (:func:`snapshot`)."""
    snapshot()
    if reload:
        for name in [n for n in sys.modules if n == PRIVATE or n.startswith(PRIVATE + ".")]:
            del sys.modules[name]
    if f"{PRIVATE}.kernels" not in sys.modules:
        saved = {n: m for n, m in sys.modules.items() if _public(n)}
        for n in saved:
            del sys.modules[n]
        root = types.ModuleType(PRIVATE, "the Mesa kernels and solvers before the current changes")
        root.__path__ = []  # children come from _Finder only
        sys.modules[PRIVATE] = root
        finder = _Finder()
        sys.meta_path.insert(0, finder)
        try:
            for package in PACKAGES:
                for name in _module_names(package):
                    importlib.import_module(name)
        except BaseException:
            for name in [n for n in sys.modules if n == PRIVATE or n.startswith(PRIVATE + ".")]:
                del sys.modules[name]
            raise
        finally:
            sys.meta_path.remove(finder)
            for n in [n for n in sys.modules if _public(n)]:  # nothing public may appear while loading
                del sys.modules[n]
            sys.modules.update(saved)
    prefix = PRIVATE + "."
    return {n[len(prefix):]: m for n, m in sys.modules.items() if n.startswith(prefix)}


def _policy_name(policy) -> str:
    name = getattr(policy, "name", policy)
    if not isinstance(name, str):
        raise TypeError(f"policy must be a name or a PrecisionPolicy, got {type(policy).__name__}")
    return OLD_DEFAULT_POLICY if name == "auto" else name


def mesa_chunk_before(q, k, v, g, beta, lam, **kw):
    """The old ``kernels.mesa_chunk`` with the new call shape: ``check`` and ``check_tol`` dropped, the
    policy mapped (``"auto"`` or absent -> ``"bf16x3"``, a policy object -> its name). Returns what the
    old op returns (its stats have ``steps``, ``residual``, ``x``; no certificate)."""
    for name in DROPPED_OPTIONS:
        kw.pop(name, None)
    kw["policy"] = _policy_name(kw.get("policy", OLD_DEFAULT_POLICY))
    return load()["kernels.mesa"].mesa_chunk(q, k, v, g, beta, lam, **kw)


load()

__all__ = ["BEFORE_DIR", "DROPPED_OPTIONS", "OLD_DEFAULT_POLICY", "load", "mesa_chunk_before"]
