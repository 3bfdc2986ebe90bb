"""Attention quantities computed on a side path from captured q/k (the model keeps its fused kernel)."""

from __future__ import annotations

import torch
from einops import rearrange


def received_attention(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, query: str = "all",
                       block_elements: int | None = None) -> torch.Tensor:
    """Attention each token receives in a full (non-causal, unmasked) attention layer, mean over heads.

    q, k: (n, T, heads * hd) projections of one layer. query="all": mean over every query row
    (HiPrune's global importance); query="cls": the row of token 0 only (the CLS attention of
    VisionZip / ToDRE). Returns (n, T) in float32. The softmax rows are formed in blocks of query
    rows of at most `block_elements` scores (default: 2^20 on the CPU, where a cache-sized block is
    several times faster than one T x T pass; 2^26 on accelerators), so memory stays bounded.
    """
    qh = rearrange(q.float() * scale, "n t (h d) -> (n h) t d", h=heads)
    kt = rearrange(k.float(), "n t (h d) -> (n h) d t", h=heads)
    if query == "cls":
        qh = qh[:, :1]
    elif query != "all":
        raise ValueError(f"query must be 'all' or 'cls', got {query!r}")
    rows = qh.shape[1]
    if block_elements is None:
        block_elements = 2**20 if q.device.type == "cpu" else 2**26
    block = max(1, block_elements // (qh.shape[0] * kt.shape[2]))
    out = torch.zeros(qh.shape[0], kt.shape[2], device=q.device)
    for r0 in range(0, rows, block):
        out += (qh[:, r0:r0 + block] @ kt).softmax(-1).sum(1)
    return rearrange(out, "(n h) t -> n h t", h=heads).sum(1) / (heads * rows)


def received_attention_flops(q: torch.Tensor, k: torch.Tensor, query: str = "all") -> int:
    """Matrix FLOPs of `received_attention(q, k, ...)`: the q k^T products, 2 * n * rows * T * width
    (rows = T for query "all", 1 for "cls"), as torch's FlopCounterMode counts them."""
    n, t, width = q.shape
    rows = 1 if query == "cls" else t
    return 2 * n * rows * k.shape[1] * width

