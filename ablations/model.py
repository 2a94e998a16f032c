"""The ablation language model: pre-norm blocks of :class:`kernels.MesaLayer` and a SwiGLU MLP over
bytes, with tied input / output embeddings (docs/design.md section 8).

    h_0 = E[x]                                     (E: [256, d_model] byte embedding)
    h   = h + MesaLayer(RMSNorm(h))                (per block; or CausalAttention: ``mixer="attention"``)
    h   = h + W_2 (silu(W_1 RMSNorm(h)) * W_3 RMSNorm(h))
    logits = RMSNorm(h) E^T                        (tied embeddings)

The solver of every Mesa layer is one :class:`solvers.spec.SolverSpec`; :meth:`MesaLM.set_solver`
switches it, so that a model trained with one configuration can be evaluated with another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mesa_stability.kernels.layer import MesaLayer
from mesa_stability.solvers.spec import SolverSpec

from .attention import CausalAttention
from .data import VOCAB

MIXERS = ("mesa", "attention")


def layer_spec(spec: SolverSpec, backend: str = "auto") -> SolverSpec:
    """The spec every Mesa layer of an ablation model runs: ``spec`` on ``backend``, with the accuracy
    certificate off. The ablations truncate CG on purpose (a few steps, loose tolerances) and measure
    what that costs in bits per byte; the certificate would flag every truncated solve."""
    return spec.replace(backend=backend, check=None)


@dataclass(frozen=True)
class ModelSize:
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    mlp_mult: float = 8 / 3


# named sizes: `tiny` trains on 2 CPU cores in minutes, `small` on one GPU in minutes
SIZES = {
    "tiny": ModelSize(d_model=64, n_layers=2, n_heads=2, seq_len=128),
    "small": ModelSize(d_model=256, n_layers=4, n_heads=4, seq_len=512),
}


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, size: ModelSize, solver: SolverSpec, mixer: str = "mesa", gate_init=None):
        super().__init__()
        self.norm1 = RMSNorm(size.d_model)
        if mixer == "mesa":
            self.mixer = MesaLayer(size.d_model, size.n_heads, solver=solver, gate_init=gate_init)
        else:
            self.mixer = CausalAttention(size.d_model, size.n_heads)
        self.norm2 = RMSNorm(size.d_model)
        hidden = int(round(size.mlp_mult * size.d_model / 8)) * 8
        self.mlp = SwiGLU(size.d_model, hidden)

    def forward(self, h):
        h = h + self.mixer(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class MesaLM(nn.Module):
    """Byte-level LM of Mesa blocks (``mixer="mesa"``; ``"attention"``: causal softmax attention, the
    same LM otherwise; ``gate_init``: the Mesa layers' initial forget gates, :class:`kernels.MesaLayer`);
    ``forward(x)`` returns logits ``[B, T, 256]`` (float32)."""

    def __init__(self, size: ModelSize | str = "tiny", solver: SolverSpec | None = None, backend: str = "auto",
                 mixer: str = "mesa", gate_init: tuple[float, float] | None = None):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; mixers: {MIXERS}")
        self.mixer, self.gate_init = mixer, None if gate_init is None else tuple(gate_init)
        if isinstance(size, str):
            if size not in SIZES:
                raise ValueError(f"unknown model size {size!r}; sizes: {sorted(SIZES)}")
            size = SIZES[size]
        self.size, self.backend = size, backend
        self.solver = solver or SolverSpec()
        self.embed = nn.Embedding(VOCAB, size.d_model)
        nn.init.normal_(self.embed.weight, std=size.d_model ** -0.5)
        self.blocks = nn.ModuleList(Block(size, layer_spec(self.solver, backend), mixer, gate_init)
                                    for _ in range(size.n_layers))
        self.norm = RMSNorm(size.d_model)

    def set_solver(self, solver: SolverSpec) -> None:
        """Use ``solver`` in every Mesa layer from now on (training or evaluation)."""
        self.solver = solver
        for b in self.blocks:
            if isinstance(b.mixer, MesaLayer):
                b.mixer.solver = layer_spec(solver, self.backend)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden representations ``RMSNorm(h)`` ``[B, T, d_model]``: the rows the tied
        unembedding maps to logits (in the autocast dtype, if any)."""
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ValueError(f"x must be a [B, T] tensor of byte ids, got {tuple(x.shape)} {x.dtype}")
        h = self.embed(x.long())
        for b in self.blocks:
            h = b(h)
        return self.norm(h)

    def residual_streams(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[h_0, h_1, ..., h_L, RMSNorm(h_L)]``, each ``[B, T, d_model]``: the byte embedding
        ``h_0 = E[x]``, the residual stream after each of the ``L`` blocks, and the last hidden
        representations (equal to :meth:`hidden`); in the autocast dtype, if any."""
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ValueError(f"x must be a [B, T] tensor of byte ids, got {tuple(x.shape)} {x.dtype}")
        h = self.embed(x.long())
        out = [h]
        for b in self.blocks:
            h = b(h)
            out.append(h)
        out.append(self.norm(h))
        return out

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``h E^T`` (float32) of last hidden representations ``h``."""
        return (h @ self.embed.weight.t().to(h.dtype)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.hidden(x))


def loss_per_token(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy in nats per byte of the predictive distribution ``softmax(z / T)``, ``[B, T]``
    (``T = temperature``; docs/design.md section 9: the softmax temperature study trains with ``T != 1``)."""
    if temperature != 1.0:
        logits = logits / temperature
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MIXERS", "ModelSize", "SIZES", "MesaLM", "layer_spec", "loss_per_token", "count_parameters"]
