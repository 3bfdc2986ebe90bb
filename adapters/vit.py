"""Adapters for bare vision transformers: timm `VisionTransformer` and open_clip visual towers.

Only the encoder stage applies (ToMe / PiToMe / DyMU merging inside the blocks); the output keeps
its shape (classification logits, pooled embeddings). Statistics: tokens entering each block and
the tower's FLOPs.

Ragged batches (DyMU leaves each image its own count; shorter rows are padded at the end): the
blocks mask the padding in attention; pooling over tokens is kept independent of the batch too —
average / max pooling sees every padded row replaced by the mean of the image's pooled rows (which
changes neither the mean nor the max), attention pooling (timm MAP) gets the padding masked out.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vtoken.adapter import Adapter, register_adapter
from vtoken.adapters.encoder import BlockSpec, ViTMerger
from vtoken.errors import UnsupportedModelError
from vtoken.flops import TransformerSpec, patch_embed_flops, stack_flops
from vtoken.reducers.base import ModelInfo


class BareViTAdapter(Adapter):
    """Shared machinery: a ViTMerger over the blocks, a hook where tokens are first formed."""

    stages = frozenset({"encoder"})
    default_reducer: ClassVar[tuple[str, dict[str, Any]]] = ("tome", {"r": 8})

    def blocks(self) -> list[BlockSpec]:
        raise NotImplementedError

    def patches(self) -> int:
        raise NotImplementedError

    def prefix(self) -> int:
        raise NotImplementedError

    def start_module(self) -> nn.Module:
        """Module whose forward output is the patch tokens (the start of every forward)."""
        raise NotImplementedError

    def tokens_of(self, out: torch.Tensor) -> int:
        """Patch tokens of this run, from the start module's output."""
        raise NotImplementedError

    def install_pooling(self) -> None:
        """Hooks that keep the tower's pooling independent of ragged-batch padding."""

    def spec(self) -> TransformerSpec:
        raise NotImplementedError

    def embed_flops(self, images: int) -> int:
        raise NotImplementedError

    def model_info(self) -> ModelInfo:
        return ModelInfo(family=self.family, llm_layers=0, vision_layers=len(self.blocks()),
                         vision_tokens=self.patches(), prefix_tokens=self.prefix(), has_cls=self.prefix() > 0)

    def install_hooks(self) -> None:
        rt = self.runtime
        if len(rt.encoder) != 1 or len(rt.reducers) != 1:
            raise UnsupportedModelError(
                f"a bare {self.family} vision transformer takes exactly one encoder-stage merger "
                f"(tome, pitome, dymu); got {', '.join(r.name for r in rt.reducers)}"
            )
        if rt.encoder[0].vtu is not None:
            raise UnsupportedModelError("vtu (virtual token unmerging) applies inside an LLM; this model has none")
        self.merger = ViTMerger(rt.encoder[0], self.blocks())
        self.merger.install(self.handles)
        self._patches = self.patches()
        self.handles.append(self.start_module().register_forward_hook(self._start))
        self.handles.append(self.tower().register_forward_hook(self._end))
        self.install_pooling()

    def tower(self) -> nn.Module:
        """The module whose forward runs the whole tower."""
        return self.model

    def _start(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        self.runtime.new_stats()
        self._patches = self.tokens_of(out)
        self.merger.begin(out.shape[0], self._patches + self.prefix(), out.device)

    def _ragged_rows(self, x: torch.Tensor, skip: int) -> torch.Tensor | None:
        """(B, N) real rows of `x`, the last N = T - skip tower slots, if this run's batch is ragged."""
        st = self.merger.state
        if st is None or len(set(st.counts)) < 2 or x.dim() != 3 or x.shape[1] + skip != st.size.shape[1]:
            return None
        return st.valid[:, skip:]

    def _neutral_pad(self, x: torch.Tensor, start: int) -> torch.Tensor | None:
        """x (B, T, d) with its padding rows set to the mean of the image's rows from `start` on: the mean
        and the max over those rows stay what the image alone gives."""
        real = self._ragged_rows(x, 0)
        if real is None:
            return None
        pooled = real.clone()
        pooled[:, :start] = False
        w = pooled.to(x.dtype)[..., None]
        mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        return torch.where(real[..., None], x, mean.expand_as(x))

    def _mask_attn_pool(self, skip: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs.get("x")
            real = self._ragged_rows(x, skip) if x is not None else None
            if real is None:
                return None
            bias = torch.zeros(real.shape, dtype=x.dtype, device=x.device).masked_fill(~real, torch.finfo(x.dtype).min)
            mask = bias[:, None, None, :]
            old = kwargs.get("attn_mask")
            return args, dict(kwargs, attn_mask=mask if old is None else old + mask)

        return hook

    def _end(self, module: nn.Module, inputs: tuple, out: Any) -> None:
        st = self.merger.state
        if st is None or not st.entering:
            return
        stats = self.runtime.stats
        per_image = list(zip(*st.entering))
        stats.images = len(per_image)
        stats.vision_tokens = [sum(t) / len(t) for t in st.entering]
        stats.add_flops("vision", sum(stack_flops(self.spec(), list(t)) for t in per_image)
                        + self.embed_flops(len(per_image)))

    def _pad_hook(self, start: int):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> Any:
            return self._neutral_pad(out, start) if isinstance(out, torch.Tensor) else None

        return hook


def _vit_spec(d: int, heads: int, mlp: int, layers: int) -> TransformerSpec:
    return TransformerSpec(d=d, heads=heads, kv_heads=heads, head_dim=d // heads, mlp=mlp, mlp_mats=2, layers=layers)


@register_adapter
class TimmViTAdapter(BareViTAdapter):
    """timm `VisionTransformer` (ViT, DeiT, CLIP-in-timm ...): blocks `x + attn(norm1(x))`,
    `x + mlp(norm2(x))`; keys read from each block's `attn.k_norm` output (identity unless qk-norm);
    prefix tokens (`num_prefix_tokens`: class, distillation, registers) are protected."""

    family = "timm"
    supports = "timm VisionTransformer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and hasattr(model, "blocks") and hasattr(model, "patch_embed")

    def blocks(self) -> list[BlockSpec]:
        out = []
        for blk in self.model.blocks:
            if not all(hasattr(blk, n) for n in ("norm2", "mlp", "attn")) or not hasattr(blk.attn, "k_norm"):
                raise UnsupportedModelError(f"timm block {type(blk).__name__} is not a pre-norm ViT block")
            out.append(BlockSpec(blk, blk.norm2, blk.mlp, (blk.attn.k_norm, "heads"), blk.attn.num_heads, "timm"))
        return out

    def patches(self) -> int:
        return self.model.patch_embed.num_patches

    def prefix(self) -> int:
        return self.model.num_prefix_tokens

    def start_module(self) -> nn.Module:
        return self.model.patch_embed

    def tokens_of(self, out: torch.Tensor) -> int:
        # (B, N, C), or (B, H, W, C) with dynamic_img_size=True (any image size the patch grid allows)
        return out.shape[1] * out.shape[2] if out.dim() == 4 else out.shape[1]

    def install_pooling(self) -> None:
        m = self.model
        start = 0 if getattr(m, "pool_include_prefix", False) else m.num_prefix_tokens
        if getattr(m, "attn_pool", None) is not None:  # MAP: mask the padding in its attention
            self.handles.append(m.attn_pool.register_forward_pre_hook(self._mask_attn_pool(start), with_kwargs=True))
        elif getattr(m, "global_pool", "token") not in ("token", ""):  # avg / max / avgmax over the tokens
            self.handles.append(m.norm.register_forward_hook(self._pad_hook(start)))

    def spec(self) -> TransformerSpec:
        blk = self.model.blocks[0]
        d = self.model.embed_dim
        return _vit_spec(d, blk.attn.num_heads, blk.mlp.fc1.out_features, len(self.model.blocks))

    def embed_flops(self, images: int) -> int:
        pe = self.model.patch_embed
        ps = pe.patch_size[0] if isinstance(pe.patch_size, tuple) else pe.patch_size
        return images * patch_embed_flops(self._patches, pe.proj.in_channels, ps, self.model.embed_dim)


@register_adapter
class OpenClipAdapter(BareViTAdapter):
    """open_clip `VisionTransformer` (the `.visual` of a CLIP model; a whole CLIP model is accepted
    and its visual tower patched): `ResidualAttentionBlock`s with `nn.MultiheadAttention`; keys
    from the packed in-projection of each block's input; proportional attention through the MHA's
    float `key_padding_mask` (added to the logits)."""

    family = "open_clip"
    supports = "open_clip VisionTransformer (model.visual) or an open_clip CLIP model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = model.visual if hasattr(model, "visual") and hasattr(model.visual, "transformer") else model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        vis = getattr(model, "visual", model)
        return type(vis).__module__.startswith("open_clip") and hasattr(vis, "transformer") \
            and hasattr(vis, "conv1")

    def blocks(self) -> list[BlockSpec]:
        tr = self.visual.transformer
        if not getattr(tr, "batch_first", True):
            raise UnsupportedModelError("vtoken merges in batch_first open_clip towers (open_clip >= 2.24)")
        out = []
        for blk in tr.resblocks:
            if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
                raise UnsupportedModelError(f"open_clip block {type(blk).__name__} has no nn.MultiheadAttention")
            out.append(BlockSpec(blk, blk.ln_2, blk.mlp, (blk.attn, "mha"), blk.attn.num_heads, "mha"))
        return out

    def patches(self) -> int:
        gh, gw = self.visual.grid_size
        return gh * gw

    def prefix(self) -> int:
        return 1

    def start_module(self) -> nn.Module:
        return self.visual.conv1

    def tokens_of(self, out: torch.Tensor) -> int:
        return out.shape[-2] * out.shape[-1]  # (B, C, gh, gw)

    def tower(self) -> nn.Module:
        return self.visual

    def install_pooling(self) -> None:
        vis = self.visual
        if getattr(vis, "attn_pool", None) is not None:
            if self.merger.reducer.adaptive:
                raise UnsupportedModelError(
                    f"{self.merger.reducer.name} gives each image its own token count, and this open_clip tower "
                    "pools with attention over all tokens (the padding would leak in); use tome or pitome"
                )
        elif getattr(vis, "pool_type", "tok") == "avg":  # mean of the patch tokens (after / before ln_post)
            after = vis.transformer if getattr(vis, "final_ln_after_pool", False) else vis.ln_post
            self.handles.append(after.register_forward_hook(self._pad_hook(1)))

    def spec(self) -> TransformerSpec:
        blk = self.visual.transformer.resblocks[0]
        d = self.visual.transformer.width
        return _vit_spec(d, blk.attn.num_heads, blk.mlp.c_fc.out_features, len(self.visual.transformer.resblocks))

    def embed_flops(self, images: int) -> int:
        conv = self.visual.conv1
        return images * patch_embed_flops(self._patches, conv.in_channels, conv.kernel_size[0], conv.out_channels)
