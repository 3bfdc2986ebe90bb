"""Attention quantities computed on a side path from captured q/k (the model keeps its fused kernel)."""

from __future__ import annotations

import torch
from einops import rearrange


def received_attention(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, query: str = "all",
                       head_chunk: int = 4) -> torch.Tensor:
    """Attention each token receives in a full (non-causal, unmasked) attention layer, mean over heads.

    q, k: (n, T, heads * hd) projections of one layer. query="all": mean over every query row
    (HiPrune's global importance); query="cls": the row of token 0 only (the CLS attention of
    VisionZip / ToDRE). Returns (n, T) in float32; heads are processed in chunks to bound memory.
    """
    qh = rearrange(q.float(), "n t (h d) -> n h t d", h=heads)
    kh = rearrange(k.float(), "n t (h d) -> n h t d", h=heads)
    if query == "cls":
        qh = qh[:, :, :1]
    elif query != "all":
        raise ValueError(f"query must be 'all' or 'cls', got {query!r}")
    out = torch.zeros(q.shape[0], k.shape[1], device=q.device)
    for h0 in range(0, heads, head_chunk):
        p = (qh[:, h0:h0 + head_chunk] @ kh[:, h0:h0 + head_chunk].transpose(-1, -2) * scale).softmax(-1)
        out += p.mean(2).sum(1)
    return out / heads


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(n, 2) float64 sum and sum of squares of each (…)-block of `x` (n, …): identifies identical tensors."""
    flat = x.reshape(x.shape[0], -1).double()
    return torch.stack([flat.sum(1), (flat * flat).sum(1)], 1)
