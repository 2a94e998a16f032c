"""Causal softmax attention as a sequence mixer of the ablation LM: the baseline arm of the recall study.

The same projections and short causal convolutions as :class:`kernels.MesaLayer` (so that the two
arms differ in the mixer alone), then scaled dot-product attention over all earlier tokens:

    q = silu(conv4(W_q u)),  k = silu(conv4(W_k u)),  v = W_v u         (per head, D = d_model / H)
    o_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(D)) v_s,            y = W_o o

(``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True``: FlashAttention on a
GPU). No positional encoding: the short convolution gives each key its neighbours, which is what
associative recall needs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from mesa_stability.kernels.layer import CONV_SIZE


class CausalAttention(nn.Module):
    """Causal multi-head softmax attention, ``forward(u [B,T,d_model]) -> [B,T,d_model]``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_conv = nn.Conv1d(d_model, d_model, CONV_SIZE, groups=d_model, bias=False)
        self.k_conv = nn.Conv1d(d_model, d_model, CONV_SIZE, groups=d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.last_steps = None  # no solver: nothing to report (the LM's evaluation reads this)

    @staticmethod
    def _conv(conv: nn.Conv1d, x):
        """Causal depthwise convolution over time of ``x [B,T,C]`` (left zero padding)."""
        return conv(F.pad(x.transpose(1, 2), (CONV_SIZE - 1, 0))).transpose(1, 2)

    def forward(self, u):
        if u.dim() != 3:
            raise ValueError(f"u must be a [B,T,d_model] tensor, got {tuple(u.shape)}")
        B, T, _ = u.shape
        H, D = self.n_heads, self.head_dim
        q = F.silu(self._conv(self.q_conv, self.q_proj(u))).view(B, T, H, D).transpose(1, 2)
        k = F.silu(self._conv(self.k_conv, self.k_proj(u))).view(B, T, H, D).transpose(1, 2)
        v = self.v_proj(u).view(B, T, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
