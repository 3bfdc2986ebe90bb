"""`todre`: token diversity (boundary) + task relevance (decoder), after ToDRE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vtoken.errors import ParameterError, UnsupportedModelError
from vtoken.ops.diversity import greedy_diverse
from vtoken.ops.seeded import prepare, seeded_uniform
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


@register("todre_diversity")
@dataclass
class ToDREDiversity(Reducer):
    """ToDRE stage 1 (Li et al., 2025, arXiv 2505.18757): greedy diverse subset of the projected
    visual tokens (L2-normalised), started from a pivot.

    selection="kcenter" (paper v1, default): farthest point / max-min — add the token whose highest
    cosine similarity to the kept set is lowest. selection="maxsum" (paper v2, Algorithm 1): add the
    token whose summed similarity to the kept set is lowest.
    pivot="cls": the token with the highest CLS attention at the vision feature layer (the paper's
    "last layer" of the encoder as the LLM sees it, heads averaged); "random": a seeded random token
    (the paper's ablation, for towers without CLS); "auto" (default): "cls" when the tower has a CLS
    token, else "random". An image with detail views (LLaVA-NeXT: base view + stitched crops) has one
    pivot, in its base view: the crops' selection starts from that pivot's feature, so every crop
    token is chosen by the greedy rule relative to it.
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = 64
    selection: Literal["kcenter", "maxsum"] = "kcenter"
    pivot: Literal["auto", "cls", "random"] = "auto"
    seed: int = 0
    vision_layer: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()  # selection / pivot among their values, seed an int: checked there
        check_range(self, "seed", -(2**63), 2**64, hi_open=True)
        prepare(self.seed)  # the random pivot's scores, drawn outside any forward (vtoken.ops.seeded)
        if self.pivot == "cls":
            check_unused(self, ["seed"], "the seed draws the pivot only with pivot='random' or 'auto' on a tower "
                         "without CLS")

    def configure(self, info: ModelInfo) -> None:
        if self.pivot == "auto":
            self.pivot = "cls" if info.has_cls else "random"
        if self.pivot == "cls" and not info.has_cls:
            raise UnsupportedModelError(
                f"the {info.family} vision tower has no CLS token; use todre with pivot='random'"
            )

    def signals(self) -> tuple[SignalRequest, ...]:
        return (SignalRequest("vision_attention", self.vision_layer, "cls"),) if self.pivot in ("cls", "auto") else ()

    def select(self, x: StageInput) -> Selection:
        if self.pivot == "cls":
            score = x.signal(self.signals()[0]).float()
        else:  # a fixed function of (seed, raster position), so batch composition does not matter
            score = seeded_uniform(self.seed, max(h * w for h, w in x.grids), x.features.device)[x.positions]
        first = score.masked_fill(~x.valid, float("-inf")).argmax(1)
        mode = "maxmin" if self.selection == "kcenter" else "maxsum"
        reference = has_reference = None
        if x.bases is not None:  # detail views (LLaVA-NeXT crops) start from their base view's pivot
            base = torch.tensor([-1 if b is None else b for b in x.bases], device=first.device)
            has_reference = base >= 0
            src = base.clamp_min(0)
            reference = x.features[src, first[src]]
        return Selection(keep=greedy_diverse(x.features, x.valid, x.keep, first, mode, reference, has_reference))


@register("todre_relevance")
@dataclass
class ToDRERelevance(Reducer):
    """ToDRE stage 2: at LLM layer `check_layer` (default round(7L/8) - 1, the 28th of 32), with
    head-averaged attention, alpha_t->v = share of the instruction rows' attention on visual keys
    and alpha_v->t = share of the visual rows' attention on instruction keys (Eq. 8). If both are
    below `tau`, every visual token of that sample is dropped before the next layer.

    The instruction rows are the text after the last image. Under a causal mask visual rows cannot
    see later text, so alpha_v->t is 0 for prompts whose text follows the image (LLaVA's template):
    the test then reduces to alpha_t->v < tau. The count is content-dependent (all or nothing).
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "decoder"
    adaptive: ClassVar[bool] = True
    device_counts: ClassVar[bool] = True  # all or none per image: static layouts pad what it drops
    keep: int | float | None = 1.0
    tau: float = 0.10
    check_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.keep, float) and self.keep == 1.0):
            raise ParameterError(
                f"todre_relevance keeps all or none of a sample's visual tokens (by attention ratios) and "
                f"takes no budget (got keep={self.keep!r}); drop keep, or use 'todre' with keep= for stage 1"
            )
        check_range(self, "tau", 0.0, 1.0)
        check_range(self, "check_layer", lo=0)

    def configure(self, info: ModelInfo) -> None:
        if self.check_layer is None:
            self.check_layer = max(0, min(round(7 * info.llm_layers / 8) - 1, info.llm_layers - 2))
        if not 0 <= self.check_layer < info.llm_layers - 1:
            raise ParameterError(
                f"todre: check_layer={self.check_layer} must leave a layer after it "
                f"(the LLM has {info.llm_layers})"
            )

    @property
    def layer(self) -> int:
        return (self.check_layer if self.check_layer is not None else 27) + 1

    def signals(self) -> tuple[SignalRequest, ...]:
        c = self.layer - 1
        return (SignalRequest("llm_modality_mass", c, "t2v"), SignalRequest("llm_modality_mass", c, "v2t"))

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        return n  # an upper bound: the count is decided by the attention ratios

    def select(self, x: StageInput) -> Selection:
        t2v_req, v2t_req = self.signals()
        t2v = x.signal(t2v_req)[:, 0] if x.valid.shape[1] else x.valid.new_zeros(0)
        v2t = x.signal(v2t_req)[:, 0] if x.valid.shape[1] else x.valid.new_zeros(0)
        drop = (t2v < self.tau) & (v2t < self.tau)
        keep = x.valid & ~drop[:, None]
        return Selection(keep=keep, counts=keep.sum(1))  # on the device: read back only in an exact layout


@register("todre")
@dataclass
class ToDRE(MultiStage):
    """ToDRE: stage 1 (`todre_diversity`, budget `keep`) then stage 2 (`todre_relevance`); each stage
    can be switched off (`stage1=False` / `stage2=False`) for the paper's ablations."""

    stage: ClassVar[Stage] = "boundary"
    keep: int | float | None = None  # None: 64 (stage 1's budget; unused without stage 1)
    selection: Literal["kcenter", "maxsum"] = "kcenter"
    pivot: Literal["auto", "cls", "random"] = "auto"
    seed: int = 0
    vision_layer: int = -1
    tau: float | None = None  # None: 0.10 (stage 2's threshold; unused without stage 2)
    check_layer: int | None = None
    stage1: bool = True
    stage2: bool = True

    def __post_init__(self) -> None:
        if self.stage1 is True and self.keep is None:
            self.keep = 64
        if self.stage2 is True and self.tau is None:
            self.tau = 0.10
        super().__post_init__()
        if not (self.stage1 or self.stage2):
            raise ParameterError("todre: at least one of stage1 / stage2 must be on")
        if not self.stage1:
            if self.keep is not None:
                raise ParameterError(f"todre: keep={self.keep!r} is stage 1's budget, which stage1=False switches "
                                     "off; drop keep or turn stage 1 on")
            check_unused(self, ["selection", "pivot", "seed", "vision_layer"],
                         "stage 1 settings, and stage1=False switches it off")
        if not self.stage2:
            check_unused(self, ["tau", "check_layer"], "stage 2 settings, and stage2=False switches it off")
        self._build()


    def _build(self) -> None:
        """The stages, each given this reducer's values of its own parameters (one declaration of
        each parameter per stage: what a stage adds appears here by name, or a test fails)."""
        self._parts = []
        if self.stage1:
            self._parts.append(ToDREDiversity(**shared_fields(self, ToDREDiversity)))
        if self.stage2:
            self._parts.append(ToDRERelevance(**shared_fields(self, ToDRERelevance, skip=("keep",))))  # stage 1's


