"""Shared fixtures: tiny random LLaVA models built from config (no download) and batch builders."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vtoken.eval.tiny import (
    IMAGE_TOKEN,
    QWEN_IMAGE,
    QWEN_SPECIAL,
    next_inputs,
    pad_batch,
    qwen_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]

# the KV cache argument / output field of the installed transformers ("cache" from 5.24 on)
CACHE = "cache" if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters else "past_key_values"
# transformers < 5.23 repeats pixel_values per image (not per sample) for beam search, so the beams of a
# multi-image sample see the wrong images even unpatched; 5.23+ encodes once (mm_encoder_outputs)
BEAMS_SEE_OWN_IMAGES = "mm_encoder_outputs" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
N_IMG = 36  # tokens per image of the tiny LLaVA (84 / 14 = 6, 6 x 6)


def make_prompt(n_images: int, text: int = 5, seed: int = 0) -> list[int]:
    """BOS, then per image two text tokens and its placeholder run, then `text` instruction tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = [1]
    for _ in range(n_images):
        ids += torch.randint(10, 120, (2,), generator=g).tolist() + [IMAGE_TOKEN] * N_IMG
    ids += torch.randint(10, 120, (text,), generator=g).tolist()
    return ids


def cache_of(out: Any) -> Any:
    """The KV cache of a model output, under the installed transformers' field name."""
    return getattr(out, CACHE)


def make_batch(prompts: list[list[int]], side: str = "left") -> dict[str, torch.Tensor]:
    """Pad prompts (pad id 0) on `side`."""
    return pad_batch(prompts, side)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def pixels(n: int, seed: int = 0, size: int = 84) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def llava() -> torch.nn.Module:
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def llava_eager() -> torch.nn.Module:
    return tiny_llava(seed=0, attn="eager")


def family_setup(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[int]]:
    """(tiny model, a left-padded batch of two samples with one image each, tokens to suppress in generate)."""
    if family == "llava":
        ids = [[1, 5, 6, *([IMAGE_TOKEN] * 36), 7, 8, 9], [1, *([IMAGE_TOKEN] * 36), 7, 8, 9, 10, 11, 12]]
        inp = pad_batch(ids)
        inp["pixel_values"] = pixels(2)
        return tiny_llava(seed=0), inp, [IMAGE_TOKEN]
    if family == "llava_next":
        model = tiny_llava_next(seed=0)
        return model, next_inputs(model, [[(56, 112)], [(112, 112)]], seed=1), [IMAGE_TOKEN]
    return tiny_qwen(family), qwen_inputs([[(8, 12)], [(8, 8)]], seed=1), QWEN_SPECIAL


def recompute_inputs(family: str, inp: dict[str, torch.Tensor], seq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of `family_setup` extended to the token sequence `seq` (prompt + appended tokens), for a
    full recompute without cache: the mask grows, positions follow it (M-RoPE: the model derives them)."""
    n = inp["input_ids"].shape[1]
    mask = torch.cat([inp["attention_mask"], torch.ones(seq.shape[0], seq.shape[1] - n, dtype=torch.long)], 1)
    out = dict(inp, input_ids=seq, attention_mask=mask)
    if family.startswith("qwen"):
        out["mm_token_type_ids"] = (seq == QWEN_IMAGE).int()
    else:
        out["position_ids"] = positions(mask)
    return out


def qwen_media_of(inp: dict[str, torch.Tensor], samples: list[list[tuple[int, ...]]],
                  b: int) -> dict[str, torch.Tensor]:
    """Sample b's pixels and grids (images and videos), cut out of a `qwen_media_inputs` batch of `samples`."""
    out = {}
    for pix, grid, video in (("pixel_values", "image_grid_thw", False),
                             ("pixel_values_videos", "video_grid_thw", True)):
        owners = [s for s, items in enumerate(samples) for it in items if (len(it) == 3) == video]
        if b not in owners:
            continue
        sizes = inp[grid].prod(-1).tolist()
        mine = [i for i, s in enumerate(owners) if s == b]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        out[pix] = torch.cat([inp[pix][starts[i]:starts[i] + sizes[i]] for i in mine])
        out[grid] = inp[grid][mine]
    return out
