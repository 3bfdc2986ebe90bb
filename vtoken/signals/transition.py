"""Token transition variation (TransPrune, arXiv 2507.20630, Eq. 1-2)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def token_transition(t_in: torch.Tensor, t_out: torch.Tensor, rows: torch.Tensor,
                     variant: str = "signed") -> torch.Tensor:
    """TTV of one sub-block (attention or MLP) for every row: |T_out| / |T_in| * softmax(1 - cos(T_out, T_in)),
    the softmax over each sample's `rows` (B, L) (0 elsewhere).

    t_in: the sub-block's (normalised) input, t_out: its output before the residual, (B, L, d).
    variant "signed" uses 1 - cos (the official code); "abs" the paper's 1 - |cos|. float32, no
    autograd graph (a selection signal, not part of the model's function).
    """
    t_in, t_out = t_in.detach().float(), t_out.detach().float()
    mag = t_out.norm(dim=-1) / t_in.norm(dim=-1).clamp_min(1e-12)
    cos = F.cosine_similarity(t_out, t_in, dim=-1)
    direction = 1 - (cos.abs() if variant == "abs" else cos)
    rows = rows.to(direction.device)
    ttv = mag * direction.masked_fill(~rows, float("-inf")).softmax(-1).nan_to_num(0.0)
    return ttv.masked_fill(~rows, 0)
