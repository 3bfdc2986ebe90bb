"""Token importance by PageRank over one LLM layer's attention (AIM, Zhong et al., ICCV 2025, §3.2),
as the authors' code computes it: per head, the causal attention with temperature, a few power
iterations without damping from the uniform distribution, and the heads' root mean square."""

from __future__ import annotations

import torch

HEAD_CHUNK = 8  # heads per (B, h, L, L) block: bounds the side path's memory


def pagerank_importance(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scaling: float,
                        tau: float = 0.1, steps: int = 5) -> torch.Tensor:
    """(B, L) importance of every row: s_j = sqrt(mean_h p_h[j]^2), p_h = p0 M_h^steps, where
    M_h = softmax((q k^T * scaling) / tau) under the causal mask over the `rows` (B, L) that take part
    (each row of M_h sums to 1) and p0 is uniform over those rows. Mass flows from each query to the
    keys it attends, so a token many rows attend to (directly or through others) scores high.

    q: (B, H, L, hd) queries of every row with RoPE; k: (B, Hkv, L, hd) keys with RoPE (grouped heads
    are repeated). Rows outside `rows` neither send nor receive mass. Computed in float32.
    """
    b, h, length, _ = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    rows = rows.to(q.device)
    idx = torch.arange(length, device=q.device)
    allowed = rows[:, None, None, :] & rows[:, None, :, None] & (idx[None, :] <= idx[:, None])[None, None]
    p0 = rows.float() / rows.float().sum(1, keepdim=True).clamp_min(1)
    total = torch.zeros(b, length, device=q.device)
    for start in range(0, h, HEAD_CHUNK):
        qs, ks = q[:, start:start + HEAD_CHUNK].float(), k[:, start:start + HEAD_CHUNK].float()
        logits = torch.matmul(qs, ks.transpose(-1, -2)) * scaling / tau
        m = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, h, L, L)
        p = p0[:, None, None, :].expand(b, qs.shape[1], 1, length)
        for _ in range(steps):
            p = torch.matmul(p, m)
        total = total + p[:, :, 0].square().sum(1)
    return (total / h).sqrt()


def pagerank_flops(q: torch.Tensor, steps: int) -> int:
    """Matrix FLOPs of `pagerank_importance`: q k^T (2 B H L^2 hd) and the power iterations (2 B H L^2 each)."""
    b, h, length, hd = q.shape
    return 2 * b * h * length * length * (hd + steps)
