"""Adapters for bare vision transformers: timm `VisionTransformer` and open_clip visual towers.

Only the encoder stage applies (ToMe / PiToMe / DyMU merging inside the blocks); the output keeps
its shape (classification logits, pooled embeddings). Statistics: tokens entering each block and
the tower's FLOPs.
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

    def spec(self) -> TransformerSpec:
        raise NotImplementedError

    def embed_flops(self, images: int) -> int:
        raise NotImplementedError

    def model_info(self) -> ModelInfo:
        return ModelInfo(family=self.family, llm_layers=0, vision_layers=len(self.blocks()),
                         vision_tokens=self.patches(), prefix_tokens=self.prefix(), has_cls=self.prefix() > 0)

    def install(self) -> None:
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
        self.handles.append(self.start_module().register_forward_hook(self._start))
        self.handles.append(self.tower().register_forward_hook(self._end))

    def tower(self) -> nn.Module:
        """The module whose forward runs the whole tower."""
        return self.model

    def _start(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        self.runtime.new_stats()
        self.merger.begin(out.shape[0], self.patches() + self.prefix(), out.device)

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

    def spec(self) -> TransformerSpec:
        blk = self.model.blocks[0]
        d = self.model.embed_dim
        return _vit_spec(d, blk.attn.num_heads, blk.mlp.fc1.out_features, len(self.model.blocks))

    def embed_flops(self, images: int) -> int:
        pe = self.model.patch_embed
        ps = pe.patch_size[0] if isinstance(pe.patch_size, tuple) else pe.patch_size
        return images * patch_embed_flops(self.patches(), pe.proj.in_channels, ps, self.model.embed_dim)


@register_adapter
class OpenClipAdapter(BareViTAdapter):
    """open_clip `VisionTransformer` (the `.visual` of a CLIP model; a whole CLIP model is accepted
    and its visual tower patched): `ResidualAttentionBlock`s with `nn.MultiheadAttention`; keys
    from the packed in-projection of each block's input; proportional attention through the MHA's
    float `key_padding_mask` (added to the logits)."""

    family = "open_clip"
    supports = "open_clip VisionTransformer (model.visual) or an open_clip CLIP model"

    def __init__(self, model: nn.Module, runtime: Any = None) -> None:
        super().__init__(model, runtime)
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

    def tower(self) -> nn.Module:
        return self.visual

    def spec(self) -> TransformerSpec:
        blk = self.visual.transformer.resblocks[0]
        d = self.visual.transformer.width
        return _vit_spec(d, blk.attn.num_heads, blk.mlp.c_fc.out_features, len(self.visual.transformer.resblocks))

    def embed_flops(self, images: int) -> int:
        conv = self.visual.conv1
        return images * patch_embed_flops(self.patches(), conv.in_channels, conv.kernel_size[0], conv.out_channels)
