"""Attention received from chosen query rows of a causal LLM layer, on a side path from its q / k."""

from __future__ import annotations

import torch


def query_rows(query: str, prompt: torch.Tensor, image: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) row indices of the query tokens and which of them are real, with Q <= `bound` fixed on
    the host (no device read).

    prompt: (B, L) rows of the prompt; image: (B, L) image id per row (-1 for text). query "last":
    the last prompt row (FastV); "instruction": the prompt rows after the sample's last image
    (TransPrune's IGA, ToDRE's t->v); "visual": the visual rows (ToDRE's v->t).
    """
    length = prompt.shape[1]
    rows = torch.arange(length, device=prompt.device)
    if query == "last":
        last = torch.where(prompt, rows, -1).amax(1)
        return last.clamp_min(0)[:, None], (last >= 0)[:, None]
    if query == "instruction":
        qmask = instruction_rows(prompt, image)
    elif query == "visual":
        qmask = prompt & (image >= 0)
    else:
        raise ValueError(f"unknown query {query!r} for LLM attention (use 'last', 'instruction', 'visual')")
    bound = max(1, min(bound, length))
    idx = (~qmask).int().argsort(dim=1, stable=True)[:, :bound]  # query rows first, in order
    return idx, qmask.gather(1, idx)


def instruction_rows(prompt: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(B, L) the prompt rows after each sample's last visual row (the instruction)."""
    rows = torch.arange(prompt.shape[1], device=prompt.device)
    last_img = torch.where(image >= 0, rows, -1).amax(1)
    return prompt & (rows[None] > last_img[:, None])


def received_from_queries(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, qvalid: torch.Tensor,
                          keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, L) attention probability each key row receives, mean over heads and over the real query
    rows: softmax(q k^T * scaling) under the causal + key mask, as eager attention computes it.

    q: (B, H, Q, hd) queries of rows `idx` (B, Q) with their RoPE applied; k: (B, Hkv, L, hd) keys with
    RoPE (grouped-query heads are repeated); qvalid: (B, Q) real query rows; keys: (B, L) rows that
    may be attended. Computed in float32.
    """
    length = k.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, Q, L)
    rows = torch.arange(length, device=k.device)
    allowed = keys[:, None, None, :] & (rows[None, None, None, :] <= idx[:, None, :, None])
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)  # (B, Q, L)
    w = qvalid.float()
    return (probs * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


def received_from_queries_flops(q: torch.Tensor, length: int) -> int:
    """Matrix FLOPs of `received_from_queries`: the q k^T products, 2 * B * H * Q * L * hd (the
    softmax-weighted sum is not formed)."""
    b, h, nq, hd = q.shape
    return 2 * b * h * nq * length * hd
