"""`aim`: iterative similarity merging before the LLM + PageRank pruning inside it, after AIM (Zhong
et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import bipartite_plan, merge, merge_sizes
from vtoken.ops.select import topk_mask
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
    scaled,
    shared_fields,
)
from vtoken.registry import register

# the authors' schedules: after LLM layer l >= l1 the next layers keep 1 - (l - l1 + 1) / 8 of the visual
# tokens that entered the LLM, down to none: l1 = 14 for their 28-layer Qwen2 LLMs, 13 for 32-layer LLaMA
_REFERENCE = {"qwen": (28, 14), "llama": (32, 13)}
_STEPS = 8


def merge_passes(n: int, keep: int | None, r: Sequence[int] | None = None) -> list[int]:
    """Tokens removed by each merging pass for an image of n tokens: the explicit per-pass `r`; or
    passes halving the tokens (r = t // 2, at most t - keep) until `keep` remain (576 -> 288 -> 252 for
    LLaVA-1.5's 43.75 %); or, with neither, the authors' video default r = n // 2 then n // 4 (196 -> 98
    -> 49 per LLaVA-OneVision frame, 729 -> 365 -> 183). Each pass is clamped to t // 2."""
    out, t = [], n
    if r is None and keep is None:
        r = (n // 2, n // 4)
    if r is not None:
        for x in r:
            x = min(x, t // 2)
            out.append(x)
            t -= x
        return out
    while t > keep and t // 2 > 0:
        x = min(t // 2, t - keep)
        out.append(x)
        t -= x
    return out


@register("aim_merge")
@dataclass
class AIMMerge(Reducer):
    """AIM's token merging before the LLM (the authors' `token_merge` as their LLaVA-OneVision and
    Qwen2-VL video code runs it), per image or video frame, on the projected visual tokens: passes of
    bipartite matching (A = even, B = odd positions of the current order; each A token's most
    cosine-similar B token; the r best A tokens merge into theirs), each merged token the plain mean
    of its B token and the A tokens assigned to it (no size weighting: a mean of means across
    passes), unmerged A tokens ordered by descending similarity before the B tokens for the next
    pass (as the code leaves them). By default two passes merge n // 2 then n // 4 tokens (the authors'
    video setting: 196 -> 49 per frame); `keep` (tokens per image, reached by halving passes) or `r`
    (per-pass counts) instead. Every survivor keeps
    its own slot and position id (the code renumbers 0..N-1: `renumber=True`)."""

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = None  # None (and no `r`): the authors' two passes, n // 2 then n // 4
    r: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.r is not None:
            if self.keep is not None:
                raise ParameterError(f"aim: give keep={self.keep!r} (tokens left per image) or r={self.r!r} "
                                     "(tokens merged per pass), not both")
            self.r = _int_tuple(self, "r", self.r)
            if not self.r or any(x < 1 for x in self.r):
                raise ParameterError(f"aim: r must be one or more positive per-pass counts, got {self.r!r}")
        super().__post_init__()

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        if self.keep is None:
            return n - sum(merge_passes(n, None, self.r))
        k = resolve_keep(scaled(self.keep, share), n)
        return k  # halving passes reach any k >= 1

    def select(self, x: StageInput) -> Selection:
        m, n_max, _ = x.features.shape
        device = x.features.device
        keep = torch.zeros(m, n_max, dtype=torch.bool, device=device)
        values, sizes = x.features.clone(), x.sizes.clone()
        mix = torch.zeros(m, n_max, n_max, device=device) if x.want_mix else None
        counts = x.counts if x.counts is not None else x.valid.sum(1).tolist()
        order = (~x.valid).int().argsort(dim=1, stable=True)  # each image's selectable slots first, in order
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (n, k) in enumerate(zip(counts, x.keep)):
            if n > 0:
                groups.setdefault((n, k), []).append(i)
        for (n, k), members in groups.items():  # images of one size and budget: one batched computation
            ids = torch.tensor(members, device=device)[:, None]
            src = order[ids[:, 0], :n]  # (g, n) slot of each of the image's tokens
            at, val, size, weights = merge_tokens(x.features[ids, src], x.sizes[ids, src],
                                                   merge_passes(n, None if self.keep is None else k, self.r),
                                                   with_weights=mix is not None)
            slot = src.gather(1, at)
            keep[ids, slot] = True
            values[ids, slot] = val.to(values.dtype)
            sizes[ids, slot] = size.to(sizes.dtype)
            if mix is not None:
                full = torch.zeros(len(members), k, n_max, device=device, dtype=mix.dtype)
                mix[ids, slot] = full.scatter_(2, src[:, None, :].expand(-1, k, -1), weights.to(mix.dtype))
        return Selection(keep=keep, values=values, sizes=sizes, mix=mix)


def merge_tokens(feats: torch.Tensor, sizes: torch.Tensor, passes: list[int], with_weights: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """AIM's passes on (m, n, d) tokens: each survivor's input index (m, k) in output order, its value
    (m, k, d), size, and (`with_weights`, for features carried beside the tokens) its weights over the
    n inputs (m, k, n), else None. Each pass matches on the current tokens."""
    m, n, _ = feats.shape
    device = feats.device
    work = torch.promote_types(feats.dtype, torch.float32)
    at = torch.arange(n, device=device).expand(m, n)
    weights = torch.eye(n, device=device, dtype=work).expand(m, n, n) if with_weights else None
    x = feats
    for r in passes:
        t = x.shape[1]
        plan, _ = bipartite_plan(x, [t] * m, [r] * m, protect=0, unmerged="score")
        x, sizes = merge(x, plan, weighted=False), merge_sizes(sizes, plan)
        # the token that keeps its identity in each output slot: every B token, and the unmerged A tokens
        # (their slots come before the t // 2 B slots)
        stays = torch.ones(m, t, dtype=torch.bool, device=device)
        stays[:, ::2] = plan.dest[:, ::2] < plan.length - t // 2
        own = torch.zeros(m, plan.length + 1, dtype=torch.long, device=device)
        at = own.scatter_(1, torch.where(stays, plan.dest, plan.length), at)[:, :-1]
        if weights is None:
            continue
        step = torch.zeros(m, plan.length + 1, t, device=device, dtype=work)
        step.scatter_(1, plan.dest[:, None, :], 1.0)
        step = step[:, :-1] / step[:, :-1].sum(-1, keepdim=True)  # each output: the plain mean of its inputs
        weights = torch.bmm(step, weights)
    return at, x, sizes, weights


@register("aim_prune")
@dataclass
class AIMPrune(Reducer):
    """AIM's pruning inside the LLM (the authors' code): after LLM layer l, every prompt row's causal
    attention in that layer with temperature `tau` is power-iterated `steps` times from the uniform
    distribution (PageRank without damping, per head; heads combined by root mean square,
    `vtoken.signals.pagerank`), and the next layers keep the floor(V * rate) most important visual
    tokens of each image (V: its tokens entering the LLM) in original order; text is never pruned.
    `schedule` is ((layer, rate), ...) with 0-based layers that the rate applies from; the default is
    the authors' (rate 7/8 down to 0 over 8 layers from layer 15 of 28-layer Qwen2 LLMs, 14 of 32-layer
    LLaMA ones), scaled to other depths. The code masks pruned tokens' keys and keeps them as queries;
    vtoken removes them (that is the saving), so from the second step on the walk runs over the
    surviving rows (docs/deviations.md)."""

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "decoder"
    keep: int | float | None = None  # unused: the schedule sets the counts
    schedule: tuple[tuple[int, float], ...] | None = None
    tau: float = 0.1
    steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None:
            raise ParameterError("aim_prune: its counts come from `schedule` (fractions of the visual tokens "
                                 f"entering the LLM), not keep={self.keep!r}; drop keep")
        check_range(self, "tau", 0.0, lo_open=True)
        check_range(self, "steps", lo=1)
        if self.schedule is not None:
            self.schedule = _schedule(self.schedule)

    def configure(self, info: ModelInfo) -> None:
        if self.schedule is None:
            depth, l1 = _REFERENCE["qwen" if info.llm.startswith("qwen") else "llama"]
            scale = info.llm_layers / depth
            first = max(1, round((l1 + 1) * scale))
            span = max(1, round(_STEPS * scale))
            self.schedule = tuple((first + j, 1 - (j + 1) / span) for j in range(span))
        if self.schedule[-1][0] >= info.llm_layers:
            raise BudgetError(f"aim: layer {self.schedule[-1][0]} does not exist (the LLM has {info.llm_layers}); "
                              f"pass a schedule whose layers are < {info.llm_layers}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self.schedule or ())

    def signals(self) -> tuple[SignalRequest, ...]:
        return tuple(SignalRequest("llm_pagerank", layer - 1, "all", (self.tau, self.steps)) for layer in self.layers)

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        entry = n if entry is None else entry
        k = math.floor(entry * dict(self.schedule or ())[layer] + 1e-9)  # rates like 1 - j / span: no ulp loss
        return min(k, n)

    def select(self, x: StageInput) -> Selection:
        req = next(r for r in self.signals() if r.layer == x.layer - 1)
        return Selection(keep=topk_mask(x.signal(req).float(), x.keep_tensor(), x.valid))


@register("aim")
@dataclass
class AIM(MultiStage):
    """AIM: merging before the LLM (`aim_merge`, budget `keep` per image or video frame, or per-pass
    `r`), then PageRank pruning inside it (`aim_prune`, `schedule`, `tau`, `steps`); either stage can be
    switched off (`merge=False` / `prune=False`) for the paper's ablations."""

    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = None  # the merge's budget (None: the authors' two passes; unused without merging)
    r: tuple[int, ...] | None = None
    schedule: tuple[tuple[int, float], ...] | None = None
    tau: float = 0.1
    steps: int = 5
    merge: bool = True
    prune: bool = True

    def __post_init__(self) -> None:
        if self.r is not None and self.keep is not None:
            raise ParameterError(f"aim: give keep={self.keep!r} (tokens left per image) or r={self.r!r} "
                                 "(tokens merged per pass), not both")
        super().__post_init__()
        if not (self.merge or self.prune):
            raise ParameterError("aim: at least one of merge / prune must be on")
        if not self.merge:
            if self.keep is not None:
                raise ParameterError(f"aim: keep={self.keep!r} is the merge's budget, which merge=False switches off")
            check_unused(self, ["r"], "the merge's settings, and merge=False switches it off")
        if not self.prune:
            check_unused(self, ["schedule", "tau", "steps"], "the pruning's settings, and prune=False switches it off")
        self._build()


    def _build(self) -> None:
        self._parts = []
        if self.merge:
            self._parts.append(AIMMerge(**shared_fields(self, AIMMerge)))
        if self.prune:
            self._parts.append(AIMPrune(**shared_fields(self, AIMPrune, skip=("keep",))))  # keep is the merge's


def _int_tuple(reducer: Reducer, name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise ParameterError(f"{reducer.name}: {name} must be a sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _schedule(schedule: Any) -> tuple[tuple[int, float], ...]:
    """((layer, rate), ...): increasing layers >= 1, non-increasing rates in [0, 1]."""
    form = "a sequence of (layer, rate) pairs, e.g. ((15, 0.875), (16, 0.75), ..., (22, 0.0))"
    try:
        out = tuple((int(layer), float(rate)) for layer, rate in schedule)
        ok = all(isinstance(layer, numbers.Integral) and not isinstance(layer, bool) for layer, _ in schedule)
    except (TypeError, ValueError):
        raise ParameterError(f"aim: schedule must be {form}, got {schedule!r}") from None
    layers, rates = [x for x, _ in out], [r for _, r in out]
    if not ok or not out or layers[0] < 1 or any(b <= a for a, b in pairwise(layers)):
        raise ParameterError(f"aim: schedule layers must be increasing ints >= 1 ({form}), got {schedule!r}")
    if any(not (0.0 <= r <= 1.0 and math.isfinite(r)) for r in rates) or any(b > a for a, b in pairwise(rates)):
        raise ParameterError(f"aim: schedule rates must be in [0, 1] and non-increasing, got {rates}")
    return out


__all__ = ["AIM", "AIMMerge", "AIMPrune", "merge_passes", "merge_tokens"]
