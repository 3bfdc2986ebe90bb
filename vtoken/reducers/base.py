"""The reducer contract: what a reducer declares (stage, signals, budget) and computes (a Selection).

A reducer is a dataclass registered by name. It never touches a model module: the adapter hands it a
`StageInput` (the visual tokens of every image at one point of the model, with the signals it asked
for) and applies the `Selection` it returns through the token ledger.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from vtoken.budget import Keep, check_keep, resolve_keep
from vtoken.errors import BudgetError, ParameterError, SignalError

Stage = Literal["encoder", "boundary", "decoder", "attention"]
Share = float | tuple[int, int]  # an int budget's share: a fraction, or (frame, frames) of a video (`scaled`)
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
      - ``"llm_pagerank"``: PageRank importance of each row at LLM layer `layer` (AIM): the causal
        attention of every prompt row with temperature, power-iterated (`vtoken.signals.pagerank`);
        `params` = (tau, steps). Side path from the layer's captured q/k with its RoPE.
    """

    kind: str
    layer: int
    query: str = "last"
    params: tuple[float, ...] = ()


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
    tower: str = "vit"  # vision tower kind: "vit" (CLIP / SigLIP / timm ViT) or "qwen-vit" (Qwen's windowed ViT)
    llm: str = ""  # the language model's architecture (its config's model_type, e.g. "llama", "qwen2")


@dataclass
class Selection:
    """What a reducer returns for each image: which tokens survive, and (for merges) their new content.

    keep:   (n_img, N) bool; exactly the per-image budget is True (never a padded slot).
    values: (n_img, N, d) replacement features, read at kept slots only (None: unchanged).
    sizes:  (n_img, N) how many original tokens each survivor stands for (None: unchanged).
    counts: reducers whose count depends on the content (`adaptive = True`) report the number of
            True slots per image here; the budget is then an upper bound. A (n_img,) tensor is read
            back in an exact layout and stays on the device in a static one (`device_counts`).
    mix:    (n_img, N, N) for merges, when the input asks for it (`StageInput.want_mix`): row j holds
            the weight of every input slot in kept slot j's new value (a kept, unmerged slot: a one-hot
            row), so that per-token features carried beside the tokens (Qwen3-VL's deepstack) can be
            combined the same way. None: no merge, or not asked.
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    # adaptive reducers only: the kept count per image, host ints or (`Reducer.device_counts`) a device tensor
    counts: list[int] | torch.Tensor | None = None
    mix: torch.Tensor | None = None


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
    want_mix:  features travel beside the tokens (Qwen3-VL's deepstack): a merging reducer must
               describe its merge as `Selection.mix`.
    parts:     per image, (frame, frames) when it is one frame of a video (a video's frames are
               consecutive images), else None; None when no image is a video frame.
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
    parts: list[tuple[int, int] | None] | None = None  # per image: (frame, frames) of a video, else None
    want_mix: bool = False
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
    # an adaptive decoder reducer that reports its counts as a device tensor, bounded by its budget: a
    # static (graph-safe) layout keeps the bound's rows and pads what it drops (ToDRE's stage 2)
    device_counts: ClassVar[bool] = False
    full_grid: ClassVar[bool] = False  # reads each image's whole token grid: must be the first to reduce
    grid_shape: ClassVar[bool] = False  # reads each image's rows and columns, not only its token count
    keeps_all: ClassVar[bool] = False  # never drops a token (composition checks ignore it)
    # the class's own `select` is tested to keep exactly the budget: the stage does not re-check it on
    # the host (a device read); subclasses that override `select` are checked again
    counts_tested: ClassVar[bool] = False
    order: ClassVar[int] = 0  # among the reducers of one reduction point: lower runs first
    internal: ClassVar[bool] = False  # a step vtoken adds itself (not listed in Patch.reducers / describe)
    # reads the tower's attention resampled as the LLM's tokens are (LLaVA-OneVision's bilinear pooling),
    # as its authors do; reducers without it are refused where LLM tokens are not tower patches
    resampled_attention: ClassVar[bool] = False
    keep: Keep | None = None
    renumber: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.keep, numbers.Integral) and not isinstance(self.keep, bool):
            self.keep = int(self.keep)  # numpy / torch integers
        elif isinstance(self.keep, float) and type(self.keep) is not float:
            self.keep = float(self.keep)
        check_keep(self.keep)
        if self.keep is None and type(self).budget is Reducer.budget:
            raise BudgetError(f"{self.name}: no budget given (keep=None); pass keep=<int tokens or float fraction>")

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
        """Resolve defaults that depend on the model (layers, ...), in place; `configured` calls it on
        a copy (subclasses override this one)."""

    def configured(self, info: ModelInfo) -> list[Reducer]:
        """New reducers for `info`'s model: this one's parts with the model's defaults resolved, frozen
        (the reducer given to `vtoken.patch` is never changed, and a patch's reducers cannot be)."""
        new = self.thawed()
        new.configure(info)
        parts = new.parts()
        for part in parts:
            part.__dict__["_frozen"] = True
        return parts

    def thawed(self) -> Reducer:
        """A modifiable shallow copy (for `configured` and schedule re-solving); `copy.copy` gives the
        same. A deep copy (of a patched model) keeps its reducers frozen."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__["_frozen"] = False
        return new

    __copy__ = thawed

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise ParameterError(
                f"{self.name}: the reducers of a patch are frozen (setting {name!r}); build a new reducer, "
                f"e.g. vtoken.get({self.name!r})({name}=...), and patch again"
            )
        object.__setattr__(self, name, value)

    def parts(self) -> list[Reducer]:
        """The reducers this one installs as (a method acting in several stages returns one per stage)."""
        return [self]

    def static_count(self) -> int | None:
        """An adaptive reducer's kept count per image when the model's configuration alone fixes it
        (`MergedGroups` after a fixed encoder schedule), else None: the content decides."""
        return None

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
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


@dataclass
class MultiStage(Reducer):
    """A method that acts in several stages (ToDRE, AIM, HoliTom): it installs as one reducer per stage
    (`_build` makes them from this one's parameters, e.g. with `shared_fields`), each configured for
    the model; it never selects itself."""

    _parts: list[Reducer] = field(default_factory=list, init=False, repr=False)

    def _build(self) -> None:
        raise NotImplementedError

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: Share = 1.0) -> int:
        raise NotImplementedError(f"{self.name} acts through its parts ({', '.join(p.name for p in self._parts)})")

    def configure(self, info: ModelInfo) -> None:
        self._build()
        for p in self._parts:
            p.configure(info)

    def parts(self) -> list[Reducer]:
        return list(self._parts)


def scaled(keep: Keep, share: Share) -> Keep:
    """An int budget scaled by a share (at least 1 token); fractions are unchanged. A share
    (frame, frames) is one frame of a video whose int budget is split evenly over its frames (the
    first `keep % frames` frames get one more; each frame at least 1)."""
    if isinstance(keep, int) and not isinstance(keep, bool) and isinstance(share, tuple):
        f, t = share
        return max(1, keep // t + (1 if f < keep % t else 0))
    if isinstance(keep, int) and not isinstance(keep, bool) and share != 1.0:
        return max(1, round(keep * share))
    return keep


# --- parameter validation ------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of `cls`'s init fields ({} if they cannot be resolved)."""
    if cls not in _HINTS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a forward reference only visible to type checkers: skip the generic check
            hints = {}
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}
    return _HINTS[cls]


def _options(hint: Any) -> list[Any] | None:
    """The simple alternatives of an annotation (bool, int, float, str, None, Literal values), or None
    if one of them is a type the generic check does not judge (lists, tuples, classes ...)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(hint):
            sub = _options(arg)
            if sub is None:
                return None
            out += sub
        return out
    if origin is Literal:
        return [("literal", v) for v in typing.get_args(hint)]
    if hint in (bool, int, float, str, type(None)):
        return [hint]
    return None


def _matches(value: Any, option: Any) -> Any:
    """`value` converted to `option` (bool / int / float / str / None / a Literal value), or _NO."""
    if isinstance(option, tuple):
        lit = option[1]
        return value if type(value) is type(lit) and value == lit else _NO
    if option is type(None):
        return None if value is None else _NO
    if option is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):  # True / False are never numbers or strings here
        return _NO
    if option is int:
        return int(value) if isinstance(value, numbers.Integral) else _NO
    if option is float:
        if isinstance(value, numbers.Real) and math.isfinite(value):
            return float(value)
        return _NO
    return value if isinstance(value, str) else _NO


_NO = object()


def _expected(options: list[Any]) -> str:
    words = {bool: "True or False", int: "an int", float: "a finite number", str: "a string", type(None): "None"}
    lits = [repr(o[1]) for o in options if isinstance(o, tuple)]
    parts = [words[o] for o in options if not isinstance(o, tuple) and not (o is int and float in options)]
    if lits:
        parts.insert(0, "one of " + ", ".join(lits))
    return " or ".join(dict.fromkeys(parts))


def check_fields(reducer: Reducer) -> None:
    """Check every init field of a reducer against its annotation where that is simple (bool, int,
    float, str, None, Literal and unions of them): a bool is not a number, a number is finite, a
    Literal takes only its values. Numbers are converted to the annotated builtin type (numpy ints ...).
    `keep` is checked by `vtoken.budget.check_keep`; other annotations are left to the reducer."""
    for name, hint in _field_hints(type(reducer)).items():
        if name == "keep":
            continue
        options = _options(hint)
        if options is None:
            continue
        value = getattr(reducer, name)
        for option in options:
            converted = _matches(value, option)
            if converted is not _NO:
                if converted is not value:
                    setattr(reducer, name, converted)
                break
        else:
            raise ParameterError(f"{reducer.name}: {name} must be {_expected(options)}, got {value!r}")


def check_range(reducer: Reducer, name: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, error: type[Exception] = ParameterError) -> None:
    """Raise unless the (already type-checked) numeric field `name` lies in the given interval (None: no check)."""
    value = getattr(reducer, name)
    if value is None:
        return
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        left = "-inf" if lo is None else repr(lo)
        right = "inf" if hi is None else repr(hi)
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise error(f"{reducer.name}: {name} must lie in {interval}, got {value!r}")


def shared_fields(composite: Reducer, part: type[Reducer], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A multi-stage reducer's values of the parameters one of its stages declares too (by name, so a
    parameter a stage adds is handed over or a test fails): the stage's constructor arguments."""
    mine = {f.name for f in dataclasses.fields(composite) if f.init}
    return {f.name: getattr(composite, f.name) for f in dataclasses.fields(part)
            if f.init and f.name in mine and f.name not in skip}


def check_unused(reducer: Reducer, names: list[str], reason: str) -> None:
    """Refuse parameters set away from their defaults that the chosen configuration ignores."""
    defaults = {f.name: f.default for f in dataclasses.fields(reducer) if f.init}
    given = [n for n in names if getattr(reducer, n) != defaults.get(n)]
    if given:
        shown = ", ".join(f"{n}={getattr(reducer, n)!r}" for n in given)
        them = "it" if len(given) == 1 else "them"
        raise ParameterError(f"{reducer.name}: {shown} would be ignored ({reason}); drop {them}")


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


@runtime_checkable
class EncoderReducer(Protocol):
    """What an encoder-stage merger gives the vision-tower adapters (`adapters/encoder.py`): a merge
    plan per layer from that layer's metric, and how the merged tokens are formed and attended."""

    name: ClassVar[str]
    adaptive: ClassVar[bool]
    proportional: bool  # add log(size) to the attention logits (ToMe §3)
    vtu: str | None  # virtual token unmerging in the LLM: "expand", "exact" or None
    metric_kind: str  # "keys" / "states" (merge before the MLP) or "output" (merge after it)
    weighted: bool  # size-weighted averages (True) or plain means of the merged tokens
    prefix_tokens: int  # tokens before the patches that never merge (CLS, distillation, registers)

    def resized(self, tokens: int) -> EncoderReducer:
        """The reducer for a tower run with `tokens` patch tokens (its schedule solved again)."""

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> Any:
        """The merge plan (`vtoken.ops.merge.MergePlan`) of `layer`, or None for no merge there."""

