"""The Shapes VLMs: offline processor (word-level tokenizer + CLIP image processor), configs, loading.

`vtoken run` reads a model directory saved with `save_pretrained` (model + processor), e.g. the
trained `assets/llava-shapes`; the name `tiny-llava-shapes` builds a randomly initialised model of
the same geometry (336 px, 576 visual tokens) for smoke runs where no trained model is available.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtoken.eval.shapes import SIZE, vocabulary

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
PROMPT = "USER: <image> {question} ASSISTANT:"
CHAT_TEMPLATE = (  # "USER: <image> question ASSISTANT:" (content as a string or a list of parts); system
    # messages (lmms-eval's Qwen wrappers send one) are left out: the Shapes models are trained without one
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} ASSISTANT:"
    "{% elif m['role'] != 'system' %} {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
)
QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(  # images and videos (the moving-shapes task)
    "{% if c['type'] == 'image' %}<image> ",
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> ")
ONEVISION_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(  # LLaVA-OneVision: "<image>" / "<video>" placeholders
    "{% if c['type'] == 'image' %}<image> ",
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> ")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY = "tiny-llava-shapes"
TINY_QWEN = "tiny-qwen2vl-shapes"
ARCHS = ("llava", "qwen2vl")


def build_tokenizer(extra: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the Shapes vocabulary (built offline with `tokenizers`)."""
    words = [*SPECIALS, *(extra or []), "USER:", "ASSISTANT:", *vocabulary()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("?", behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_input_names=["input_ids", "attention_mask"],
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *(extra or [])]})
    return fast


def build_processor(image_size: int = SIZE, patch_size: int = 14) -> LlavaProcessor:
    image = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image, tokenizer=build_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # transformers model types of the Qwen VL families


def _qwen_family(kind: str) -> tuple[int, str, str]:
    """(patch size, config class, processor class) of a Qwen VL family: Qwen3-VL has 16-px patches."""
    families = {"qwen2_vl": (14, "Qwen2VLConfig", "Qwen2VLProcessor"),
                "qwen2_5_vl": (14, "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor"),
                "qwen3_vl": (16, "Qwen3VLConfig", "Qwen3VLProcessor")}
    if kind not in families:
        raise ValueError(f"unknown Qwen VL family {kind!r}; one of {QWEN_KINDS}")
    return families[kind]


def build_qwen_processor(image_size: int = SIZE, kind: str = "qwen2_vl") -> Any:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor for Shapes: images resized to about `image_size`^2
    pixels in multiples of 2 patches: 336 px -> 24x24 patches of 14 px -> 144 merged tokens (Qwen3-VL:
    352 px -> 22x22 patches of 16 px -> 121 tokens)."""
    import transformers

    patch, _, processor = _qwen_family(kind)
    pixels = image_size * image_size
    geometry = dict(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, merge_size=2,
                    temporal_patch_size=2)
    if kind == "qwen3_vl":  # its video sizes bound a whole clip's pixels: up to 16 frames keep the image geometry
        clip = dict(geometry, size={"shortest_edge": 4 * (2 * patch) ** 2, "longest_edge": 16 * pixels})
        video = transformers.Qwen3VLVideoProcessor(**clip, do_sample_frames=False)
    else:
        video = transformers.Qwen2VLVideoProcessor(**geometry)
    return getattr(transformers, processor)(
        image_processor=transformers.Qwen2VLImageProcessor(**geometry), video_processor=video,
        tokenizer=build_tokenizer(QWEN_SPECIALS), chat_template=QWEN_CHAT_TEMPLATE)


def onevision_pinpoints(image_size: int = SIZE) -> list[list[int]]:
    """AnyRes grids of LLaVA-OneVision for Shapes: 1x1 to 2x2 tiles (a square Shapes image is one tile)."""
    return [[image_size * h, image_size * w] for h, w in ((1, 1), (1, 2), (2, 1), (2, 2))]


def build_onevision_processor(image_size: int = SIZE, patch_size: int = 14) -> Any:
    """LLaVA-OneVision processor for Shapes: SigLIP-normalised `image_size` tiles, AnyRes up to 2x2 tiles;
    a 336-px image -> base tile + one crop tile of 24x24 patches + 24 newlines = 1176 tokens."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    norm = dict(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=onevision_pinpoints(image_size), **norm),
        video_processor=LlavaOnevisionVideoProcessor(**norm), tokenizer=build_tokenizer(["<video>"]),
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=ONEVISION_CHAT_TEMPLATE)


def onevision_config(vocab_size: int, tok: Any, vision: tuple[int, int, int] = (6, 384, 6),
                     llm: tuple[int, int, int, int] = (4, 384, 6, 2), image_size: int = SIZE) -> Any:
    """A LLaVA-OneVision config: SigLIP (layers, width, heads) without CLS or head, last layer's features
    ("full"), AnyRes with image_newline, videos pooled 2x2; Qwen2 LLM (layers, width, heads, kv heads)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vl, vd, vh = vision
    ll, ld, lh, lkv = llm
    vc = SiglipVisionConfig(hidden_size=vd, intermediate_size=4 * vd, num_hidden_layers=vl, num_attention_heads=vh,
                            image_size=image_size, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(hidden_size=ld, intermediate_size=4 * ld, num_hidden_layers=ll, num_attention_heads=lh,
                     num_key_value_heads=lkv, vocab_size=vocab_size, max_position_embeddings=4096, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=onevision_pinpoints(image_size))


def qwen_config(vocab_size: int, tok: Any, vision: tuple[int, int, int] = (6, 384, 6),
                llm: tuple[int, int, int, int] = (4, 384, 6, 2), kind: str = "qwen2_vl") -> Any:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL config: vision (depth, width, heads) with 2x2 merger (Qwen2.5-VL:
    windowed attention but in the last block; Qwen3-VL: learned positions, deepstack features of every
    vision block but the last); Qwen2 / Qwen3 LLM (layers, width, heads, kv heads) with M-RoPE
    (interleaved on Qwen3-VL)."""
    import transformers

    patch, config, _ = _qwen_family(kind)
    vl, vd, vh = vision
    ll, ld, lh, lkv = llm
    half = ld // lh // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    text = dict(hidden_size=ld, intermediate_size=4 * ld, num_hidden_layers=ll, num_attention_heads=lh,
                num_key_value_heads=lkv, vocab_size=vocab_size, max_position_embeddings=2048,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters=rope)
    tower = dict(depth=vl, num_heads=vh, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if kind == "qwen2_vl":
        tower.update(embed_dim=vd, hidden_size=ld)
    else:
        tower.update(hidden_size=vd, intermediate_size=4 * vd, out_hidden_size=ld)
    if kind == "qwen2_5_vl":
        tower.update(window_size=112, fullatt_block_indexes=[vl - 1])  # 112-px windows, as Qwen2.5-VL's
    if kind == "qwen3_vl":
        tower.update(num_position_embeddings=(SIZE // patch) ** 2, deepstack_visual_indexes=list(range(vl - 1)))
        text.update(head_dim=ld // lh, rope_parameters=dict(rope, mrope_interleaved=True))
    return getattr(transformers, config)(
        text_config=text, vision_config=tower,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def shapes_config(vocab_size: int, image_token_id: int, vision: tuple[int, int, int] = (6, 384, 6),
                  llm: tuple[int, int, int, int] = (4, 384, 6, 2), image_size: int = SIZE) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP (layers, width, heads) 336/14 with CLS, feature layer -2, GELU
    MLP projector; Llama (layers, width, heads, kv heads)."""
    vl, vd, vh = vision
    ll, ld, lh, lkv = llm
    vc = CLIPVisionConfig(hidden_size=vd, intermediate_size=4 * vd, num_hidden_layers=vl, num_attention_heads=vh,
                          image_size=image_size, patch_size=14, projection_dim=vd)
    tc = LlamaConfig(hidden_size=ld, intermediate_size=4 * ld, num_hidden_layers=ll, num_attention_heads=lh,
                     num_key_value_heads=lkv, vocab_size=vocab_size, max_position_embeddings=1024,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def tiny_shapes_model(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Randomly initialised Shapes-geometry LLaVA (small widths): for smoke runs and tests only —
    its accuracy is chance level."""
    proc = build_processor()
    tok = proc.tokenizer
    cfg = shapes_config(len(tok), tok.convert_tokens_to_ids("<image>"), vision=(3, 64, 4), llm=(4, 64, 4, 2))
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval(), proc


def tiny_qwen_shapes_model(seed: int = 0, kind: str = "qwen2_vl") -> tuple[Any, Any]:
    """Randomly initialised Shapes-geometry Qwen2-VL / Qwen2.5-VL / Qwen3-VL (`kind`, small widths), for
    smoke runs and tests."""
    proc = build_qwen_processor(kind=kind)
    cfg = qwen_config(len(proc.tokenizer), proc.tokenizer, vision=(2, 64, 4), llm=(4, 64, 4, 2), kind=kind)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(cfg).eval(), proc


def tiny_onevision_shapes_model(seed: int = 0) -> tuple[Any, Any]:
    """Randomly initialised Shapes-geometry LLaVA-OneVision (small widths), for smoke runs and tests."""
    from transformers import LlavaOnevisionForConditionalGeneration

    proc = build_onevision_processor()
    cfg = onevision_config(len(proc.tokenizer), proc.tokenizer, vision=(2, 64, 4), llm=(4, 64, 4, 2))
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval(), proc


def tiny_models() -> dict[str, Any]:
    """The built-in random Shapes-geometry models by name (`vtoken run --model NAME`), one per family."""
    return {TINY: tiny_shapes_model, TINY_QWEN: tiny_qwen_shapes_model,
            "tiny-qwen2.5vl-shapes": lambda: tiny_qwen_shapes_model(kind="qwen2_5_vl"),
            "tiny-qwen3vl-shapes": lambda: tiny_qwen_shapes_model(kind="qwen3_vl"),
            "tiny-onevision-shapes": tiny_onevision_shapes_model}


def default_model() -> str:
    """The shipped trained model if present, else the random tiny one."""
    path = ASSETS / "llava-shapes"
    return str(path) if (path / "config.json").exists() else TINY


def grid_tokens(model: Any) -> int | None:
    """Visual tokens per image of a fixed-grid tower ((image_size // patch_size)^2), None if it has no fixed
    image size."""
    vc = getattr(model.config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    return (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) else None


def demo_keep(model: Any, keep: int = 64, of: int = 576) -> tuple[int, int]:
    """(budget, visual tokens per image): a fixed-grid LLaVA's equivalent of `keep` of `of` tokens (the
    published 576-token budgets scale by the fraction; 16 of 144), or `keep` itself where the image's
    token count varies (any-resolution and Qwen families)."""
    tokens = grid_tokens(model) if model.config.model_type == "llava" else None
    return (keep, of) if tokens is None else (max(1, round(keep * tokens / of)), tokens)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the Hub endpoint accepts a TCP connection, else why not (one short probe, no retries)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"no network connection to {host}:{port} ({e})"
    return None


def _from_hub(ref: str, attn: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model + processor for a Hub id; offline (HF_HUB_OFFLINE or no network) only from the local cache,
    with an error naming the offline cause when the files are not there."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else _hub_reachable()
    kw: dict[str, Any] = {"local_files_only": True} if why else {}
    try:
        constants.HF_HUB_OFFLINE = bool(why)  # no network: every lookup (config, adapters, ...) stays in the cache
        model = AutoModelForImageTextToText.from_pretrained(ref, attn_implementation=attn, dtype=dtype, **kw)
        proc = AutoProcessor.from_pretrained(ref, **kw)
    except OSError as e:
        if why:
            raise OSError(f"{ref!r} is a Hugging Face Hub id, but the Hub cannot be reached: {why}, and the "
                          f"model is not in the local cache ({constants.HF_HUB_CACHE}). Download it where the "
                          "Hub is reachable (or copy the cache), or pass a local model directory.") from None
        raise OSError(f"cannot load {ref!r} from the Hugging Face Hub: {e}") from None
    finally:
        constants.HF_HUB_OFFLINE = offline
    return model, proc


def load(ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
         attn: str = "sdpa") -> tuple[Any, Any, dict[str, Any]]:
    """(model, processor, info) for a model directory, a Hugging Face Hub id (`owner/name`, e.g.
    `llava-hf/llava-1.5-7b-hf`) or a built-in random model's name (`tiny_models`: `tiny-llava-shapes`, ...)."""
    if ref in tiny_models():
        model, proc = tiny_models()[ref]()
        info = {"model": ref, "trained": False}
    elif (Path(ref) / "config.json").exists():
        path = Path(ref)
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn, dtype=dtype)
        proc = AutoProcessor.from_pretrained(path)
        meta = path / "vtoken.json"
        info = {"model": str(path), "trained": True, **(json.loads(meta.read_text()) if meta.exists() else {})}
    elif HUB_ID.match(ref) and not Path(ref).exists():
        model, proc = _from_hub(ref, attn, dtype)
        info = {"model": ref, "trained": True, "source": "hub"}
    else:
        raise FileNotFoundError(
            f"no model at {ref!r} (expected a directory with config.json, a Hugging Face Hub id such as "
            f"'llava-hf/llava-1.5-7b-hf', or a built-in random model: {', '.join(tiny_models())})")
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return model.to(device=device, dtype=dtype).eval(), proc, info


def prompt_text(processor: Any, question: str, media: str = "image") -> str:
    """The model's prompt for one Shapes question (its chat template with one image, or one video)."""
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
