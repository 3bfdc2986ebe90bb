"""`dymu`: DyMU's dynamic merging by per-layer thresholds (DToMe), and their calibration."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import (
    MergePlan,
    bipartite_plan,
    dymu_schedule,
    solve_schedule,
)
from vtoken.reducers.base import ModelInfo
from vtoken.reducers.merging import EncoderMerge, _solve_keep
from vtoken.registry import register

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
