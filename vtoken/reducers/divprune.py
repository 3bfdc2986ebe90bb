"""`divprune`: keep a maximally diverse subset of each image's tokens (boundary stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtoken.ops.diversity import greedy_diverse
from vtoken.reducers.base import Reducer, Selection, Stage, StageInput
from vtoken.registry import register


@register("divprune")
@dataclass
class DivPrune(Reducer):
    """DivPrune (Alvar et al., CVPR 2025), following the official code: on the projected visual
    tokens (the LLM's input embeddings), with cosine distance d = 1 - cos, solve the max-min
    diversity problem greedily — start from the most isolated token (the largest distance to its
    nearest neighbour), then repeatedly add the token farthest from the selected set. Survivors
    keep raster order and their original position ids. Similarities are computed in float32 (the
    official code uses the model dtype).
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = 64

    def select(self, x: StageInput) -> Selection:
        xn = F.normalize(x.features.float(), dim=-1)
        sim = xn @ xn.transpose(1, 2)
        pair_ok = x.valid[:, :, None] & x.valid[:, None, :]
        pair_ok &= ~torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)
        nearest = sim.masked_fill(~pair_ok, float("-inf")).amax(-1)  # similarity to the nearest neighbour
        first = nearest.masked_fill(~x.valid, float("inf")).argmin(1)
        return Selection(keep=greedy_diverse(x.features, x.valid, x.keep, first, "maxmin"))
