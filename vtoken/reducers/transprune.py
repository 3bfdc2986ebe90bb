"""`transprune`: prune image tokens inside the LLM by token transition variation (+ instruction attention)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.select import topk_mask
from vtoken.reducers.base import (
    ModelInfo,
    Reducer,
    Selection,
    Share,
    SignalRequest,
    Stage,
    StageInput,
    check_range,
    scaled,
)
from vtoken.registry import register

# Official schedule for 32-layer LLMs (LLaVA-1.5 / NeXT): prune after layers 7, 9, 12 (1-based), i.e.
# before 0-based layers 7, 9, 12, keeping 87.5% / 62.5% / 12.5% of the image tokens; TTV accumulates
# from the 7th layer (0-based 6).
_SCHEDULE_32 = ((7, 0.875), (9, 0.625), (12, 0.125))
_ACCUMULATE_32 = 6


@register("transprune")
@dataclass
class TransPrune(Reducer):
    """TransPrune (arXiv 2507.20630), following the official LLaVA code:

    - TTV per sub-block (attention, MLP): |T_out| / |T_in| * softmax(1 - cos(T_out, T_in)) with T_in
      the normalised input and T_out the output before the residual, softmax over all the sample's
      tokens; summed over both sub-blocks and over the layers from `accumulate_from` up to the
      pruning layer (`abs_direction=True` uses the paper's 1 - |cos|);
    - IGA at a pruning point before layer p: attention of the instruction rows (the text after the
      image) to each image token in layer p (its norm, q/k and RoPE on the incoming states), causal,
      mean over heads and instruction rows (`iga=False`: TTV only);
    - score = TTV / sum(TTV) + IGA / sum(IGA) over the image's tokens; keep the top
      int(ratio * N) (N = image tokens entering the LLM) in original order.
    `schedule` is ((layer, ratio), ...) with 0-based layers; the default is the official one for
    32-layer LLMs, scaled to other depths. `keep` overrides the last step's count (an int, or a fraction
    of the image tokens entering the LLM); earlier steps never keep fewer tokens than it, so `keep=1.0`
    keeps every token. The official code re-numbers position ids after pruning; vtoken keeps the
    originals unless `renumber=True`.
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "decoder"
    keep: int | float | None = None
    schedule: tuple[tuple[int, float], ...] | None = None
    accumulate_from: int | None = None
    iga: bool = True
    abs_direction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()  # iga / abs_direction bools, accumulate_from an int: checked there
        check_range(self, "accumulate_from", lo=0)
        if self.schedule is not None:
            self.schedule = _parse_schedule(self.schedule)
            self._check_schedule()

    def _check_schedule(self) -> None:
        layers = [layer for layer, _ in self.schedule]
        ratios = [r for _, r in self.schedule]
        if not layers or any(b <= a for a, b in pairwise(layers)) or layers[0] < 1:
            raise ParameterError(f"transprune: schedule layers must be increasing and >= 1, got {layers}")
        if any(not 0 < r <= 1 for r in ratios) or any(b > a for a, b in pairwise(ratios)):
            raise ParameterError(f"transprune: schedule ratios must be in (0, 1] and non-increasing, got {ratios}")

    def configure(self, info: ModelInfo) -> None:
        depth = info.llm_layers
        if self.schedule is None:
            layers: list[int] = []
            for layer, _ in _SCHEDULE_32:
                layer = max(1, round(layer * depth / 32), (layers[-1] + 1) if layers else 1)
                layers.append(layer)
            self.schedule = tuple(zip(layers, (r for _, r in _SCHEDULE_32)))
        self._check_schedule()
        if self.schedule[-1][0] >= depth:
            raise BudgetError(f"transprune: layer {self.schedule[-1][0]} does not exist (the LLM has {depth}); "
                              f"pass a schedule whose layers are < {depth}")
        if self.accumulate_from is None:
            self.accumulate_from = min(round(_ACCUMULATE_32 * depth / 32), self.schedule[0][0] - 1)
        if not 0 <= self.accumulate_from < self.schedule[0][0]:
            raise ParameterError(f"transprune: accumulate_from={self.accumulate_from} must come before the first "
                                 f"pruning layer ({self.schedule[0][0]}); pass 0 <= accumulate_from < "
                                 f"{self.schedule[0][0]}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in (self.schedule or _SCHEDULE_32))

    def signals(self) -> tuple[SignalRequest, ...]:
        start = _ACCUMULATE_32 if self.accumulate_from is None else self.accumulate_from
        out = [SignalRequest("ttv", start, "abs" if self.abs_direction else "signed")]
        if self.iga:
            out += [SignalRequest("llm_attention_pre", layer, "instruction") for layer in self.layers]
        return tuple(out)

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        sched = dict(self.schedule or _SCHEDULE_32)
        entry = n if entry is None else entry
        final = None if self.keep is None else resolve_keep(scaled(self.keep, share), entry)
        if layer == self.layers[-1] and final is not None:
            k = final
        else:
            k = int(entry * sched[layer])
            if final is not None:  # earlier steps never go below the final budget
                k = max(k, final)
        if k > n:
            raise BudgetError(
                f"transprune: {k} tokens requested before layer {layer} but only {n} of the image's {entry} remain "
                f"(another reducer acted before); pass a smaller keep (<= {n}) or a fraction, or reduce less before"
            )
        return max(k, 1) if n else 0

    def select(self, x: StageInput) -> Selection:
        ttv_req, *iga_reqs = self.signals()
        score = x.signal(ttv_req).float().masked_fill(~x.valid, 0)
        score = score / score.sum(1, keepdim=True).clamp_min(1e-8)
        if self.iga:
            req = next(r for r in iga_reqs if r.layer == x.layer)
            iga = x.signal(req).float().masked_fill(~x.valid, 0)
            score = score + iga / iga.sum(1, keepdim=True).clamp_min(1e-8)
        return Selection(keep=topk_mask(score, x.keep_tensor(), x.valid))


def _parse_schedule(schedule: Any) -> tuple[tuple[int, float], ...]:
    """((layer, ratio), ...) from any sequence of pairs; ParameterError naming the expected form."""
    form = "a sequence of (layer, ratio) pairs, e.g. ((7, 0.875), (9, 0.625), (12, 0.125))"
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise ParameterError(f"transprune: schedule must be {form}, got {schedule!r}")
    out = []
    for step in schedule:
        if isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or len(step) != 2:
            raise ParameterError(f"transprune: schedule must be {form}; step {step!r} is not a pair")
        layer, ratio = step
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ParameterError(f"transprune: schedule layers must be ints (0-based LLM layers), got {layer!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
            raise ParameterError(f"transprune: schedule ratios must be numbers in (0, 1], got {ratio!r}")
        out.append((int(layer), float(ratio)))
    return tuple(out)
