"""`random`: keep a seeded random subset of each image's tokens (baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtoken.ops.select import topk_mask
from vtoken.reducers.base import Reducer, Selection, Stage, StageInput, check_range
from vtoken.registry import register

_TABLE = 8192  # scores drawn at construction: enough for any image grid of the supported families


@register("random")
@dataclass
class RandomPrune(Reducer):
    """Keep `keep` tokens per image chosen uniformly at random (boundary stage).

    The random scores are a fixed function of `seed` and the token's raster position, so an image
    keeps the same subset whatever batch it is in and however often it is run (and every image of
    the same grid size keeps the same positions for a given seed: change `seed` to draw another).
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = 64
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()  # seed: an int (checked there)
        check_range(self, "seed", -(2**63), 2**64, hi_open=True)  # what torch.Generator.manual_seed takes
        self._tables: dict[tuple[int, str], torch.Tensor] = {}
        self._table(_TABLE)

    def _table(self, n: int) -> torch.Tensor:
        """The seed's first >= n uniform scores on the CPU. torch.rand(n) is a prefix of torch.rand(N) for
        one seed, so one long table serves every grid; it is drawn here, outside any forward, because a
        torch.Generator made while torch.compile traces breaks the graph."""
        key = (self.seed, "cpu")  # the cache may be shared by copies (configured, thawed)
        if key not in self._tables or self._tables[key].numel() < n:
            g = torch.Generator().manual_seed(self.seed)
            self._tables[key] = torch.rand(max(n, _TABLE), generator=g)
        return self._tables[key]

    def _scores(self, n: int, device: torch.device) -> torch.Tensor:
        key = (self.seed, str(device))
        table = self._tables.get(key)
        if table is None or table.numel() < n:
            table = self._table(n).to(device)
            if not torch.compiler.is_compiling():
                self._tables[key] = table
        return table[:n]

    def select(self, x: StageInput) -> Selection:
        n0 = max(h * w for h, w in x.grids)
        scores = self._scores(n0, x.features.device)[x.positions.clamp(0, n0 - 1)]
        return Selection(keep=topk_mask(scores, x.keep_tensor(), x.valid))
