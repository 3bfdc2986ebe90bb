"""Encoder-stage token merging: `tome`, `pitome`, `dymu`.

These act inside every ViT layer up to the one whose output is used (the LLaVA feature layer, or
the last block of a timm / open_clip tower). The adapter calls `plan()` per layer with the layer's
metric (`metric_kind`: the keys, mean over heads; PiToMe's presets may use the token states) and
applies the plan between the attention residual and the MLP (the papers' placement; PiToMe's HF
preset merges the layer output, as the authors' LLaVA patch), with proportional attention (log size
added to the attention logits) through the attention mask, so SDPA stays in use.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import (
    MergePlan,
    bipartite_plan,
    dymu_schedule,
    energy_bipartite_plan,
    energy_plan,
    representatives,
    solve_schedule,
    tome_schedule,
)
from vtoken.reducers.base import ModelInfo, Reducer, Selection, Stage, StageInput
from vtoken.registry import register


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
        self._solve()

    def _solve(self) -> None:
        """Resolve what depends on the number of tokens entering the tower (`_tokens`)."""

    def resized(self, tokens: int) -> EncoderMerge:
        """This reducer for a tower run with `tokens` patch tokens (timm `dynamic_img_size`): a copy whose
        token-dependent schedule is solved again (itself if the count is the configured one)."""
        if tokens == self._tokens:
            return self
        other = copy.copy(self)
        other._tokens = tokens
        other._solve()
        return other

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: float = 1.0) -> int:
        return n  # encoder merging sets the count; boundary/decoder budgets apply to what it leaves

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        """The merge of `layer` (None: no merge there). metric: (B, T, c), see `metric_kind`."""
        raise NotImplementedError

    def select(self, x: StageInput) -> Selection:  # not a boundary reducer
        raise NotImplementedError


def _solve_keep(name: str, keep: int | float, tokens: int, layers: int, prefix: int) -> list[int]:
    try:
        return solve_schedule(tokens, resolve_keep(keep, tokens), layers, prefix)
    except ValueError as e:
        raise BudgetError(f"{name}: {e}") from None


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
PITOME_PRESETS: dict[str, dict[str, Any]] = {
    "timm": {"margin": 0.75, "first_half": "bsm", "metric": "keys", "mean": "size", "proportional": False},
    "lavis": {"margin": 0.95, "first_half": "energy", "metric": "states", "mean": "size", "proportional": False},
    "hf": {"margin": 0.9, "first_half": "tome", "metric": "output", "mean": "plain", "proportional": False},
}
PITOME_BACKBONES = {"timm": "timm", "open_clip": "lavis"}  # any other family: an HF tower ("hf")


@register("pitome")
@dataclass
class PiToMe(EncoderMerge):
    """PiToMe (Tran et al., NeurIPS 2024), by default exactly as the authors' code runs on the backbone
    (`preset`: "timm" for timm ViTs, "lavis" for open_clip towers, "hf" for HF CLIP / LLaVA; see
    PITOME_PRESETS; each field below left at None takes the preset's value):

    energy (§3.1, eq. 4) E_i = mean_j f(cos_ij - m_l) over the non-prefix tokens, f = ELU(., alpha)
    (the code; `energy="paper"`: f(x) = x above the margin), margin m_l = margin (1 - l / L) over all L
    layers of the tower. Each layer removes k = floor(T - T * ratio) of its T non-prefix tokens (T with
    CLS in the HF preset's ToMe layers): energy layers take the 2k highest-energy tokens, split by
    energy rank into A / B, and merge every a into its most similar b; the low-energy rest is
    protected (§3.2). `first_half` says what the first half of the layers runs instead: "bsm" (the
    authors' `pitome_bsm`, energy-sorted bipartite matching of all tokens, timm), "tome" (plain ToMe
    matching, HF) or "energy" (LAVIS). `metric`: "keys" (mean over heads), "states" (tokens after the
    attention residual) or "output" (the layer output; the merge then follows the MLP). `mean`:
    "size" (size-weighted) or "plain". `proportional`: the authors use none. `hf_split=True` is the
    older spelling of first_half="tome". `keep` solves a constant ratio that leaves `keep` tokens.
    LLaVA-1.5-7B default: ratio 0.9.
    """

    ratio: float | None = None
    margin: float | None = None
    alpha: float = 1.0
    energy: Literal["code", "paper"] = "code"
    preset: Literal["timm", "lavis", "hf"] | None = None
    first_half: Literal["bsm", "tome", "energy"] | None = None
    metric: Literal["keys", "states", "output"] | None = None
    mean: Literal["size", "plain"] | None = None
    proportional: bool | None = None
    hf_split: bool = False
    _k: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is None and self.keep is None:
            self.ratio = 0.9
        if self.ratio is not None and self.keep is not None:
            raise ParameterError("pitome: give either ratio (kept per layer) or keep (tokens left), not both")
        if self.ratio is not None and not (isinstance(self.ratio, numbers.Real) and 0.5 <= self.ratio <= 1.0):
            raise ParameterError(f"pitome: ratio (tokens kept per layer) must be in [0.5, 1], got {self.ratio}")
        for name, allowed in (("energy", ("code", "paper")), ("preset", (None, *PITOME_PRESETS)),
                              ("first_half", (None, "bsm", "tome", "energy")),
                              ("metric", (None, "keys", "states", "output")), ("mean", (None, "size", "plain")),
                              ("proportional", (None, True, False)), ("hf_split", (True, False))):
            value = getattr(self, name)
            if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
                raise ParameterError(f"pitome: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if self.margin is not None and not (isinstance(self.margin, numbers.Real) and math.isfinite(self.margin)):
            raise ParameterError(f"pitome: margin must be a finite number, got {self.margin!r}")
        if self.hf_split:
            if self.first_half not in (None, "tome"):
                raise ParameterError("pitome: hf_split=True means first_half='tome'; give one of them")
            self.first_half = "tome"

    def configure(self, info: ModelInfo) -> None:
        if self.preset is None:
            self.preset = PITOME_BACKBONES.get(info.family, "hf")
        for name, value in PITOME_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().configure(info)

    @property
    def metric_kind(self) -> Literal["keys", "states", "output"]:
        return self.metric or "keys"

    @property
    def weighted(self) -> bool:
        return self.mean != "plain"

    def layer_kind(self, layer: int) -> Literal["bsm", "tome", "energy"]:
        """What `layer` runs: "energy" (PiToMe), or the preset's first-half matching."""
        if self.first_half == "bsm" and layer < math.ceil(self._depth / 2):
            return "bsm"
        if self.first_half == "tome" and layer <= self._depth // 2:
            return "tome"
        return "energy"

    def _ks(self, ratio: float) -> list[int]:
        t, out = self._tokens, []
        for layer in range(self._layers):
            if self.layer_kind(layer) == "tome":  # the authors' ToMe count runs over all tokens
                n = t + self._prefix
                k = min(math.floor(n - n * ratio), t // 2)
            else:
                k = math.floor(t - t * ratio)
            out.append(k)
            t -= k
        return out

    def _solve(self) -> None:
        if self.keep is None:
            self._k = self._ks(self.ratio)
            return
        keep = resolve_keep(self.keep, self._tokens)
        lo, hi = 0.5, 1.0  # bisect the constant ratio, then trim the last layer to hit keep exactly
        for _ in range(60):
            mid = (lo + hi) / 2
            if self._tokens - sum(self._ks(mid)) >= keep:
                hi = mid
            else:
                lo = mid
        ks = self._ks(hi)
        left = self._tokens - sum(ks)
        extra = left - keep
        t_last = self._tokens - sum(ks[:-1])
        if extra < 0 or 2 * (ks[-1] + extra) > t_last:
            raise BudgetError(f"pitome: cannot reach keep={keep} from {self._tokens} tokens in {self._layers} layers")
        ks[-1] += extra
        self._k = ks

    @property
    def schedule(self) -> list[int]:
        return list(self._k)

    def margin_at(self, layer: int) -> float:
        """m_l = m - m (l / L) over all L layers of the tower (the authors' schedule, every patch)."""
        return self.margin - self.margin * (layer / max(self._depth, 1))

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        k = self._k[layer] if layer < len(self._k) else 0
        if k <= 0:
            return None
        kind = self.layer_kind(layer)
        ks = [k] * len(counts)
        if kind == "tome":
            return bipartite_plan(metric, counts, ks, protect=self._prefix)[0]
        if kind == "bsm":
            return energy_bipartite_plan(metric, counts, ks, self.margin_at(layer), self.alpha,
                                         prefix=self._prefix, variant=self.energy)
        return energy_plan(metric, counts, ks, self.margin_at(layer), self.alpha, prefix=self._prefix,
                           variant=self.energy)


_CALIBRATE = "run `vtoken calibrate --model MODEL --images DIR --out t.json` and pass thresholds='t.json'"


def _threshold_list(values: Any, where: str) -> list[float]:
    """Validated per-layer thresholds: real numbers (inf: no merging at that layer), no NaN, not empty."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ParameterError(f"dymu: {where} must be a list of per-layer thresholds (floats), got {values!r}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad:
        raise ParameterError(f"dymu: {where} must hold numbers (one per layer; inf: no merging there), got {bad[0]!r}")
    out = [float(v) for v in values]
    if not out:
        raise ParameterError(f"dymu: {where} is empty; {_CALIBRATE} (or a list of floats, one per layer)")
    if any(math.isnan(v) for v in out):
        raise ParameterError(f"dymu: {where} contains NaN; {_CALIBRATE} (inf means no merging at a layer)")
    return out


@register("dymu")
@dataclass
class DyMU(EncoderMerge):
    """DyMU's DToMe (Wang et al., 2025, §3.1): ToMe's bipartite structure on the keys, but each layer
    merges every A token whose best similarity exceeds that layer's threshold tau_l (at most
    (T - 1) // 2 per layer), so the token count depends on the image. Thresholds come from
    `vtoken calibrate` (a JSON file with presets, or a list, one per layer; inf: no merging there);
    `preset` picks low / mid / high (DyMU's r = 21 / 16 / 8 per layer over all 24 CLIP layers at
    calibration; ~ 93 / 208 / 392 tokens at LLaVA-1.5's feature layer). `keep`: at most this many
    tokens per image leave the tower — each layer merges at least the even schedule's r_l best
    proposals (a vtoken extension; the thresholds may merge more). Merged tokens carry sizes
    (proportional attention); `vtu` unmerges them virtually inside the LLM.
    """

    adaptive: ClassVar[bool] = True
    thresholds: str | Path | list[float] | None = None
    preset: str = "mid"
    _tau: list[float] = field(default_factory=list, init=False, repr=False)
    _min_r: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.preset, str):
            raise ParameterError(f"dymu: preset must be a name (low / mid / high), got {self.preset!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, (str, Path)):
            _threshold_list(self.thresholds, "thresholds")

    def _load(self, path: str | Path) -> list[float]:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ParameterError(f"dymu: threshold file {str(path)!r} does not exist; {_CALIBRATE}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ParameterError(f"dymu: cannot read thresholds from {str(path)!r} ({e}); {_CALIBRATE}") from None
        if isinstance(data, list):
            return _threshold_list(data, f"{path}")
        presets = data.get("presets", data) if isinstance(data, dict) else None
        if not isinstance(presets, dict):
            raise ParameterError(f"dymu: {path} is not a `vtoken calibrate` file (no presets); {_CALIBRATE}")
        if self.preset not in presets:
            raise ParameterError(f"dymu: {path} has no preset {self.preset!r} (has {', '.join(presets)})")
        entry = presets[self.preset]
        if isinstance(entry, dict):
            if "thresholds" not in entry:
                why = entry.get("error", "no thresholds stored")
                raise ParameterError(f"dymu: preset {self.preset!r} in {path} was not calibrated: {why}")
            entry = entry["thresholds"]
        return _threshold_list(entry, f"preset {self.preset!r} in {path}")

    def configure(self, info: ModelInfo) -> None:
        if self.thresholds is None:
            raise ParameterError(f"dymu needs per-layer thresholds: {_CALIBRATE} (or a list of floats)")
        super().configure(info)
        tau = self.thresholds
        self._tau = self._load(tau) if isinstance(tau, (str, Path)) else _threshold_list(tau, "thresholds")
        if len(self._tau) < self._layers:
            raise ParameterError(
                f"dymu: {len(self._tau)} thresholds for {self._layers} merging layers; give one per layer "
                "(inf: no merging there), e.g. from `vtoken calibrate` for this model"
            )

    def _solve(self) -> None:
        self._min_r = ([] if self.keep is None else
                       _solve_keep("dymu", self.keep, self._tokens, self._layers, self._prefix))

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        tau = self._tau[layer] if layer < len(self._tau) else math.inf
        least = self._min_r[layer] if layer < len(self._min_r) else 0
        if math.isinf(tau) and tau > 0 and least <= 0:
            return None
        return bipartite_plan(metric, counts, protect=self._prefix, threshold=tau,
                              min_r=[least] * len(counts) if least > 0 else None)[0]


@dataclass
class MergedGroups(Reducer):
    """Internal boundary step after encoder merging: each merged group reaches the LLM as one token,
    its representative (the group's first, i.e. smallest, raster position) with the group's size.
    The adapter inserts it first among the boundary reducers; the count depends on the image."""

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    adaptive: ClassVar[bool] = True
    keep: int | float | None = 1.0

    def signals(self):
        from vtoken.reducers.base import SignalRequest

        return (SignalRequest("encoder_groups", -1),)

    def select(self, x: StageInput) -> Selection:
        group = x.signal(self.signals()[0]).long()  # (n_img, N) merged token of each raster position
        rep, size = representatives(group, x.valid, x.positions)
        keep = x.valid & (rep == x.positions)
        return Selection(keep=keep, sizes=size.to(x.sizes.dtype), counts=keep.sum(1).tolist())


@dataclass
class DyMUCalibration(EncoderMerge):
    """Finds DyMU's per-layer thresholds (DyMU §3.1, "threshold finding"), as the authors' batch-level
    matching: run ToMe-style merging with a fixed r_l per layer at the *batch* level — rank all
    B * |A| best-match edges of the batch and merge exactly the top B * r_l (also when their scores are
    negative) — record tau_l = max(score of the highest unmerged edge, 0) (only the recorded value is
    clamped), and average tau_l over batches (a running mean). Schedule: `r_total` merges spread
    evenly over all the tower's layers (DyMU's configs: r_total = 504 / 384 / 192 on CLIP-L, i.e.
    21 / 16 / 8 per layer), or `target` tokens leaving the last merge layer (vtoken's even schedule,
    never above ToMe's 50% per layer). Each layer merges at most (T - 1) // 2 per image. Not
    registered: used by `vtoken calibrate`."""

    target: int | None = None
    r_total: int | None = None
    _r: list[int] = field(default_factory=list, init=False, repr=False)
    _sum: list[float] = field(default_factory=list, init=False, repr=False)
    _n: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.target is None) == (self.r_total is None):
            raise ParameterError("dymu calibration: give exactly one of target (tokens left) or r_total")

    def configure(self, info: ModelInfo) -> None:
        super().configure(info)
        self._sum = [0.0] * self._layers
        self._n = [0] * self._layers

    def _solve(self) -> None:
        if self.r_total is not None:
            self._r = dymu_schedule(self.r_total, self._depth)[:self._layers]
            return
        try:
            self._r = solve_schedule(self._tokens, self.target, self._layers, self._prefix)
        except ValueError as e:
            raise BudgetError(f"dymu calibration: {e} (at most half the tokens merge per layer)") from None

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        r = self._r[layer] if layer < len(self._r) else 0
        if r <= 0:
            return None
        _, node_max = bipartite_plan(metric, counts, [0] * len(counts), protect=self._prefix)
        cap = torch.tensor([max(0, (c - self._prefix) // 2) for c in counts], device=node_max.device)
        # an image's own best edges beyond its cap cannot merge: rank only the ones that can
        own = node_max.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        node_max = node_max.masked_fill(own >= cap[:, None], float("-inf"))
        flat = node_max.flatten()
        finite = int(torch.isfinite(flat).sum())
        k = min(r * len(counts), finite)
        order = flat.argsort(descending=True, stable=True)
        tau = float(flat[order[k]]) if k < finite else 0.0
        self._sum[layer] += max(tau, 0.0)  # the authors clamp the recorded threshold only
        self._n[layer] += 1
        # merge exactly the batch's top k edges: each image merges its own best edges among them
        per_image = torch.bincount(order[:k] // node_max.shape[1], minlength=len(counts)).tolist()
        return bipartite_plan(metric, counts, per_image, protect=self._prefix)[0]

    @property
    def thresholds(self) -> list[float]:
        return [s / n if n else math.inf for s, n in zip(self._sum, self._n)]

    @property
    def schedule(self) -> list[int]:
        return list(self._r)
