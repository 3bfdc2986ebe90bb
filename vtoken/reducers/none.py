"""`none`: keeps every token. The unreduced reference with vtoken's statistics (tokens, FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtoken.errors import ParameterError
from vtoken.reducers.base import Reducer, Selection, Stage, StageInput
from vtoken.registry import register


@register("none")
@dataclass
class Identity(Reducer):
    """Keeps all visual tokens; outputs are bit-identical to the unpatched model (tested)."""

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    keeps_all: ClassVar[bool] = True
    keep: int | float | None = 1.0

    def __post_init__(self) -> None:
        if self.keep is None:
            self.keep = 1.0
        super().__post_init__()
        if not (isinstance(self.keep, float) and self.keep == 1.0):  # int 1 = one token
            raise ParameterError(
                f"none keeps every visual token and takes no budget (got keep={self.keep!r}); "
                "drop `keep`, or pick a reducer such as 'random' or 'pool' to keep fewer tokens"
            )

    def select(self, x: StageInput) -> Selection:
        return Selection(keep=x.valid.clone())
