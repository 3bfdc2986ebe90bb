"""The reducer contract: what a reducer declares (stage, signals, budget) and computes (a Selection).

A reducer is a dataclass registered by name. It never touches a model module: the adapter hands it a
`StageInput` (the visual tokens of every image at one point of the model, with the signals it asked
for) and applies the `Selection` it returns through the token ledger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from vtoken.budget import Keep, check_keep, resolve_keep
from vtoken.errors import ParameterError, SignalError

Stage = Literal["encoder", "boundary", "decoder", "attention"]
STAGE_ORDER: dict[str, int] = {"encoder": 0, "boundary": 1, "decoder": 2, "attention": 3}


@dataclass(frozen=True)
class SignalRequest:
    """A quantity a reducer needs, computed by the adapter only when some reducer asks for it.

    kind (layers are 0-based; vision layer -1 means the tower's feature layer, the one the LLM reads):
      - ``"llm_attention"``: attention probability each sequence row receives at LLM layer `layer`,
        mean over heads, from the query rows named by `query` (``"last"``: the last prompt token;
        ``"instruction"``: the text after the last image, mean over those rows). Computed on a side
        path from that layer's q/k with its RoPE, so the model keeps its attention kernel.
      - ``"vision_attention"``: per patch, attention received in vision layer `layer`, mean over heads;
        `query="all"`: mean over all query rows (HiPrune), `query="cls"`: the CLS row (VisionZip,
        ToDRE). Side path from the layer's q/k.
      - ``"vision_keys"``: per patch, that layer's keys, mean over heads ((N, head_dim)).
      - ``"vision_features"``: per patch, the vision features the projector reads ((N, d_vision)).
    """

    kind: str
    layer: int
    query: str = "last"


@dataclass
class Signal:
    """A signal's value as the adapter provides it.

    aligned="rows":   (B, L, ...) over the rows of the layout being reduced.
    aligned="raster": (n_img, N0, ...) per image over its original raster positions.
    """

    value: torch.Tensor
    aligned: Literal["rows", "raster"]


@dataclass(frozen=True)
class ModelInfo:
    """What a reducer may need to know about the model to resolve its per-model defaults."""

    family: str  # adapter family, e.g. "llava"
    llm_layers: int
    vision_layers: int | None = None
    feature_layer: int | None = None  # 0-based vision layer whose output reaches the projector
    has_cls: bool = True  # the vision tower has a CLS token (VisionZip / ToDRE pivots)
    vision_tokens: int | None = None  # patch tokens per image entering the tower
    prefix_tokens: int = 1  # CLS / distillation / register tokens before the patches


@dataclass
class Selection:
    """What a reducer returns for each image: which tokens survive, and (for merges) their new content.

    keep:   (n_img, N) bool; exactly the per-image budget is True (never a padded slot).
    values: (n_img, N, d) replacement features, read at kept slots only (None: unchanged).
    sizes:  (n_img, N) how many original tokens each survivor stands for (None: unchanged).
    counts: reducers whose count depends on the content (`adaptive = True`) report the number of
            True slots per image here; the budget is then an upper bound.
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    counts: list[int] | None = None  # adaptive reducers only: the kept count per image (host ints)


@dataclass
class StageInput:
    """The visual tokens of every image in the batch at one reduction point, padded to N = max count.

    features:  (n_img, N, d) the tokens (projected features at the boundary, hidden states in the LLM).
    valid:     (n_img, N) bool, False for padded slots (images with fewer tokens).
    positions: (n_img, N) long, raster index of each token in its image's original grid.
    sizes:     (n_img, N) float, original tokens each token stands for (1 unless merged before).
    grids:     per image, its original (rows, cols) grid.
    keep:      per image, how many tokens the reducer must keep.
    layer:     the LLM layer this point sits before (decoder stage), else None.
    counts:    per image, how many tokens it has at this point (host ints; no device read needed).
    project:   maps vision features (..., d_vision) into the LLM's embedding space (the model's
               projector), for reducers that build new tokens in vision space; None if unavailable.
    bases:     per image, the row (in this input) of the image's base view when the image is a
               detail view of it (LLaVA-NeXT crops), else None; None when no image has one.
    """

    features: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor
    grids: list[tuple[int, int]]
    keep: list[int]
    layer: int | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = field(repr=False, default=None)
    counts: list[int] | None = None  # host: selectable tokens per image (None: read from `valid`)
    bases: list[int | None] | None = None
    _signal: Callable[[SignalRequest], torch.Tensor] | None = field(repr=False, default=None)

    def signal(self, request: SignalRequest) -> torch.Tensor:
        """The requested signal for these tokens, (n_img, N), aligned with `features`."""
        if self._signal is None:
            raise SignalError(f"no signals are available at this point; {request} was not captured")
        return self._signal(request)

    def keep_tensor(self) -> torch.Tensor:
        """Per-image budget as a (n_img,) long tensor on the features' device."""
        return torch.tensor(self.keep, device=self.features.device, dtype=torch.long)


@dataclass
class Reducer:
    """Base class of all reducers.

    Common parameters:
      keep:     visual tokens per image that survive this reducer: an int, or a float fraction of the
                tokens the image has when it reaches this reducer.
      renumber: give the survivors (and every later token) compact position ids instead of their
                original ones (default False: kept tokens keep their original position ids).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = "boundary"
    adaptive: ClassVar[bool] = False  # the kept count depends on the content (Selection.counts)
    keep: Keep | None = None
    renumber: bool = False

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if not isinstance(self.renumber, bool):
            raise ParameterError(f"{self.name}: renumber must be True or False, got {self.renumber!r}")

    # --- what the reducer declares -------------------------------------------------------------
    @property
    def layer(self) -> int | None:
        """LLM layer index (0-based) before which a decoder-stage reducer acts; None otherwise."""
        return None

    @property
    def layers(self) -> tuple[int, ...]:
        """Every LLM layer a decoder-stage reducer acts before (several for multi-step schedules)."""
        return () if self.layer is None else (self.layer,)

    def signals(self) -> tuple[SignalRequest, ...]:
        """Signals this reducer reads; the adapter captures exactly these."""
        return ()

    def configure(self, info: ModelInfo) -> None:
        """Resolve defaults that depend on the model (layers, ...); called once when patching."""

    def parts(self) -> list[Reducer]:
        """The reducers this one installs as (a method acting in several stages returns one per stage)."""
        return [self]

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: float = 1.0) -> int:
        """Tokens to keep for an image that has `n` tokens when it reaches this reducer (at `layer`);
        `entry` is how many it had when entering the LLM (schedules relative to that use it); `share`
        is the part of an int budget this (sub-)image gets (LLaVA-NeXT splits it over base and crops)."""
        if self.keep is None:
            raise ParameterError(f"{self.name}: no budget given; pass keep=<int tokens or float fraction>")
        return resolve_keep(scaled(self.keep, share), n)

    # --- what the reducer computes -------------------------------------------------------------
    def select(self, x: StageInput) -> Selection:
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the reducer, its stage and its parameters."""
        params = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.init
        )
        layers = ",".join(map(str, self.layers))
        where = f"{self.stage}" + (f" @ LLM layer {layers}" if layers else "")
        return f"{self.name}({params}) [{where}]"


def scaled(keep: Keep, share: float) -> Keep:
    """An int budget scaled by a share (at least 1 token); fractions are unchanged."""
    if isinstance(keep, int) and not isinstance(keep, bool) and share != 1.0:
        return max(1, round(keep * share))
    return keep


def build(cls: type[Reducer], params: dict[str, Any]) -> Reducer:
    """Instantiate a reducer class, turning unknown parameter names into a ParameterError."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in params if k not in names]
    if unknown:
        from vtoken.errors import close_names

        hints = "".join(close_names(k, names) for k in unknown)
        raise ParameterError(
            f"{cls.name} has no parameter {', '.join(map(repr, unknown))}.{hints} "
            f"Its parameters: {', '.join(names)}."
        )
    return cls(**params)
