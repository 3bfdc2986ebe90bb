"""Encoder-stage token merging: the base of `tome`, `pitome`, `dymu` (one file each).

These act inside every ViT layer up to the one whose output is used (the LLaVA feature layer, or
the last block of a timm / open_clip tower). The adapter calls `plan()` per layer with the layer's
metric (`metric_kind`: the keys, mean over heads; PiToMe's presets may use the token states) and
applies the plan between the attention residual and the MLP (the papers' placement; PiToMe's HF
preset merges the layer output, as the authors' LLaVA patch), with proportional attention (log size
added to the attention logits) through the attention mask, so SDPA stays in use. In a VLM each
merged group then reaches the LLM as one token (`MergedGroups`, at the boundary).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import MergePlan, representatives, solve_schedule
from vtoken.reducers.base import ModelInfo, Reducer, Selection, Share, Stage, StageInput


@dataclass
class EncoderMerge(Reducer):
    """Base of the encoder-stage mergers.

    keep: tokens per image that leave the tower (solved into a per-layer schedule).
    proportional: add log(size) to attention logits (ToMe §3 "proportional attention").
    vtu: in the LLM, unmerge virtually (DyMU VTU): "expand" or "exact"; None: merged tokens reach the
         LLM as one token each, at the position id of their first (smallest) source position.
    """

    stage: ClassVar[Stage] = "encoder"
    keep: int | float | None = None
    proportional: bool = True
    vtu: Literal["expand", "exact"] | None = None
    _layers: int = field(default=0, init=False, repr=False)  # layers that merge (0..feature layer)
    _depth: int = field(default=0, init=False, repr=False)  # all layers of the tower
    _tokens: int = field(default=0, init=False, repr=False)  # patch tokens entering the tower
    _prefix: int = field(default=1, init=False, repr=False)
    _into_llm: bool = field(default=False, init=False, repr=False)  # the tower feeds an LLM

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vtu not in (None, "expand", "exact"):
            raise ParameterError(f"{self.name}: vtu must be None, 'expand' or 'exact', got {self.vtu!r}")

    @property
    def metric_kind(self) -> Literal["keys", "states", "output"]:
        """What `plan()` is given: "keys" (the layer's keys, mean over heads; merge before the MLP),
        "states" (the tokens after the attention residual; merge before the MLP) or "output" (the
        layer's output; merge after the MLP)."""
        return "keys"

    @property
    def weighted(self) -> bool:
        """Size-weighted averages (ToMe); False: plain means of the merged tokens."""
        return True

    def configure(self, info: ModelInfo) -> None:
        if info.vision_layers is None or info.vision_tokens is None:
            raise ParameterError(f"{self.name} merges inside a vision transformer; {info.family} has none")
        self._layers = (info.feature_layer + 1) if info.feature_layer is not None else info.vision_layers
        self._depth = info.vision_layers
        self._tokens = info.vision_tokens
        self._prefix = info.prefix_tokens
        self._into_llm = info.llm_layers > 0
        self._solve()

    @property
    def prefix_tokens(self) -> int:
        return self._prefix

    def parts(self) -> list[Reducer]:
        """In a VLM, the merged groups then reach the LLM one token each (`MergedGroups`, boundary)."""
        if not self._into_llm:
            return [self]
        return [self, MergedGroups(fixed=self.output_tokens(), patches=self._tokens)]

    def output_tokens(self) -> int | None:
        """Patch tokens leaving the tower per image when the schedule alone fixes them (every merger but
        a content-adaptive one: DyMU), found by planning each layer on a placeholder metric (a plan's
        counts are host ints computed from the counts entering it, never from the metric's values)."""
        if self.adaptive:
            return None
        probe = copy.deepcopy(self)  # planning may record state (DyMU's calibration sums): not on this one
        counts = [self._tokens + self._prefix]
        for layer in range(self._layers):
            metric = torch.arange(counts[0] * 8, dtype=torch.float32).sin().view(1, counts[0], 8)
            plan = probe.plan(layer, metric, counts)
            if plan is not None:
                counts = list(plan.counts)
        return counts[0] - self._prefix

    def _solve(self) -> None:
        """Resolve what depends on the number of tokens entering the tower (`_tokens`)."""

    def resized(self, tokens: int) -> EncoderMerge:
        """This reducer for a tower run with `tokens` patch tokens (timm `dynamic_img_size`): a copy whose
        token-dependent schedule is solved again (itself if the count is the configured one)."""
        if tokens == self._tokens:
            return self
        other = self.thawed()
        other._tokens = tokens
        other._solve()
        other.__dict__["_frozen"] = self.__dict__.get("_frozen", False)
        return other

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        return n  # encoder merging sets the count; boundary/decoder budgets apply to what it leaves

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        """The merge of `layer` (None: no merge there). metric: (B, T, c), see `metric_kind`."""
        raise NotImplementedError


def _solve_keep(name: str, keep: int | float, tokens: int, layers: int, prefix: int) -> list[int]:
    try:
        return solve_schedule(tokens, resolve_keep(keep, tokens), layers, prefix)
    except ValueError as e:
        raise BudgetError(f"{name}: {e}") from None


@dataclass
class MergedGroups(Reducer):
    """Internal boundary step after encoder merging: each merged group reaches the LLM as one token,
    its representative (the group's first, i.e. smallest, raster position) with the group's size.
    An encoder merger in a VLM adds it (`EncoderMerge.parts`); it runs first at the boundary. The
    count depends on the image unless the merger's schedule fixes it (`fixed` groups of an image of
    `patches` tokens: ToMe / PiToMe), which keeps the count a host int (graph-safe prefills)."""

    counts_tested: ClassVar[bool] = True
    order: ClassVar[int] = -1
    internal: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    adaptive: ClassVar[bool] = True
    keep: int | float | None = 1.0
    fixed: int | None = None
    patches: int = 0

    def static_count(self) -> int | None:
        return self.fixed

    def signals(self):
        from vtoken.reducers.base import SignalRequest

        return (SignalRequest("encoder_groups", -1),)

    def select(self, x: StageInput) -> Selection:
        group = x.signal(self.signals()[0]).long()  # (n_img, N) merged token of each raster position
        rep, size = representatives(group, x.valid, x.positions)
        keep = x.valid & (rep == x.positions)
        if self.fixed is not None and all(c == self.patches for c in x.counts):
            counts = [self.fixed] * len(x.counts)  # whole tower images (checked on the device by the stage)
        else:  # LLaVA-NeXT's unpadded crops, DyMU: read back
            counts = keep.sum(1).tolist()
        return Selection(keep=keep, sizes=size.to(x.sizes.dtype), counts=counts)
