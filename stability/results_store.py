"""Results that survive crashes, concurrent runs and damaged files: the one store of the
long-running commands (``mesa stability``, ``mesa ablate``, ``mesa softmax``).

* **Atomic writes.** A table (``results.csv``) or a file (a checkpoint, ``study.json``) is written
  whole into a temporary file in the same folder, flushed and ``fsync``-ed, then renamed over the
  old one (``os.replace``, atomic on POSIX) and the folder ``fsync``-ed: a kill at any point leaves
  the old file or the new one, never a part of either.
* **Per-row integrity.** Every table row ends with ``row_sha256``, the SHA-256 of the row's own CSV
  text (its line without that last field). On reading, a row counts only if its line is complete
  and its hash verifies; a damaged row (cut off, edited, NaN-filled by a partial write) is dropped
  with a :class:`DamagedRowsWarning` naming the file and the lines, so that ``--resume`` measures it
  again. String cells are written without line breaks, so that a row is one line.
* **One writer per folder.** :func:`folder_lock` creates ``OUT/.mesa-lock`` exclusively (``O_EXCL``),
  holding the writer's pid, host, command and start time; a second writer gets
  :class:`StoreLocked` naming the holder. A lock whose process is gone (same host, pid not running)
  is stale: it is taken over, with a warning.
* **Fault injection.** With the environment variable ``MESA_STORE_FAULT=N`` the N-th write of this
  process raises :class:`StoreFault` after half of the temporary file is written, before the
  rename: the tests' stand-in for a kill inside the write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import time
import warnings

HASH_COLUMN = "row_sha256"
LOCK_NAME = ".mesa-lock"


class StoreLocked(RuntimeError):
    """Another process writes to this output folder."""


class StoreFault(RuntimeError):
    """An injected fault inside a write (``MESA_STORE_FAULT``)."""


class DamagedRowsWarning(UserWarning):
    """Rows of a results table that failed their integrity check and were dropped."""


_WRITES = 0


def _fault_now() -> bool:
    global _WRITES
    _WRITES += 1
    want = os.environ.get("MESA_STORE_FAULT")
    return want is not None and want.strip().isdigit() and _WRITES == int(want)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fault = _fault_now()
    with open(tmp, "wb") as fh:
        if fault:
            fh.write(data[:len(data) // 2])
            fh.flush()
            raise StoreFault(f"injected fault inside the write of {path} (MESA_STORE_FAULT)")
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # the rename itself made durable (not every filesystem allows it)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def write_table(df, path: str) -> None:
    """Write the DataFrame ``df`` to ``path`` atomically, every row ending with its ``row_sha256``."""
    header, lines = _lines(df)
    out = [f"{header},{HASH_COLUMN}"] + [f"{line},{sha256(line)}" for line in lines]
    atomic_write(path, ("\n".join(out) + "\n").encode())


def _lines(df) -> tuple[str, list[str]]:
    """The CSV header and data lines of ``df`` (string cells without line breaks: one row, one line)."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    df = df.drop(columns=[HASH_COLUMN], errors="ignore").copy()
    for col in df.columns:
        if is_object_dtype(df[col]) or is_string_dtype(df[col]):
            df[col] = df[col].map(lambda x: x.replace("\r", " ").replace("\n", " ") if isinstance(x, str) else x)
    text = df.to_csv(index=False, lineterminator="\n")
    header, *lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    return header, lines


def append_rows(df, path: str) -> None:
    """Append the rows of ``df`` to the table at ``path`` (its header first in a new file), each with
    its ``row_sha256``, then flush and ``fsync``: an append-only log whose torn last line fails its hash.
    Concurrent appenders must hold a common lock (``stability.production`` does). A table written
    before the hash column is appended to in its own format."""
    header, lines = _lines(df)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    hashed = True
    if not new:
        with open(path, encoding="utf-8", errors="replace") as fh:
            hashed = fh.readline().rstrip("\n").endswith("," + HASH_COLUMN)
    out = ([f"{header},{HASH_COLUMN}"] if new else []) + [f"{ln},{sha256(ln)}" if hashed else ln for ln in lines]
    if _fault_now():
        raise StoreFault(f"injected fault before an append to {path} (MESA_STORE_FAULT)")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_table(path: str, *, columns: list[str] | None = None, **read_csv):
    """The rows of ``path`` that pass their integrity check (module docstring), without the hash
    column; an empty table (with ``columns``) when the file does not exist. A file without the hash
    column (written before it) is read as it is. ``read_csv``: options of ``pandas.read_csv``."""
    import pandas as pd

    if not os.path.exists(path):
        return pd.DataFrame(columns=columns or [])
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    if not text.strip():
        warnings.warn(f"{path} is empty (a write was interrupted before this store wrote it): no rows kept",
                      DamagedRowsWarning, stacklevel=2)
        return pd.DataFrame(columns=columns or [])
    header, *lines = text.rstrip("\n").split("\n")
    if not header.endswith("," + HASH_COLUMN):
        return pd.read_csv(io.StringIO(text), **read_csv)
    good, bad = [], []
    for n, line in enumerate(lines, start=2):
        body, _, digest = line.rpartition(",")
        if body and digest == sha256(body):
            good.append(body)
        else:
            bad.append(n)
    if bad:
        warnings.warn(f"{path}: {len(bad)} damaged row(s) dropped (line(s) {', '.join(map(str, bad[:10]))}"
                      f"{' ...' if len(bad) > 10 else ''}; their integrity hash does not match): they will be "
                      "measured again", DamagedRowsWarning, stacklevel=2)
    body = header.rpartition(",")[0] + "\n" + "".join(line + "\n" for line in good)
    return pd.read_csv(io.StringIO(body), **read_csv)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, under another user
        return True
    return True


@contextlib.contextmanager
def folder_lock(out: str, command: str | None = None):
    """Hold ``out``'s writer lock for the block (module docstring)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as fh:
                    holder = json.load(fh)
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                warnings.warn(f"{path}: the lock of pid {holder['pid']} (not running) is stale; taking it over",
                              RuntimeWarning, stacklevel=3)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')} "
                   f"({holder.get('command', '?')})")
            raise StoreLocked(f"{out} is being written by {who}: wait for it to finish or use another --out "
                              f"(if that process is gone, remove {path})") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


__all__ = ["DamagedRowsWarning", "HASH_COLUMN", "StoreFault", "StoreLocked", "append_rows", "atomic_write",
           "folder_lock", "read_table", "sha256", "write_table"]
