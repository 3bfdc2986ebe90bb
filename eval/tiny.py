"""Tiny randomly initialised models built from configs (no download): for tests and CPU benchmarks."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 3


def tiny_llava(
    seed: int = 0,
    image_size: int = 84,
    patch_size: int = 14,
    vision_layers: int = 3,
    llm_layers: int = 4,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model (CLIP tower with CLS, feature layer -2, GELU MLP projector, Llama with
    GQA) small enough for unit tests: (image_size / patch_size)^2 tokens per image (36 by default)."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives near-uniform attention; sharpen it so that reductions change outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.to(dtype)
