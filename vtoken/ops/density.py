"""Density-peak clustering with k nearest neighbours (DPC-kNN; Du et al., 2016), as HoliTom's code merges
tokens with it: centres are the tokens with the highest density x distance-to-denser product, every
other token joins its nearest centre, and a centre with members becomes a weighted mix of itself and
their mean."""

from __future__ import annotations

import math

import torch


def dpc_knn(x: torch.Tensor, clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (ascending indices, (c,)) and each token's centre (position in that list, (n,)).

    dist(i, j) = ||x_i - x_j|| / sqrt(d); rho_i = exp(-mean of the squared distances to its k nearest
    tokens, itself included); delta_i = the distance to the nearest denser token (the densest: the
    largest distance overall); score = rho * delta. The authors break density ties with unseeded
    noise; vtoken breaks them by index (a lower index counts as denser), so results are deterministic.
    """
    n, d = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(d)
    near = dist.topk(min(k, n), dim=-1, largest=False).values
    rho = (-(near**2).mean(-1)).exp()
    idx = torch.arange(n, device=x.device)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    delta = dist.masked_fill(~denser, float("inf")).amin(-1)
    delta = torch.where(denser.any(-1), delta, dist.max())
    score = rho * delta
    order = (-score).argsort(stable=True)  # ties: the lower index
    centres = order[:clusters].sort().values
    assign = dist[:, centres].argmin(-1)  # first centre on ties
    assign[centres] = torch.arange(len(centres), device=x.device)
    return centres, assign


def merge_into_centres(x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, beta: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, d) merged tokens: beta * centre + (1 - beta) * mean of its members (itself excluded); a centre
    without members stays as it is. Also (c, n) the weights of the inputs in each merged token."""
    c, n = len(centres), x.shape[0]
    member = torch.zeros(c, n, device=x.device)
    member[assign, torch.arange(n, device=x.device)] = 1.0
    member[torch.arange(c, device=x.device), centres] = 0.0
    count = member.sum(-1, keepdim=True)
    own = torch.zeros(c, n, device=x.device)
    own[torch.arange(c, device=x.device), centres] = 1.0
    weights = torch.where(count > 0, beta * own + (1 - beta) * member / count.clamp_min(1), own)
    return (weights @ x.float()).to(x.dtype), weights
