"""Verdicts of accuracy certificates, delivered without stalling the GPU.

A certificate's verdict (does any token, or any sequence, exceed the threshold?) is one boolean on the
solve's device. Reading it on the host at the end of every call is a synchronisation: the GPU runs
dry while the host prepares the next work. On an H200 at (B, T, H, D) = (4, 2048, 16, 128) that stall
cost more than the certificate's arithmetic (docs/certificate-gpu/). So, with ``check="warn"`` on
CUDA tensors, :func:`submit` copies the verdict to pinned host memory behind a CUDA event, and it is
read once the GPU has got there:

* at the start of every later ``mesa_chunk`` / ``mesa_step`` call and of every backward
  (:func:`poll`: only the verdicts already computed, never waiting);
* when a call's stats are read (``stats.certificate``, ``stats.adjoint_certificate``: waits for
  that call's verdicts);
* by :func:`flush` (waits for all), and at interpreter exit.

A failed verdict is then resolved: refined first when a refinement is given (the kernels' tier 2,
a float64 residual from the inputs, which the call keeps until then; ``kernels.mesa`` skips it when
an input was modified in place meanwhile, by its version counter), then warned about with the call
site (file and line) of the call it concerns, whenever it is read. ``check="raise"``, and tensors
that are not on CUDA, are decided at once. Under CUDA graph capture no verdict can be read; the
certificate is still computed into the stats, and :func:`submit` says so with a warning at capture.
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .certificate import Certificate, CertificateError, CertificateWarning
from .precision import PrecisionPolicy

# Frames inside these folders (the suite's libraries, torch) are skipped when the call site of a verdict
# is recorded: as imported (through the namespace's links, or installed) and as real paths.
_INTERNAL = tuple({os.path.join(root, p) + os.sep
                   for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
                   for p in ("solvers", "kernels")}
                  | {os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
                     os.path.dirname(os.path.realpath(torch.__file__)) + os.sep})


@dataclass
class CallSite:
    """Where a checked call was made (the first frame outside this package and torch)."""

    filename: str
    lineno: int
    module: str
    registry: dict = field(repr=False, default_factory=dict)


def call_site() -> CallSite:
    """The caller's :class:`CallSite`: frames of ``solvers``, ``kernels`` and torch are skipped."""
    f = sys._getframe(1)
    while f.f_back is not None and f.f_code.co_filename.startswith(_INTERNAL):
        f = f.f_back
    reg = f.f_globals.setdefault("__warningregistry__", {})
    return CallSite(f.f_code.co_filename, f.f_lineno, f.f_globals.get("__name__", "?"), reg)


@dataclass
class Pending:
    """One submitted verdict: ``flag`` (pinned host bool, valid once ``event`` has completed)."""

    flag: torch.Tensor | None
    event: object | None
    resolve: Callable[[], None] | None
    done: bool = False


_QUEUE: deque[Pending] = deque()


def submit(certificate: Certificate | Callable[[], Certificate], mode, policy: PrecisionPolicy, *,
           refine: Callable[[], Certificate | None] | None = None,
           store: Callable[[Certificate], None] | None = None, where: CallSite | None = None,
           failed: torch.Tensor | None = None) -> Pending | None:
    """Check ``certificate`` under ``mode`` (``"warn"``, ``"raise"`` or None: nothing).

    ``certificate`` may be a function that forms it, called only if the verdict fails (with
    ``failed`` given: a decode step forms its certificate's views only for the message).

    ``refine()``: a tighter certificate (or None when none can be formed), computed only if this one
    fails; ``store(c)`` puts it where the caller keeps the certificate (the stats). ``where``: the call
    site the warning names (default: the caller's). ``failed``: the verdict as a 0-dim bool tensor when
    the caller has it already (a kernel's flags), else ``certificate.failed.any()``. Returns the
    pending verdict (``"warn"`` on CUDA), else None after deciding at once."""
    if mode is None:
        return None
    where = where or call_site()

    def resolve():
        c = certificate() if callable(certificate) else certificate
        if refine is not None:
            better = refine()
            if better is not None:
                c = better
                if store is not None:
                    store(c)
        if not c.ok:
            report(c, mode, policy, where)

    if failed is None:
        failed = (certificate() if callable(certificate) else certificate).failed.any()
    if mode == "raise" or not failed.is_cuda:
        if bool(failed):
            resolve()
        return None
    if torch.cuda.is_current_stream_capturing():
        warnings.warn("mesa: the accuracy certificate is not checked inside CUDA graph capture (its verdict "
                      "cannot be read there); read the stats' certificate after replay", CertificateWarning,
                      stacklevel=2)
        return None
    flag = _pinned_flag()
    flag.copy_(failed, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    p = Pending(flag, event, resolve)
    _QUEUE.append(p)
    return p


# Pinned host booleans of read verdicts, for reuse: allocating pinned memory (cudaHostAlloc) at every
# verdict is slow next to a decode step of ~0.1 ms (docs/decode-gpu/)
_FREE_FLAGS: list[torch.Tensor] = []


def _pinned_flag() -> torch.Tensor:
    return _FREE_FLAGS.pop() if _FREE_FLAGS else torch.empty((), dtype=torch.bool, pin_memory=True)


def report(c: Certificate, mode, policy: PrecisionPolicy, where: CallSite) -> None:
    """Raise :class:`CertificateError` or warn (:class:`CertificateWarning`, attributed to ``where``)."""
    msg = c.message(policy)
    if mode == "raise":
        raise CertificateError(msg)
    warnings.warn_explicit(msg, CertificateWarning, where.filename, where.lineno, module=where.module,
                           registry=where.registry)


def _finish(p: Pending) -> None:
    if p.done:
        return
    p.done = True
    resolve, p.resolve = p.resolve, None  # drop the inputs the refinement holds, once read
    flag, p.flag = p.flag, None
    failed = flag is not None and bool(flag)
    if flag is not None:
        _FREE_FLAGS.append(flag)  # read (its event has completed): free for the next verdict
    if failed:
        resolve()


def poll() -> None:
    """Resolve the submitted verdicts that the GPU has computed, in order, without waiting."""
    while _QUEUE and _QUEUE[0].event.query():
        _finish(_QUEUE.popleft())


def wait(pending) -> None:
    """Resolve the given verdicts (waiting for the GPU), and every earlier one."""
    todo = [p for p in pending if p is not None and not p.done]
    if not todo:
        return
    for p in todo:
        p.event.synchronize()
    poll()
    for p in todo:  # recorded on another stream than the queue's head: not popped by poll
        if p in _QUEUE:
            _QUEUE.remove(p)
        _finish(p)


def flush() -> None:
    """Resolve every submitted verdict (waits for the GPU)."""
    wait(list(_QUEUE))


def pending() -> int:
    """The number of verdicts not yet read."""
    return sum(not p.done for p in _QUEUE)


@atexit.register
def _flush_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    try:
        flush()
    except Exception as exc:  # a torn-down CUDA context: say so rather than die silently
        print(f"mesa: accuracy certificates not read at exit ({exc})", file=sys.stderr)


__all__ = ["CallSite", "Pending", "call_site", "flush", "pending", "poll", "report", "submit", "wait"]
