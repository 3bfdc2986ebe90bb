"""`none`: keeps every token. The unreduced reference with vtoken's statistics (tokens, FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtoken.reducers.base import Reducer, Selection, Stage, StageInput
from vtoken.registry import register


@register("none")
@dataclass
class Identity(Reducer):
    """Keeps all visual tokens; outputs are bit-identical to the unpatched model (tested)."""

    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = 1.0

    def select(self, x: StageInput) -> Selection:
        return Selection(keep=x.valid.clone())
