"""`pool`: 2-D average pooling of each image's token grid down to the budget (baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange

from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.select import grid_factor
from vtoken.reducers.base import Reducer, Selection, Stage, StageInput
from vtoken.registry import register


@register("pool")
@dataclass
class Pool(Reducer):
    """Average-pool the visual grid (boundary stage, on the tokens that enter the LLM).

    `keep` tokens are laid out as an (h', w') grid with h' * w' == keep and the aspect closest to the
    image's grid (576 -> 64 is 8x8 on LLaVA-1.5's 24x24); windows follow
    `torch.nn.functional.adaptive_avg_pool2d` (they overlap by one row/column when the grid does not
    divide evenly). Each pooled token sits at the position id of its window's first (top-left)
    token and carries the window area as its size.
    """

    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = 64

    def select(self, x: StageInput) -> Selection:
        n = x.features.shape[1]
        keep = torch.zeros_like(x.valid)
        values = x.features.clone()
        sizes = x.sizes.clone()
        # Images are grouped by grid shape so each group is pooled in one batched call.
        groups: dict[tuple[tuple[int, int], int], list[int]] = {}
        for i, (grid, k) in enumerate(zip(x.grids, x.keep)):
            groups.setdefault((grid, k), []).append(i)
        for ((rows, cols), k), members in groups.items():
            if rows * cols > n:
                raise ParameterError("pool needs the full grid of each image; apply it before other reducers")
            try:
                h, w = grid_factor(k, rows, cols)
            except ValueError as e:
                raise BudgetError(f"pool: {e}; choose a keep with a factor pair close to {rows}x{cols}") from e
            ids = torch.tensor(members, device=x.features.device)
            grid = rearrange(x.features[ids, : rows * cols], "m (r c) d -> m d r c", r=rows, c=cols)
            pooled = F.adaptive_avg_pool2d(grid.float(), (h, w)).to(x.features.dtype)
            r0 = torch.arange(h) * rows // h
            c0 = torch.arange(w) * cols // w
            r1 = -((-(torch.arange(h) + 1) * rows) // h)
            c1 = -((-(torch.arange(w) + 1) * cols) // w)
            rep = (r0[:, None] * cols + c0[None, :]).reshape(-1).to(x.features.device)
            area = ((r1 - r0)[:, None] * (c1 - c0)[None, :]).reshape(-1).to(sizes)
            rows_idx = ids[:, None].expand(-1, h * w)
            keep[rows_idx, rep] = True
            values[rows_idx, rep] = rearrange(pooled, "m d h w -> m (h w) d")
            sizes[rows_idx, rep] = area
        return Selection(keep=keep, values=values, sizes=sizes)
