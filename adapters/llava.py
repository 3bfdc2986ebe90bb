"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 and relatives with a CLIP-like tower, an MLP
projector and a decoder-only LLM), transformers 5.x.

Anatomy: `model.model.vision_tower` (CLIPVisionModel: no `.vision_model` in 5.x), the projector
`model.model.multi_modal_projector`, the LLM `model.model.language_model` with `.layers`. Each image
becomes (image_size / patch)^2 placeholder tokens (`config.image_token_id`) with the "default"
feature strategy (CLS dropped), in raster order.

Boundary stage: a forward pre-hook on the language model, i.e. after the projected features have been
scattered into `inputs_embeds` (transformers' image-token count check therefore sees the unreduced
features and passes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtoken.adapter import register_adapter
from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter
from vtoken.flops import TransformerSpec, linear_flops, patch_embed_flops, stack_flops


@register_adapter
class LlavaAdapter(HFVisionLanguageAdapter):
    family = "llava"
    supports = "LlavaForConditionalGeneration (LLaVA-1.5)"
    default_reducer = ("fastv", {"keep": 0.5})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaForConditionalGeneration" and hasattr(model, "model")

    # --- anatomy ------------------------------------------------------------------------------------
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def text_config(self) -> Any:
        return self.model.config.text_config

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        if self.model.config.vision_feature_select_strategy == "full":
            return (1, side * side + 1)  # CLS kept: no 2-D grid
        return (side, side)

    def static_image_tokens(self) -> int:
        h, w = self.grid()
        return h * w

    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        image_id = self.model.config.image_token_id
        ids = inputs.get("input_ids")
        if ids is not None:
            return ids == image_id
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            return None
        table = self.model.get_input_embeddings()
        token = table(torch.tensor(image_id, device=embeds.device))
        return (embeds == token).all(-1)

    def image_grids(self, inputs: dict[str, Any], n_tokens: list[int]) -> list[tuple[int, int]]:
        g = self.grid()
        n = g[0] * g[1]
        return [g] * (sum(n_tokens) // n)

    def has_new_images(self, inputs: dict[str, Any]) -> bool:
        mm = inputs.get("mm_encoder_outputs") or {}
        return inputs.get("pixel_values") is not None or mm.get("image") is not None

    # --- vision tower: statistics --------------------------------------------------------------------
    def install_vision(self) -> None:
        self.handles.append(self.vision_tower().register_forward_pre_hook(self._vision_pre, with_kwargs=True))

    def _vision_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if pixels is not None:
            self.vision_record = (pixels.shape[0], pixels.shape[-2] * pixels.shape[-1])

    def vision_spec(self) -> TransformerSpec:
        vc = self.model.config.vision_config
        return TransformerSpec(
            d=vc.hidden_size, heads=vc.num_attention_heads, kv_heads=vc.num_attention_heads,
            head_dim=vc.hidden_size // vc.num_attention_heads, mlp=vc.intermediate_size, mlp_mats=2,
            layers=vc.num_hidden_layers,
        )

    def vision_flops(self) -> tuple[int, int]:
        assert self.vision_record is not None
        n_images, pixels = self.vision_record
        vc = self.model.config.vision_config
        patches = pixels // (vc.patch_size * vc.patch_size)
        spec = self.vision_spec()
        tower = patch_embed_flops(patches, vc.num_channels, vc.patch_size, vc.hidden_size)
        tower += stack_flops(spec, [patches + 1] * spec.layers)
        layers = self.model.config.vision_feature_layer
        n_feat = 1 if isinstance(layers, int) else len(layers)
        d = self.text_config().hidden_size
        rows = patches if self.model.config.vision_feature_select_strategy == "default" else patches + 1
        proj = linear_flops(rows, [(vc.hidden_size * n_feat, d), (d, d)])
        return n_images * tower, n_images * proj
