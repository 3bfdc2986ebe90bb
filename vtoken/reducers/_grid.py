"""Helpers for reducers that need each image's full token grid (boundary stage)."""

from __future__ import annotations

from collections import defaultdict

import torch

from vtoken.errors import ParameterError
from vtoken.reducers.base import StageInput


def require_full_grid(x: StageInput, name: str) -> None:
    """Raise unless every image still has its whole grid (nothing reduced before)."""
    counts = x.counts if x.counts is not None else x.valid.sum(1).tolist()
    for (h, w), n in zip(x.grids, counts):
        if n != h * w:
            raise ParameterError(
                f"{name} reads each image's full token grid; it must be the first reducer to act "
                f"(an image reached it with {n} of its {h * w} tokens)"
            )


def mix_from_grid(x: StageInput, mix: torch.Tensor) -> torch.Tensor:
    """A merge's weights in grid space (n_img, G, G): kept raster position -> input raster position,
    to slot space (n_img, N, N) (`Selection.mix`)."""
    rows = from_grid(x, mix)  # (n_img, N, G)
    return from_grid(x, rows.transpose(1, 2)).transpose(1, 2)


def by_grid(x: StageInput) -> dict[tuple[int, int], torch.Tensor]:
    """Indices of the images sharing each grid shape (so each group is processed in one batched op)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, g in enumerate(x.grids):
        groups[g].append(i)
    return {g: torch.tensor(ids, device=x.features.device) for g, ids in groups.items()}


def to_grid(x: StageInput, values: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """Slot-aligned values (n_img, N, ...) -> grid-aligned (n_img, G, ...) with G = max rows * cols,
    placing each selectable token at its raster position (pinned / padded slots are left out)."""
    g = max(h * w for h, w in x.grids)
    out = torch.full((values.shape[0], g + 1, *values.shape[2:]), fill, dtype=values.dtype, device=values.device)
    idx = torch.where(x.valid, x.positions, g)
    view = idx.view(*idx.shape, *([1] * (values.dim() - 2))).expand_as(values)
    out.scatter_(1, view, values)
    return out[:, :g]


def from_grid(x: StageInput, grid: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """Grid-aligned values (n_img, G, ...) -> slot-aligned (n_img, N, ...) (fill on pinned / padded slots)."""
    pad = torch.cat([grid, torch.full_like(grid[:, :1], fill)], 1)
    idx = torch.where(x.valid, x.positions.clamp_max(grid.shape[1] - 1), grid.shape[1])
    view = idx.view(*idx.shape, *([1] * (grid.dim() - 2))).expand(*idx.shape, *grid.shape[2:])
    return pad.gather(1, view)
