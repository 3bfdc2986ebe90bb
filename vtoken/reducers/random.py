"""`random`: keep a seeded random subset of each image's tokens (baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtoken.ops.seeded import prepare, seeded_uniform
from vtoken.ops.select import topk_mask
from vtoken.reducers.base import Reducer, Selection, Stage, StageInput, check_range
from vtoken.registry import register


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
        prepare(self.seed)  # drawn here, outside any forward (see vtoken.ops.seeded)

    def select(self, x: StageInput) -> Selection:
        n0 = max(h * w for h, w in x.grids)
        scores = seeded_uniform(self.seed, n0, x.features.device)[x.positions.clamp(0, n0 - 1)]
        return Selection(keep=topk_mask(scores, x.keep_tensor(), x.valid))
