"""Encoder-stage token merging: `tome`, `pitome`, `dymu`.

These act inside every ViT layer up to the one whose output is used (the LLaVA feature layer, or
the last block of a timm / open_clip tower). The adapter calls `plan()` per layer with the layer's
keys (mean over heads) and applies the plan between the attention residual and the MLP (the
papers' placement), with proportional attention (log size added to the attention logits) through
the attention mask, so SDPA stays in use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError
from vtoken.ops.merge import MergePlan, bipartite_plan, energy_plan, solve_schedule, tome_schedule
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
    _tokens: int = field(default=0, init=False, repr=False)  # patch tokens entering the tower
    _prefix: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vtu not in (None, "expand", "exact"):
            raise ParameterError(f"{self.name}: vtu must be None, 'expand' or 'exact', got {self.vtu!r}")

    def configure(self, info: ModelInfo) -> None:
        if info.vision_layers is None or info.vision_tokens is None:
            raise ParameterError(f"{self.name} merges inside a vision transformer; {info.family} has none")
        self._layers = (info.feature_layer + 1) if info.feature_layer is not None else info.vision_layers
        self._tokens = info.vision_tokens
        self._prefix = info.prefix_tokens

    def budget(self, n: int, layer: int | None = None, entry: int | None = None, share: float = 1.0) -> int:
        return n  # encoder merging sets the count; boundary/decoder budgets apply to what it leaves

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        """The merge of `layer` (None: no merge there). metric: (B, T, c) keys, mean over heads."""
        raise NotImplementedError

    def select(self, x: StageInput) -> Selection:  # not a boundary reducer
        raise NotImplementedError


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

    def configure(self, info: ModelInfo) -> None:
        super().configure(info)
        if self.keep is not None:
            keep = resolve_keep(self.keep, self._tokens)
            try:
                self._schedule = solve_schedule(self._tokens, keep, self._layers, self._prefix)
            except ValueError as e:
                raise BudgetError(f"tome: {e}") from None
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


@register("pitome")
@dataclass
class PiToMe(EncoderMerge):
    """PiToMe (Tran et al., NeurIPS 2024), following the official code (`pitome`):

    energy E_i = mean_j ELU(cos_ij - m_l, alpha) over the non-CLS tokens (`energy="paper"`: the
    paper's f(x) = x above the margin), margin m_l = margin * (1 - l / L); each layer removes
    k = floor(T - T * ratio) of its T non-CLS tokens: the 2k highest-energy tokens split by energy
    rank into A / B and every a merges into its most similar b; the low-energy rest is protected.
    Size-weighted averages with proportional attention (the timm / LAVIS code; the HF/LLaVA patch
    uses plain means on the layer's output states after the MLP, which vtoken does not reproduce).
    `hf_split=True` reproduces the HF/LLaVA patch, whose first half of the layers (0-12 of 24) runs
    plain ToMe matching at the same ratio. `keep` solves a constant ratio that leaves `keep` tokens.
    LLaVA-1.5-7B default: ratio 0.9.
    """

    ratio: float | None = None
    margin: float = 0.9
    alpha: float = 1.0
    energy: Literal["code", "paper"] = "code"
    hf_split: bool = False
    _k: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is None and self.keep is None:
            self.ratio = 0.9
        if self.ratio is not None and self.keep is not None:
            raise ParameterError("pitome: give either ratio (kept per layer) or keep (tokens left), not both")
        if self.ratio is not None and not 0.5 <= self.ratio <= 1.0:
            raise ParameterError(f"pitome: ratio (tokens kept per layer) must be in [0.5, 1], got {self.ratio}")
        if self.energy not in ("code", "paper"):
            raise ParameterError(f"pitome: energy must be 'code' or 'paper', got {self.energy!r}")

    def _ks(self, ratio: float) -> list[int]:
        t, out = self._tokens, []
        for _ in range(self._layers):
            k = math.floor(t - t * ratio)
            out.append(k)
            t -= k
        return out

    def configure(self, info: ModelInfo) -> None:
        super().configure(info)
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
        return self.margin - self.margin * layer / max(self._layers, 1)

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        k = self._k[layer] if layer < len(self._k) else 0
        if k <= 0:
            return None
        if self.hf_split and layer <= round(self._layers * 12 / 23):
            return bipartite_plan(metric, counts, [k] * len(counts), protect=self._prefix)[0]
        return energy_plan(metric, counts, [k] * len(counts), self.margin_at(layer), self.alpha,
                           prefix=self._prefix, variant=self.energy)


@register("dymu")
@dataclass
class DyMU(EncoderMerge):
    """DyMU's DToMe (Wang et al., 2025, §3.1): ToMe's bipartite structure on the keys, but each layer
    merges every A token whose best similarity exceeds that layer's threshold tau_l (at most
    (T - 1) // 2 per layer), so the token count depends on the image. Thresholds come from
    `vtoken calibrate` (a JSON file with presets, or a list); `preset` picks low / mid / high
    (~ 72 / 192 / 384 tokens on LLaVA-1.5, r = 21 / 16 / 8 per layer at calibration). Merged tokens
    carry sizes (proportional attention); `vtu` unmerges them virtually inside the LLM.
    """

    adaptive: ClassVar[bool] = True
    thresholds: str | list[float] | None = None
    preset: Literal["low", "mid", "high"] = "mid"
    _tau: list[float] = field(default_factory=list, init=False, repr=False)

    def configure(self, info: ModelInfo) -> None:
        super().configure(info)
        if self.thresholds is None:
            raise ParameterError(
                "dymu needs per-layer thresholds: run `vtoken calibrate --model MODEL --images DIR --out t.json` "
                "and pass thresholds='t.json' (or a list of floats)"
            )
        tau = self.thresholds
        if isinstance(tau, (str, Path)):
            data = json.loads(Path(tau).read_text())
            presets = data.get("presets", data)
            if self.preset not in presets:
                raise ParameterError(f"dymu: {tau} has no preset {self.preset!r} (has {', '.join(presets)})")
            tau = presets[self.preset]["thresholds"] if isinstance(presets[self.preset], dict) else presets[self.preset]
        self._tau = [float(x) for x in tau]
        if len(self._tau) < self._layers:
            self._tau += [math.inf] * (self._layers - len(self._tau))

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        tau = self._tau[layer] if layer < len(self._tau) else math.inf
        if math.isinf(tau):
            return None
        return bipartite_plan(metric, counts, protect=self._prefix, threshold=tau)[0]


@dataclass
class MergedGroups(Reducer):
    """Internal boundary step after encoder merging: each merged group reaches the LLM as one token,
    its representative (the group's first, i.e. smallest, raster position) with the group's size.
    The adapter inserts it first among the boundary reducers; the count depends on the image."""

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


def representatives(group: torch.Tensor, valid: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For tokens labelled by merged group (n, N): each token's group representative (the group's
    smallest position) and the group's size, both (n, N)."""
    n_img, n = group.shape
    idx = torch.where(valid, group, n)
    big = torch.full((n_img, n + 1), n, dtype=torch.long, device=group.device)
    first = big.scatter_reduce(1, idx, positions.long(), reduce="amin")
    size = torch.zeros(n_img, n + 1, device=group.device).scatter_add_(1, idx, valid.float())
    return first.gather(1, idx), size.gather(1, idx)


@dataclass
class DyMUCalibration(EncoderMerge):
    """Finds DyMU's per-layer thresholds (DyMU §3.1, "threshold finding"): run ToMe-style merging with
    a fixed r_l per layer at the *batch* level — rank all B * |A| best-match edges of the batch, merge
    exactly the top B * r_l, and record tau_l = max(score of the highest unmerged edge, 0) — then average
    tau_l over batches (a running mean). `target` tokens leave the last merge layer; r_l is the even
    schedule (remainder on the first layers, never above ToMe's 50% per layer). Not registered: used
    by `vtoken calibrate`."""

    target: int = 192
    _r: list[int] = field(default_factory=list, init=False, repr=False)
    _sum: list[float] = field(default_factory=list, init=False, repr=False)
    _n: list[int] = field(default_factory=list, init=False, repr=False)

    def configure(self, info: ModelInfo) -> None:
        super().configure(info)
        try:
            self._r = solve_schedule(self._tokens, self.target, self._layers, self._prefix)
        except ValueError as e:
            raise BudgetError(f"dymu calibration: {e} (at most half the tokens merge per layer)") from None
        self._sum = [0.0] * self._layers
        self._n = [0] * self._layers

    def plan(self, layer: int, metric: torch.Tensor, counts: list[int]) -> MergePlan | None:
        r = self._r[layer] if layer < len(self._r) else 0
        if r <= 0:
            return None
        _, node_max = bipartite_plan(metric, counts, [0] * len(counts), protect=self._prefix)
        edges = node_max.flatten().sort(descending=True).values
        k = min(r * len(counts), int(torch.isfinite(edges).sum()))
        tau = max(float(edges[k]) if k < edges.numel() and torch.isfinite(edges[k]) else 0.0, 0.0)
        self._sum[layer] += tau
        self._n[layer] += 1
        # merge exactly the batch's top k edges (ties at the threshold aside)
        return bipartite_plan(metric, counts, protect=self._prefix, threshold=tau)[0]

    @property
    def thresholds(self) -> list[float]:
        return [s / n if n else math.inf for s, n in zip(self._sum, self._n)]

    @property
    def schedule(self) -> list[int]:
        return list(self._r)
