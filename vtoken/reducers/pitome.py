"""`pitome`: PiToMe's energy-score merging inside the vision tower (encoder stage), per-backbone presets."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import (
    MergePlan,
    bipartite_plan,
    energy_bipartite_plan,
    energy_plan,
)
from vtoken.reducers.base import ModelInfo
from vtoken.reducers.merging import EncoderMerge
from vtoken.registry import register

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
