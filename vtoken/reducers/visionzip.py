"""`visionzip`: dominant tokens by CLS attention plus merged contextual tokens (boundary stage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtoken.budget import resolve_keep
from vtoken.errors import BudgetError, ParameterError, UnsupportedModelError
from vtoken.ops.select import topk_mask
from vtoken.reducers._grid import from_grid, mix_from_grid, require_full_grid, to_grid
from vtoken.reducers.base import ModelInfo, Reducer, Selection, SignalRequest, Stage, StageInput, check_range
from vtoken.registry import register


@register("visionzip")
@dataclass
class VisionZip(Reducer):
    """VisionZip (Yang et al., CVPR 2025), following the official LLaVA code, all at the vision
    feature layer (`vision_layer=-1`, CLIP layer -2 for LLaVA-1.5):

    - dominant: the D patches with the most attention from the CLS query (summed over heads);
    - contextual: the remaining R patches (raster order) get C targets at stride max(1, R // C);
      every other remaining patch is assigned to the target with the most similar key (cosine of
      head-mean keys); contextual token = target + mean(assigned), built on the pre-projector
      features and passed through the model's projector.
    Split: D = round(keep * 54 / 64) (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30), C = keep - D.

    Towers without CLS (Qwen2-VL): dominant tokens by the mean attention received from all queries.

    Deviations, both forced by Hugging Face LLaVA keeping exactly one placeholder per patch: the
    official D counts the CLS token (D - 1 patches + CLS); here there is no slot for CLS, so all D
    dominant tokens are patches. Contextual tokens sit at their target's position (its position id
    and raster slot) instead of being appended after the dominant ones.
    """

    counts_tested: ClassVar[bool] = True
    stage: ClassVar[Stage] = "boundary"
    full_grid: ClassVar[bool] = True
    keep: int | float | None = 64
    dominant: int | None = None
    vision_layer: int = -1
    _query: str = field(default="cls", init=False, repr=False)  # "all" on towers without CLS (configure)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "dominant", lo=0)
        if self.dominant is not None and isinstance(self.keep, int) and self.dominant > self.keep:
            raise BudgetError(self._too_many(self.keep))

    def _too_many(self, k: int) -> str:
        return (f"visionzip: dominant={self.dominant} exceeds the budget of {k} tokens per image; "
                f"pass dominant <= {k} (the rest, keep - dominant, are contextual tokens) or a larger keep")

    def configure(self, info: ModelInfo) -> None:
        # Towers without a CLS token (Qwen2-VL): dominant tokens by the attention they receive from
        # all queries instead (vtoken's substitute; the paper has no such model).
        self._query = "cls" if info.has_cls else "all"
        if self.dominant is not None and isinstance(self.keep, float) and info.vision_tokens:
            k = resolve_keep(self.keep, info.vision_tokens)
            if self.dominant > k:
                raise BudgetError(self._too_many(k))

    def signals(self) -> tuple[SignalRequest, ...]:
        return (
            SignalRequest("vision_attention", self.vision_layer, self._query),
            SignalRequest("vision_keys", self.vision_layer),
            SignalRequest("vision_features", -1),
        )

    def split(self, k: int) -> tuple[int, int]:
        d = round(k * 54 / 64) if self.dominant is None else self.dominant
        if not 0 <= d <= k:  # a fractional keep on an image smaller than the model's usual size
            raise ParameterError(self._too_many(k))
        return d, k - d

    def select(self, x: StageInput) -> Selection:
        require_full_grid(x, self.name)
        att_req, key_req, feat_req = self.signals()
        # everything in raster order of each image's grid (pinned tokens, if any, left out)
        cls_att, keys, feats = (to_grid(x, x.signal(r)) for r in (att_req, key_req, feat_req))
        features, token_sizes = to_grid(x, x.features), to_grid(x, x.sizes)
        keep = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        values, sizes = features.clone(), token_sizes.clone()
        g = features.shape[1]
        mix = torch.zeros(features.shape[0], g, g, device=features.device) if x.want_mix else None
        groups: dict[tuple[int, int], list[int]] = {}
        for i, ((h, w), k) in enumerate(zip(x.grids, x.keep)):
            groups.setdefault((h * w, k), []).append(i)
        for (n, k), members in groups.items():  # images of one size and budget: one batched computation
            ids = torch.tensor(members, device=x.features.device)
            kp, vals, szs, mx = self._select_group(cls_att[ids, :n], keys[ids, :n], feats[ids, :n],
                                                   features[ids, :n], token_sizes[ids, :n], k, x.project)
            keep[ids, :n], values[ids, :n], sizes[ids, :n] = kp, vals, szs
            if mix is not None:
                mix[ids, :n, :n] = mx.to(mix.dtype)
        return Selection(keep=from_grid(x, keep, False), values=from_grid(x, values), sizes=from_grid(x, sizes),
                         mix=None if mix is None else mix_from_grid(x, mix))

    def _select_group(self, cls_att, keys, feats, features, sizes, k, project):
        m, n = cls_att.shape
        dom_n, ctx_n = self.split(k)
        rows = torch.arange(m, device=features.device)[:, None]
        keep = topk_mask(cls_att, torch.full((m,), dom_n, device=rows.device))
        values = features
        # the merge as weights (m, n, n): kept tokens one-hot, a contextual token its target plus the
        # mean of the tokens assigned to it (the same combination, applied to carried features)
        mix = torch.diag_embed(keep.float())
        if ctx_n == 0:
            return keep, values, sizes, mix
        rest = n - dom_n
        remaining = keep.int().argsort(dim=1, stable=True)[:, :rest]  # non-dominant patches, raster order
        step = max(1, rest // ctx_n)
        # every step-th non-dominant patch is a target (host indices: no data-dependent shape)
        chosen = set(range(0, rest, step)[:ctx_n])
        tgt = torch.tensor(sorted(chosen), dtype=torch.long, device=rows.device)
        oth = torch.tensor([i for i in range(rest) if i not in chosen], dtype=torch.long, device=rows.device)
        targets, others = remaining[:, tgt], remaining[:, oth]
        kn = F.normalize(keys.float(), dim=-1)
        assign = (kn[rows, others] @ kn[rows, targets].transpose(1, 2)).argmax(-1)  # (m, R - C)
        d = feats.shape[-1]
        summed = torch.zeros(m, targets.shape[1], d, device=feats.device, dtype=torch.float32)
        summed.scatter_add_(1, assign[..., None].expand(-1, -1, d), feats[rows, others].float())
        count = torch.zeros(m, targets.shape[1], device=feats.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32))
        ctx = (feats[rows, targets].float() + summed / count.clamp_min(1)[..., None]).to(feats.dtype)
        if project is not None:
            ctx = project(ctx)
        elif ctx.shape[-1] != features.shape[-1]:
            raise UnsupportedModelError("visionzip needs the model's projector to embed contextual tokens")
        values = features.clone()
        values[rows, targets] = ctx.to(values.dtype)
        sizes = sizes.clone()
        sizes[rows, targets] = 1 + count.to(sizes.dtype)
        keep = keep.clone()
        keep[rows, targets] = True
        mix[rows, targets, targets] = 1.0
        dest = targets.gather(1, assign)  # (m, R - C) the target each other token is merged into
        mix[rows, dest, others] = 1.0 / count.gather(1, assign)
        return keep, values, sizes, mix
