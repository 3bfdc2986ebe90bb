"""`holitom`: holistic video token merging (Shao et al., "HoliTom: Holistic Token Merging for Fast Video
Large Language Models", 2025), after the authors' code: temporal segmentation + spatio-temporal
merging before the LLM, and similarity merging inside it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtoken.errors import LayoutError, ParameterError
from vtoken.ops.density import dpc_knn, merge_into_centres
from vtoken.ops.select import topk_mask
from vtoken.ops.temporal import frame_similarity, segment, static_table
from vtoken.reducers.base import (
    ModelInfo,
    MultiStage,
    Reducer,
    Selection,
    Share,
    SignalRequest,
    Stage,
    StageInput,
    check_range,
    check_unused,
    shared_fields,
)
from vtoken.registry import register

_REFERENCE = (28, 18)  # the authors' inner layer: 18 of Qwen2-7B's 28


def videos(x: StageInput) -> list[list[int]]:
    """The images of `x` grouped by video (a video's frames are consecutive; an image is its own group)."""
    parts = x.parts or [None] * len(x.grids)
    groups: list[list[int]] = []
    for i, part in enumerate(parts):
        if part is not None and part[0] > 0 and groups and parts[groups[-1][-1]] is not None:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@register("holitom_merge")
@dataclass
class HoliTomMerge(Reducer):
    """HoliTom outside the LLM (the authors' `holitom/llava_arch.py`), per video, on the projected
    frame tokens: similarity of each token to the same position in the next frame (> `tau`: similar);
    a DP splits the frames into segments maximising the tokens that stay similar through a segment
    (`vtoken.ops.temporal`); the budget ratio r (`keep`: a float, or an int total per video) is raised
    to r' = min(r F N / (F N - R), 1) for the R tokens so merged; in each segment the static tokens are
    averaged over its frames and clustered by DPC-kNN into round(n_static r') tokens (a centre with
    members: `beta` centre + (1 - beta) mean of the members; `vtoken.ops.density`), placed at their
    centre's position in the segment's first frame (the code's grid mode), and each frame keeps its
    ceil(n_dynamic r') dynamic tokens with the most vision-tower attention (last layer, mean over heads
    and queries). Images pass unchanged. The count depends on the content."""

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    adaptive: ClassVar[bool] = True
    # the authors pool the tower's attention map as the tokens are pooled (LLaVA-OneVision: bilinear 2x2),
    # so it runs where each LLM token is a resample of tower patches
    resampled_attention: ClassVar[bool] = True
    keep: int | float | None = 0.1
    tau: float = 0.8
    beta: float = 0.6
    k: int = 7
    max_window: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "tau", -1.0, 1.0)
        check_range(self, "beta", 0.0, 1.0)
        check_range(self, "k", lo=1)
        check_range(self, "max_window", lo=1)

    def signals(self) -> tuple[SignalRequest, ...]:
        return (SignalRequest("vision_attention", -1, "all"),)

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        return n  # an upper bound: the content decides

    def select(self, x: StageInput) -> Selection:
        counts = list(x.counts if x.counts is not None else x.valid.sum(1).tolist())
        if x.parts is None or all(part is None for part in x.parts):  # images only: nothing to merge (no merge
            return Selection(keep=x.valid.clone(), counts=counts)  # weights, no tower attention read or paid)
        attention = x.signal(self.signals()[0]).float()
        keep = x.valid.clone()
        values, sizes = x.features.clone(), x.sizes.clone()
        for ids in videos(x):
            if x.parts[ids[0]] is None:
                continue  # an image: HoliTom's outer merge is for videos
            n = counts[ids[0]]
            if any(counts[i] != n or x.grids[i][0] * x.grids[i][1] != n for i in ids):
                raise LayoutError("holitom merges a video's frames position by position: it must act first, on "
                                  "whole frames of one size")
            rows = torch.tensor(ids, device=keep.device)[:, None]
            slots = x.positions[rows[:, 0], :n].argsort(dim=1)  # each frame's slots in raster order
            # the retain ratio r: a float keep is r itself; an int keep is the video's total budget (the
            # stage hands each frame the whole count, as this reducer's budget is only an upper bound)
            ratio = self.keep if isinstance(self.keep, float) else self.keep / (len(ids) * n)
            kept, vals, szs = self._video(x.features[rows, slots], attention[rows, slots], ratio)
            keep[rows, slots] = kept
            values[rows, slots] = vals.to(values.dtype)
            sizes[rows, slots] = szs.to(sizes.dtype)
            for i, c in zip(ids, kept.sum(1).tolist()):  # one read per video (the counts are the content's)
                counts[i] = c
        return Selection(keep=keep, values=values, sizes=sizes, counts=counts)

    def _video(self, feats: torch.Tensor, attention: torch.Tensor, ratio: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One video's (F, N) kept mask, (F, N, d) values and (F, N) sizes."""
        f, n, _ = feats.shape
        static = static_table(frame_similarity(feats) > self.tau)
        parts, reduced = segment(static, self.max_window)
        r = min(ratio / ((f * n - reduced) / (f * n)), 1.0)  # the authors' expression (same rounding)
        kept = torch.zeros(f, n, dtype=torch.bool, device=feats.device)
        values, sizes = feats.clone(), torch.ones(f, n, device=feats.device)
        for a, e in parts:
            width = e - a + 1
            mask = static[a, e] if width > 1 else torch.zeros(n, dtype=torch.bool, device=feats.device)
            n_static = int(mask.sum())
            clusters = round(n_static * r)
            if clusters > 0:
                where = torch.nonzero(mask).flatten()
                mean = feats[a:e + 1, where].float().mean(0)
                centres, assign = dpc_knn(mean, clusters, min(self.k, clusters))
                merged, _ = merge_into_centres(mean, centres, assign, self.beta)
                pos = where[centres]
                kept[a, pos] = True
                values[a, pos] = merged.to(values.dtype)
                sizes[a, pos] = width * torch.bincount(assign, minlength=len(centres)).float()
            n_dyn = n - n_static
            if n_dyn:
                take = math.ceil(n_dyn * r)
                score = attention[a:e + 1].masked_fill(mask[None], float("-inf"))
                chosen = topk_mask(score, torch.full((width,), take, device=feats.device), ~mask[None].expand(width, n))
                kept[a:e + 1] |= chosen
        return kept, values, sizes


@register("holitom_inner")
@dataclass
class HoliTomInner(Reducer):
    """HoliTom inside the LLM (the authors' `holitom/modeling_qwen2.py`): before layer `layer` (default
    18 of 28, scaled to the depth), each video (all its frames together) or image keeps the
    round(V (1 - ratio)) visual tokens the last prompt token attends most in the layer before (mean over
    heads); every other token is folded into its most cosine-similar kept token (hidden states entering
    the layer, similarities taken once) by a running pairwise average in sequence order. Kept tokens
    keep their position ids. The count per frame depends on the content."""

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "decoder"
    adaptive: ClassVar[bool] = True
    keep: int | float | None = None  # unused: `ratio` sets the count
    layer_k: int | None = None
    ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None:
            raise ParameterError("holitom_inner keeps round(V * (1 - ratio)) per video; pass ratio, not "
                                 f"keep={self.keep!r}")
        check_range(self, "ratio", 0.0, 1.0, hi_open=True)
        check_range(self, "layer_k", lo=1)

    def configure(self, info: ModelInfo) -> None:
        if self.layer_k is None:
            depth, k = _REFERENCE
            self.layer_k = max(1, min(round(k * info.llm_layers / depth), info.llm_layers - 1))
        if not 1 <= self.layer_k < info.llm_layers:
            raise ParameterError(f"holitom: layer_k={self.layer_k} must be in 1..{info.llm_layers - 1} "
                                 f"(the LLM has {info.llm_layers} layers)")

    @property
    def layer(self) -> int:
        return self.layer_k if self.layer_k is not None else _REFERENCE[1]

    def signals(self) -> tuple[SignalRequest, ...]:
        return (SignalRequest("llm_attention", self.layer - 1, "last"),)

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        return n  # an upper bound: how a video's budget falls on its frames depends on the content

    def select(self, x: StageInput) -> Selection:
        score = x.signal(self.signals()[0]).float()
        keep = torch.zeros_like(x.valid)
        values = x.features.clone()
        for ids in videos(x):
            rows = torch.tensor(ids, device=keep.device)
            alive = x.valid[rows].reshape(-1)
            flat = x.features[rows].reshape(alive.shape[0], -1)
            total = int(alive.sum())
            take = round(total * (1 - self.ratio))
            chosen = topk_mask(score[rows].reshape(1, -1), torch.tensor([take], device=keep.device), alive[None])[0]
            folded = fold_into_kept(flat, chosen, alive & ~chosen)
            keep[rows] = chosen.view(len(ids), -1)
            values[rows] = folded.view(len(ids), *values.shape[1:]).to(values.dtype)
        return Selection(keep=keep, values=values, counts=keep.sum(1).tolist())


def fold_into_kept(h: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """HoliTom's inner merge on (T, d) rows: each dropped row (in order) is averaged pairwise into the
    kept row most cosine-similar to it (similarities of the original rows): a kept row v that takes
    u_1 < ... < u_m becomes v / 2^m + sum_j u_j / 2^(m - j + 1). Returns the rows with kept ones updated."""
    kv, dv = torch.nonzero(kept).flatten(), torch.nonzero(dropped).flatten()
    if len(kv) == 0 or len(dv) == 0:
        return h
    hn = F.normalize(h.float(), dim=-1)
    target = (hn[dv] @ hn[kv].T).argmax(-1)  # (n_drop,) index into kv
    onehot = F.one_hot(target, len(kv)).float()
    rank = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based order of each dropped row within its target
    m = onehot.sum(0)  # members per kept row
    w_drop = torch.pow(2.0, -(m[target] - rank + 1))
    out = h.float().clone()
    out[kv] = out[kv] * torch.pow(2.0, -m)[:, None]
    out.index_add_(0, kv[target], h[dv].float() * w_drop[:, None])
    return out.to(h.dtype)


@register("holitom")
@dataclass
class HoliTom(MultiStage):
    """HoliTom: merging before the LLM (`holitom_merge`: `keep`, `tau`, `beta`, `k`, `max_window`) and
    inside it (`holitom_inner`: `layer_k`, `ratio`); `inner=False` is the paper's "w/o M" variant."""

    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = 0.1
    tau: float = 0.8
    beta: float = 0.6
    k: int = 7
    max_window: int = 1024
    layer_k: int | None = None
    ratio: float = 0.5
    inner: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.inner:
            check_unused(self, ["layer_k", "ratio"], "the inner merge's settings, and inner=False switches it off")
        self._build()


    def _build(self) -> None:
        self._parts = [HoliTomMerge(**shared_fields(self, HoliTomMerge))]
        if self.inner:
            self._parts.append(HoliTomInner(**shared_fields(self, HoliTomInner, skip=("keep",))))


