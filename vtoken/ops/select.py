"""Selection primitives shared by the pruning reducers (batched over images, no Python loops)."""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the `k[i]` highest scores in each row `i` (ties: lower index first).

    scores: (n, N); k: (n,) long, per-row counts; valid: (n, N) bool, slots that may be chosen.
    The mask keeps the original token order implicitly (it is a mask, not an index list).
    """
    s = scores.float()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    mask = rank < k.to(s.device).unsqueeze(-1)
    if valid is not None:
        mask &= valid
    return mask


def grid_factor(keep: int, rows: int, cols: int) -> tuple[int, int]:
    """A (h, w) with h * w == keep, h <= rows, w <= cols, whose aspect is closest to rows / cols."""
    best: tuple[float, int, int] | None = None
    target = rows / cols
    for h in range(1, keep + 1):
        if keep % h:
            continue
        w = keep // h
        if h > rows or w > cols:
            continue
        err = abs((h / w) / target - 1) + abs((w / h) * target - 1)
        if best is None or err < best[0]:
            best = (err, h, w)
    if best is None:
        raise ValueError(f"{keep} tokens cannot be laid out as a grid inside {rows}x{cols}")
    return best[1], best[2]
