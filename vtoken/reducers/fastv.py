"""`fastv`: prune image tokens inside the LLM by the attention the last prompt token pays them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtoken.errors import BudgetError
from vtoken.ops.select import topk_mask
from vtoken.reducers.base import Reducer, Selection, SignalRequest, Stage, StageInput, check_fields, check_range
from vtoken.registry import register


@register("fastv")
@dataclass
class FastV(Reducer):
    """FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"), decoder stage.

    Before LLM layer `k` (0-based; the paper's K = 2), each image token is scored by the attention it
    receives from the last prompt token in layer k-1, averaged over heads (paper §4.2, following the
    official code's "inplace" variant that reads layer K-1's attention). The top
    `keep` (default 0.5, i.e. R = 50% dropped) survive in their original order with their original
    position ids. The attention is computed on a side path from layer k-1's q/k with its RoPE, so the
    model keeps SDPA / FlashAttention. `ratio` is the paper's R (fraction dropped) as an alternative
    to `keep` (keep = 1 - ratio); give one of them, not both.
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "decoder"
    keep: int | float | None = None  # None: 0.5, or 1 - ratio
    k: int = 2
    ratio: float | None = None

    def __post_init__(self) -> None:
        check_fields(self)  # types first: the budget below is computed from them
        check_range(self, "k", lo=1)
        if self.ratio is not None:
            check_range(self, "ratio", 0.0, 1.0, hi_open=True, error=BudgetError)
            from_ratio = 1.0 - self.ratio
            if self.keep is not None and self.keep != from_ratio:  # keep = 1 - ratio (a re-built copy) is fine
                raise BudgetError(
                    f"fastv: keep={self.keep!r} and ratio={self.ratio!r} are two budgets; pass keep (tokens or "
                    "fraction kept) or ratio (fraction dropped, the paper's R), not both"
                )
            self.keep = from_ratio
        elif self.keep is None:
            self.keep = 0.5
        super().__post_init__()

    @property
    def layer(self) -> int:
        return self.k

    def signals(self) -> tuple[SignalRequest, ...]:
        return (SignalRequest("llm_attention", layer=self.k - 1, query="last"),)

    def select(self, x: StageInput) -> Selection:
        scores = x.signal(self.signals()[0])
        return Selection(keep=topk_mask(scores, x.keep_tensor(), x.valid))
