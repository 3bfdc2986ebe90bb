"""`pool`: 2-D average pooling of each image's token grid down to the budget (baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtoken.ops.select import grid_factor
from vtoken.reducers._grid import from_grid, mix_from_grid, require_full_grid, to_grid
from vtoken.reducers.base import Reducer, Selection, Stage, StageInput
from vtoken.registry import register


@register("pool")
@dataclass
class Pool(Reducer):
    """Average-pool the visual grid (boundary stage, on the tokens that enter the LLM).

    `keep` tokens are laid out as an (h', w') grid with h' * w' == keep and the aspect closest to the
    image's grid (576 -> 64 is 8x8 on LLaVA-1.5's 24x24), windows as in
    `torch.nn.functional.adaptive_avg_pool2d`. When no such factor pair fits (a prime budget, or an
    odd dynamic-resolution grid), the grid is cut into h' row bands whose tokens are split over the
    columns as evenly as possible (bands of w' or w' + 1 windows), still exactly `keep` tokens.
    Each pooled token sits at the position id of its window's first (top-left) token and carries the
    window area as its size.
    """

    counts_tested: ClassVar[bool] = True
    grid_shape: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    full_grid: ClassVar[bool] = True
    keep: int | float | None = 64

    def select(self, x: StageInput) -> Selection:
        require_full_grid(x, self.name)
        feats = to_grid(x, x.features)  # (n_img, G, d) in raster order of each image's grid
        keep = torch.zeros(feats.shape[:2], dtype=torch.bool, device=feats.device)
        values = feats.clone()
        sizes = torch.zeros(feats.shape[:2], dtype=x.sizes.dtype, device=feats.device)
        g = feats.shape[1]
        mix = torch.zeros(feats.shape[0], g, g, device=feats.device) if x.want_mix else None
        groups: dict[tuple[tuple[int, int], int], list[int]] = {}
        for i, (grid, k) in enumerate(zip(x.grids, x.keep)):
            groups.setdefault((grid, k), []).append(i)
        for ((rows, cols), k), members in groups.items():  # one batched computation per grid and budget
            ids = torch.tensor(members, device=feats.device)
            grid = feats[ids, : rows * cols].reshape(len(members), rows, cols, -1)
            wins = torch.tensor(windows(k, rows, cols), device=feats.device)  # (k, 4): r0, r1, c0, c1
            # window sums from a 2-D prefix sum: every window in one gather
            csum = torch.zeros(len(members), rows + 1, cols + 1, grid.shape[-1], device=feats.device)
            csum[:, 1:, 1:] = grid.float().cumsum(1).cumsum(2)
            r0, r1, c0, c1 = wins.unbind(1)
            total = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
            area = ((r1 - r0) * (c1 - c0)).to(total.dtype)
            rep = r0 * cols + c0
            rows_idx = ids[:, None].expand(-1, k)
            keep[rows_idx, rep] = True
            values[rows_idx, rep] = (total / area[None, :, None]).to(feats.dtype)
            sizes[rows_idx, rep] = area.to(sizes.dtype)
            if mix is not None:  # each window's mean as weights over the grid (windows may overlap)
                inside = _members(wins, rows, cols).to(mix.dtype) / area[:, None].to(mix.dtype)
                mix[rows_idx, rep, : rows * cols] = inside[None].expand(len(members), -1, -1)
        return Selection(keep=from_grid(x, keep, False), values=from_grid(x, values),
                         sizes=from_grid(x, sizes), mix=None if mix is None else mix_from_grid(x, mix))


def _members(wins: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(k, rows * cols) bool: which raster positions each window (r0, r1, c0, c1) covers."""
    r0, r1, c0, c1 = wins.unbind(1)
    rr = torch.arange(rows, device=wins.device)
    cc = torch.arange(cols, device=wins.device)
    in_r = (rr >= r0[:, None]) & (rr < r1[:, None])
    in_c = (cc >= c0[:, None]) & (cc < c1[:, None])
    return (in_r[:, :, None] & in_c[:, None, :]).reshape(len(wins), rows * cols)


def windows(k: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """The k pooling windows (r0, r1, c0, c1) of a rows x cols grid (see `Pool`)."""
    try:
        h, w = grid_factor(k, rows, cols)
        if max(h / w, w / h) > 2 * max(rows / cols, cols / rows):
            raise ValueError("too elongated")
        widths = [w] * h
    except ValueError:
        h = max(1, min(rows, k, round(math.sqrt(k * rows / cols))))
        while -(-k // h) > cols:  # every band needs at most `cols` windows
            h += 1
        widths = [k // h + (1 if i < k % h else 0) for i in range(h)]
    out = []
    for i, w in enumerate(widths):
        r0, r1 = i * rows // h, -((-(i + 1) * rows) // h)
        out += [(r0, r1, j * cols // w, -((-(j + 1) * cols) // w)) for j in range(w)]
    return out
