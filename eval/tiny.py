"""Tiny randomly initialised models built from configs (no download): for tests and CPU benchmarks."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 3


def _instantiate(cls, config, attn: str, seed: int, dtype: torch.dtype):
    """Build a model from config with `attn` everywhere; weights x3 so attention is not near-uniform
    (reductions then visibly change the outputs)."""
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.to(dtype)


def pad_batch(seqs: list[list[int]], side: str = "left") -> dict[str, torch.Tensor]:
    """Token sequences padded (id 0) on `side` into input_ids and attention_mask."""
    length = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        input_ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


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
    return _instantiate(LlavaForConditionalGeneration, config, attn, seed, dtype)


QWEN_IMAGE, QWEN_START, QWEN_END, QWEN_VIDEO = 151, 150, 153, 152
QWEN_SPECIAL = [QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END]  # what random tiny models must not generate


def tiny_qwen(kind: str = "qwen2_vl", seed: int = 0, llm_layers: int = 4, vision_layers: int = 2,
              attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL-shaped model (packed vision tower, 2x2 merger, M-RoPE) for
    tests; Qwen3-VL's deepstack adds the features of every vision layer but the last to LLM layers
    0..vision_layers-2."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=200, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
               vision_end_token_id=QWEN_END)
    if kind == "qwen2_vl":
        vision = dict(depth=vision_layers, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[vision_layers - 1], out_hidden_size=64)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen3_vl":
        vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=list(range(vision_layers - 1)))
        text = dict(text, head_dim=16, rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True))
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(kind)
    return _instantiate(cls, config, attn, seed, dtype)


def qwen_inputs(samples: list[list[tuple[int, int]]], text: int = 4, seed: int = 0, side: str = "left"):
    """Inputs for tiny Qwen models: per sample a list of image grids (h, w) in patches (even numbers).

    Each image is wrapped in vision start / end tokens and preceded by two text tokens; `text`
    instruction tokens follow. Returns input_ids, attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw (images in order), left-padded.
    """
    g = torch.Generator().manual_seed(seed)
    seqs, pixels, grids = [], [], []
    for imgs in samples:
        ids = [1]
        for h, w in imgs:
            ids += torch.randint(10, 140, (2,), generator=g).tolist()
            ids += [QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END]
            pixels.append(torch.randn(h * w, 3 * 2 * 14 * 14, generator=g))
            grids.append([1, h, w])
        ids += torch.randint(10, 140, (text,), generator=g).tolist()
        seqs.append(ids)
    out = pad_batch(seqs, side)
    out["mm_token_type_ids"] = (out["input_ids"] == QWEN_IMAGE).int()
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(grids)
    return out


def qwen_media_inputs(samples: list[list[tuple[int, ...]]], kind: str = "qwen2_vl", text: int = 4, seed: int = 0,
                      side: str = "left") -> dict[str, torch.Tensor]:
    """`qwen_inputs` with videos: per sample a list of images (h, w) and videos (t, h, w) (t frames of
    temporal patches, h and w in patches, even). A video is one run of placeholders between vision
    start / end tokens, except on Qwen3-VL, whose template puts a timestamp token before each frame
    and delimits every frame. Returns the image and the video inputs (mm_token_type_ids 1 / 2)."""
    g = torch.Generator().manual_seed(seed)
    seqs, pixels, grids, vpixels, vgrids = [], [], [], [], []
    for items in samples:
        ids = [1]
        for item in items:
            ids += torch.randint(10, 140, (2,), generator=g).tolist()
            t, h, w = item if len(item) == 3 else (0, *item)
            if not t:
                ids += [QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END]
                pixels.append(torch.randn(h * w, 3 * 2 * 14 * 14, generator=g))
                grids.append([1, h, w])
                continue
            frame = [QWEN_VIDEO] * (h * w // 4)
            if kind == "qwen3_vl":
                for f in range(t):
                    ids += [60 + f, QWEN_START, *frame, QWEN_END]
            else:
                ids += [QWEN_START] + frame * t + [QWEN_END]
            vpixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g))
            vgrids.append([t, h, w])
        ids += torch.randint(10, 140, (text,), generator=g).tolist()
        seqs.append(ids)
    out = pad_batch(seqs, side)
    out["mm_token_type_ids"] = (out["input_ids"] == QWEN_IMAGE).int() + 2 * (out["input_ids"] == QWEN_VIDEO).int()
    if pixels:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pixels), torch.tensor(grids)
    if vpixels:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(vpixels), torch.tensor(vgrids)
    return out


def qwen_continued(inp: dict[str, torch.Tensor], seq: torch.Tensor) -> dict[str, torch.Tensor]:
    """`qwen_inputs` extended to the token sequence `seq` (prompt + generated tokens, unpadded at
    the end): the inputs of a full recompute without a cache."""
    extra = seq.shape[1] - inp["input_ids"].shape[1]
    out = dict(inp, input_ids=seq)
    out["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones(seq.shape[0], extra, dtype=torch.long)], 1)
    out["mm_token_type_ids"] = (seq == QWEN_IMAGE).int() + 2 * (seq == QWEN_VIDEO).int()
    return out


def tiny_llava_next(seed: int = 0, attn: str = "sdpa", llm_layers: int = 4, dtype: torch.dtype = torch.float32):
    """A LLaVA-NeXT-shaped model (AnyRes 56-px crops of 4x4 patches, image_newline) for tests."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                             image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _instantiate(LlavaNextForConditionalGeneration, config, attn, seed, dtype)


def next_inputs(model, samples: list[list[tuple[int, int]]], text: int = 4, seed: int = 0):
    """Left-padded inputs for tiny_llava_next: per sample a list of image sizes (h, w) in pixels."""
    from vtoken.adapters.hf.compat import anyres_helpers

    image_size_to_num_patches = anyres_helpers().num_patches

    g = torch.Generator().manual_seed(seed)
    sizes = [s for imgs in samples for s in imgs]
    tile = model.config.vision_config.image_size
    crops = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, tile) for s in sizes]
    pixels = torch.zeros(len(sizes), max(crops, default=1), 3, tile, tile)
    for i, n in enumerate(crops):
        pixels[i, :n] = torch.randn(n, 3, tile, tile, generator=g)
    lengths = []
    if sizes:
        with torch.no_grad():
            packed = model.model.get_image_features(pixels, torch.tensor(sizes)).pooler_output
        lengths = [p.shape[0] for p in packed]
    seqs, k = [], 0
    for imgs in samples:
        ids = [1]
        for _ in imgs:
            ids += torch.randint(10, 120, (2,), generator=g).tolist() + [IMAGE_TOKEN] * lengths[k]
            k += 1
        ids += torch.randint(10, 120, (text,), generator=g).tolist()
        seqs.append(ids)
    out = pad_batch(seqs)
    if sizes:
        out["pixel_values"] = pixels
        out["image_sizes"] = torch.tensor(sizes)
    return out


OV_IMAGE, OV_VIDEO = 3, 4  # LLaVA-OneVision's image and video placeholder ids in the tiny vocabulary


def tiny_llava_onevision(seed: int = 0, attn: str = "sdpa", llm_layers: int = 4,
                         vision_aspect_ratio: str = "anyres_max_9", dtype: torch.dtype = torch.float32):
    """A LLaVA-OneVision-shaped model for tests: SigLIP tower (no CLS, "full" features) on 56-px tiles of
    4x4 patches, AnyRes crops up to 3x2 tiles, image_newline, videos pooled 2x2 per frame, Qwen2 LLM.
    A small `vision_aspect_ratio` ("anyres_max_1") makes transformers shrink the crop grids bilinearly."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=56, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=OV_IMAGE,
                                  video_token_id=OV_VIDEO, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio,
                                  image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 112]])
    return _instantiate(LlavaOnevisionForConditionalGeneration, config, attn, seed, dtype)


def onevision_inputs(model, samples: list[list[tuple[int, int] | int]], text: int = 4, seed: int = 0,
                     side: str = "left") -> dict[str, torch.Tensor]:
    """Inputs for tiny_llava_onevision: per sample a list of items, an image size (h, w) in pixels or a
    video's frame count (an int; every video of a batch has the same count, as one tensor holds them).
    An image gets its crops only when it is its sample's only image (`batch_num_images`, as the
    processor sets it). Each item follows two text tokens; `text` instruction tokens end the prompt."""
    from vtoken.adapters.hf.compat import anyres_helpers

    num_patches = anyres_helpers("llava_onevision").num_patches
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tile = cfg.vision_config.image_size
    per_sample = [[it for it in items if not isinstance(it, int)] for items in samples]
    sizes = [s for imgs in per_sample for s in imgs]
    counts = [len(imgs) for imgs in per_sample]
    tiles = [num_patches(s, cfg.image_grid_pinpoints, tile) for s in sizes]
    frames = {it for items in samples for it in items if isinstance(it, int)}
    if len(frames) > 1:
        raise ValueError(f"one frame count per batch (pixel_values_videos is one tensor), got {sorted(frames)}")
    out_px: dict[str, torch.Tensor] = {}
    lengths = []
    if sizes:
        out_px["pixel_values"] = torch.randn(len(sizes), max(tiles), 3, tile, tile, generator=g)
        out_px["image_sizes"] = torch.tensor(sizes)
        out_px["batch_num_images"] = torch.tensor(counts)
        with torch.no_grad():
            packed = model.model.get_image_features(**out_px).pooler_output
        lengths = [p.shape[0] for p in packed]
    n_video = sum(isinstance(it, int) for items in samples for it in items)
    video_len = 0
    if n_video:
        f = frames.pop()
        out_px["pixel_values_videos"] = torch.randn(n_video, f, 3, tile, tile, generator=g)
        side_ = -(-(tile // cfg.vision_config.patch_size) // 2)
        video_len = f * side_ * side_ + 1
    seqs, k = [], 0
    for items in samples:
        ids = [1]
        for it in items:
            ids += torch.randint(10, 120, (2,), generator=g).tolist()
            if isinstance(it, int):
                ids += [OV_VIDEO] * video_len
            else:
                ids += [OV_IMAGE] * lengths[k]
                k += 1
        ids += torch.randint(10, 120, (text,), generator=g).tolist()
        seqs.append(ids)
    return {**pad_batch(seqs, side), **out_px}
