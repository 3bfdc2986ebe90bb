"""`tome`: ToMe's bipartite soft matching inside the vision tower (encoder stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import (
    MergePlan,
    bipartite_plan,
    tome_schedule,
)
from vtoken.reducers.merging import EncoderMerge, _solve_keep
from vtoken.registry import register


@register("tome")
@dataclass
class ToMe(EncoderMerge):
    """ToMe (Bolya et al., ICLR 2023): bipartite soft matching on the layer's keys (mean over heads,
    cosine), r merges per layer into size-weighted averages, CLS protected, proportional attention,
    merging after the attention residual and before the MLP (as the official code).

    r: int (same every layer), (r, inflection) (ToMe's `parse_r`), or a list per layer. `keep`
    instead solves an even schedule that leaves exactly `keep` tokens. LLaVA-1.5: r = 8 / 16 / 21 on
    the 23 layers up to the feature layer leave 392 / 208 / 93 tokens. Unmerged A tokens stay in
    index order before the B tokens (the official code does this when a CLS token is present).
    """

    r: int | tuple[int, float] | list[int] | None = None
    _schedule: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is None and self.keep is None:
            self.r = 8
        if self.r is not None and self.keep is not None:
            raise ParameterError("tome: give either r (merges per layer) or keep (tokens left), not both")
        if isinstance(self.r, int) and self.r < 0:
            raise BudgetError(f"tome: r must be >= 0, got {self.r}")

    def _solve(self) -> None:
        if self.keep is not None:
            self._schedule = _solve_keep("tome", self.keep, self._tokens, self._layers, self._prefix)
        else:
            self._schedule = tome_schedule(self.r, self._layers)

    @property
    def schedule(self) -> list[int]:
        return list(self._schedule)

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        r = self._schedule[layer] if layer < len(self._schedule) else 0
        if r <= 0:
            return None
        return bipartite_plan(metric, counts, [r] * len(counts), protect=self._prefix)[0]


# PiToMe as the authors' code runs it on each backbone (hchautran/PiToMe, algo/pitome/patch/):
#   timm  - deit.py + timm.py: margin 0.75 - 0.75 l/L; `pitome_bsm` (energy-sorted bipartite) in the
#           first ceil(L/2) blocks, energy merging after; keys (mean over heads); merge between the
#           attention residual and the MLP; size-weighted averages; no proportional attention (the
#           block calls attention without the sizes).
#   lavis - clip.py (LAVIS CLIP = the open_clip architecture): margin 0.95 - 0.95 l/L; energy merging
#           in every block, measured on the token states after the attention residual; size-weighted;
#           plain attention.
#   hf    - clip_hf.py (HF CLIPEncoder, used for LLaVA): margin 0.9 - 0.9 l/L over all encoder layers;
#           layers 0..L/2 plain ToMe matching with the count taken over all tokens (CLS included),
#           energy merging after; the metric is the layer's output states and the merge follows the
#           whole layer (after the MLP); plain means; plain attention.
