"""`hiprune`: hierarchical attention pruning from the vision encoder (boundary stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtoken.ops.select import topk_mask
from vtoken.reducers._grid import by_grid, from_grid, require_full_grid, to_grid
from vtoken.reducers.base import ModelInfo, Reducer, Selection, SignalRequest, Stage, StageInput, check_range
from vtoken.registry import register

# object layer as a fraction of the tower's depth: layer 9 of CLIP-L's 24 (paper §4); the middle block on
# Qwen2.5-VL's windowed ViT (the official Qwen code)
OBJECT_LAYER = {"qwen-vit": 0.5}


def neighbours(anchors: torch.Tensor, rows: int, cols: int, wrap: bool) -> torch.Tensor:
    """The 4-neighbourhood (+-1, +-cols) of the anchors, (m, rows*cols) bool, anchors excluded.

    wrap=False: true spatial neighbours (no wrap across rows, nothing outside the grid).
    wrap=True: the official code's flat index arithmetic: a-1 / a+1 wrap to the previous / next
    row, and indices clamped into [0, N-1] (so an anchor in the first / last row adds token 0 / N-1).
    """
    m = anchors.shape[0]
    n = rows * cols
    out = torch.zeros_like(anchors)
    if wrap:
        out[:, 1:] |= anchors[:, :-1]
        out[:, :-1] |= anchors[:, 1:]
        out[:, cols:] |= anchors[:, :-cols]
        out[:, :-cols] |= anchors[:, cols:]
        out[:, 0] |= anchors[:, :cols].any(1)  # clamp(a - cols, 0)
        out[:, n - 1] |= anchors[:, n - cols:].any(1)  # clamp(a + cols, N - 1)
    else:
        a = anchors.view(m, rows, cols)
        g = out.view(m, rows, cols)
        g[:, :, 1:] |= a[:, :, :-1]
        g[:, :, :-1] |= a[:, :, 1:]
        g[:, 1:] |= a[:, :-1]
        g[:, :-1] |= a[:, 1:]
    return out & ~anchors


@register("hiprune")
@dataclass
class HiPrune(Reducer):
    """HiPrune (Liu et al., 2025, "Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision Encoders"), following the official code (LLaVA `encode_images`):

    1. importance a_j at a vision layer = attention j receives, mean over heads and over all query
       rows (CLS query included), CLS column dropped;
    2. anchors: the T = round(alpha * keep / 5) most important tokens at the *object* layer;
    3. buffers: each anchor's 4 spatial neighbours (+-1, +-grid width);
    4. registers: the rest of the budget, by importance at the *deep* layer, among the others;
    5. survivors stay in raster order with their original position ids.

    Deviation (option): the official code computes neighbours by flat index arithmetic, so a-1 / a+1
    wrap across rows and clamped indices add the first / last token; vtoken uses true neighbours by
    default (`wrap=False`); `wrap=True` reproduces the official behaviour.
    Defaults: keep 64 (paper budgets 192/128/64), alpha 0.1, object layer 9 of 24 (0-based 8;
    scaled to other depths; Qwen2.5-VL: the middle layer), deep layer = the feature layer (-1).
    """

    counts_tested: ClassVar[bool] = True
    grid_shape: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    full_grid: ClassVar[bool] = True
    keep: int | float | None = 64
    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int = -1
    wrap: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()  # types (wrap a bool, layers ints, alpha a number) are checked there
        check_range(self, "alpha", 0.0, 1.0)

    def configure(self, info: ModelInfo) -> None:
        if self.object_layer is None:
            depth = info.vision_layers or 24
            frac = OBJECT_LAYER.get(info.tower, 9 / 24)
            self.object_layer = max(0, round(depth * frac) - 1)

    def signals(self) -> tuple[SignalRequest, ...]:
        obj = 8 if self.object_layer is None else self.object_layer
        return (
            SignalRequest("vision_attention", obj, "all"),
            SignalRequest("vision_attention", self.deep_layer, "all"),
        )

    def select(self, x: StageInput) -> Selection:
        require_full_grid(x, self.name)
        obj_req, deep_req = self.signals()
        s_obj = x.signal(obj_req).float()
        s_deep = x.signal(deep_req).float()
        n_anchor = torch.tensor([round(k * self.alpha / 5) for k in x.keep], device=s_obj.device)
        anchors = to_grid(x, topk_mask(s_obj, n_anchor, x.valid), False)  # raster order of each grid
        union = anchors.clone()
        for (rows, cols), ids in by_grid(x).items():
            union[ids, : rows * cols] |= neighbours(anchors[ids, : rows * cols], rows, cols, self.wrap)
        union = from_grid(x, union, False)
        # anchors and buffers first (by object-layer importance), then registers by deep importance
        priority = torch.where(union, 2.0 + s_obj, s_deep)
        return Selection(keep=topk_mask(priority, x.keep_tensor(), x.valid))
