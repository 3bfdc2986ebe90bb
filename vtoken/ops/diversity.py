"""Greedy diversity selection over token features (k-center / max-min and max-sum), batched over images.

Both are O(N k d): k greedy steps, each one batched tensor op over all images (a (n, N, d) x (n, d)
product and a masked argmin). Images with smaller budgets simply stop being updated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAIRWISE_LIMIT = 4096  # tokens per image up to which the N x N similarity table is precomputed


def greedy_diverse(
    x: torch.Tensor,
    valid: torch.Tensor,
    k: list[int],
    first: torch.Tensor,
    mode: str = "maxmin",
    reference: torch.Tensor | None = None,
    has_reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select k[i] tokens of image i, starting from token `first[i]`, that are spread out in feature space.

    x: (n, N, d) features (cosine similarity is used: they are L2-normalised here); valid: (n, N);
    k: budget per image (host ints); first: (n,) index of the first pick (the pivot).
    mode="maxmin" (k-center / farthest point): each step adds the token whose highest similarity to
      the selected set is lowest — argmin_j max_{s in S} cos(x_j, x_s).
    mode="maxsum": each step adds the token whose summed similarity to the selected set is lowest —
      argmin_j sum_{s in S} cos(x_j, x_s) (ToDRE v2).
    reference: (n, d) with has_reference (n,) bool: for those images the selected set starts as this
      one outside feature (a pivot chosen elsewhere, e.g. in the base view of a LLaVA-NeXT crop)
      instead of token `first`, so all k picks are made by the greedy rule.
    Returns the (n, N) bool selection mask.
    """
    n, big_n, _ = x.shape
    device = x.device
    xn = F.normalize(x.float(), dim=-1)
    rows = torch.arange(n, device=device)
    chosen = torch.zeros(n, big_n, dtype=torch.bool, device=device)
    steps = max(k, default=0) - (1 if reference is None else 0)  # loop picks (host ints: no device read)
    k = torch.tensor(k, device=device, dtype=torch.long)
    active = k > 0
    seeded = torch.zeros(n, dtype=torch.bool, device=device) if has_reference is None else has_reference.to(device)
    chosen[rows, first] = active & ~seeded
    picked = chosen.any(1).long()  # picks made so far per image
    # all pairwise similarities at once when they fit (one matmul, then each step reads a row);
    # otherwise one (N x d) product per step
    table = xn @ xn.transpose(1, 2) if big_n <= PAIRWISE_LIMIT else None

    def similarity(col: torch.Tensor) -> torch.Tensor:
        if table is not None:
            return table[rows, col]
        return torch.einsum("nid,nd->ni", xn, xn[rows, col])

    score = similarity(first).clone()  # max (maxmin) or sum (maxsum) of similarities to the selected set
    if reference is not None:
        ref = torch.einsum("nid,nd->ni", xn, F.normalize(reference.float(), dim=-1))
        score = torch.where(seeded[:, None], ref, score)
    blocked = chosen | ~valid
    for _ in range(steps):
        cand = score.masked_fill(blocked, float("inf")).argmin(1)
        take = active & (picked < k)
        chosen[rows, cand] |= take
        blocked[rows, cand] = True
        picked += take.long()
        sim = similarity(cand)
        score = torch.maximum(score, sim) if mode == "maxmin" else score + sim
    return chosen & valid
