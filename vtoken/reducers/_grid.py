"""Helpers for reducers that need each image's full token grid (boundary stage)."""

from __future__ import annotations

from collections import defaultdict

import torch

from vtoken.errors import ParameterError
from vtoken.reducers.base import StageInput


def require_full_grid(x: StageInput, name: str) -> None:
    """Raise unless every image still has its whole grid, in raster order (nothing reduced before)."""
    for (h, w), n in zip(x.grids, x.valid.sum(1).tolist()):
        if n != h * w:
            raise ParameterError(
                f"{name} reads each image's full token grid; it must be the first reducer to act "
                f"(an image reached it with {n} of its {h * w} tokens)"
            )


def by_grid(x: StageInput) -> dict[tuple[int, int], torch.Tensor]:
    """Indices of the images sharing each grid shape (so each group is processed in one batched op)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, g in enumerate(x.grids):
        groups[g].append(i)
    return {g: torch.tensor(ids, device=x.features.device) for g, ids in groups.items()}
