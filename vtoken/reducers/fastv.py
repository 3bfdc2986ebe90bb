"""`fastv`: prune image tokens inside the LLM by the attention the last prompt token pays them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vtoken.errors import ParameterError
from vtoken.ops.select import topk_mask
from vtoken.reducers.base import Reducer, Selection, SignalRequest, Stage, StageInput
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
    to `keep`.
    """

    stage: ClassVar[Stage] = "decoder"
    keep: int | float | None = 0.5
    k: int = 2
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None:
            if not (0.0 <= self.ratio < 1.0):
                raise ParameterError(f"fastv: ratio (R, fraction dropped) must be in [0, 1), got {self.ratio}")
            self.keep = 1.0 - self.ratio if self.ratio > 0 else 1.0
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ParameterError(f"fastv: k (the pruning layer) must be an int >= 1, got {self.k!r}")

    @property
    def layer(self) -> int:
        return self.k

    def signals(self) -> tuple[SignalRequest, ...]:
        return (SignalRequest("llm_attention", layer=self.k - 1, query="last"),)

    def select(self, x: StageInput) -> Selection:
        scores = x.signal(self.signals()[0])
        return Selection(keep=topk_mask(scores, x.keep_tensor(), x.valid))
