"""`vtoken calibrate`: per-layer DyMU thresholds for a model, from a folder of images."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vtoken
from vtoken.reducers.dymu import DyMUCalibration

# DyMU's presets (MikeWangWZHL/dymu, src/open_clip/model_configs/ViT-L-14-336-tome-{72,192,384}out.json):
# r_total = 504 / 384 / 192 merges of CLIP-L/14-336's 576 tokens, spread evenly over all 24 layers
# (r = 21 / 16 / 8 per layer). The config names count all 24 layers (576 - 504 = 72 ...); LLaVA-1.5
# reads layer -2, after 23 of them, so 93 / 208 / 392 tokens reach its LLM. Stored as r_total / tokens.
PRESETS = {"low": 504 / 576, "mid": 384 / 576, "high": 192 / 576}


@dataclass(frozen=True)
class RTotal:
    """A DyMU preset: `merges` in total over all layers of the tower, spread evenly (DyMU's r_total)."""

    merges: int
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_images(folder: str | Path, limit: int | None = None) -> list[Image.Image]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [Image.open(p).convert("RGB") for p in paths[:limit]]


def shapes_images(n: int, seed: int = 0) -> list[Image.Image]:
    """n training-split Shapes images (offline calibration data)."""
    from vtoken.eval.shapes import sample

    return [Image.fromarray(sample("train", i, seed).image) for i in range(n)]


def _pixels(images: list[Image.Image], processor: Any, size: int) -> torch.Tensor:
    if processor is not None:
        ip = getattr(processor, "image_processor", processor)
        return ip(images=images, return_tensors="pt")["pixel_values"]
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    arr = [(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 - mean) / std for im in images]
    return torch.tensor(np.stack(arr), dtype=torch.float32).permute(0, 3, 1, 2)


def _tower_call(model: torch.nn.Module):
    """A function running only the vision tower (and projector) of `model` on pixels."""
    if hasattr(model, "get_image_features"):
        return lambda px: model.get_image_features(pixel_values=px)
    if hasattr(model, "encode_image"):
        return model.encode_image
    return model


@torch.no_grad()
def calibrate(model: torch.nn.Module, images: list[Image.Image], targets: dict[str, int | RTotal],
              processor: Any = None, batch_size: int = 16, image_size: int = 336) -> dict[str, Any]:
    """Thresholds per preset name -> {"target", "r", "thresholds", "images", "mean_tokens"}.

    targets: per name, tokens that should leave the last merging layer (vtoken's even schedule), or an
    `RTotal` (DyMU's presets: r_total merges spread over all layers; "target" is then what the
    schedule leaves at the last merging layer, e.g. 93 / 208 / 392 on LLaVA-1.5)."""
    run = _tower_call(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batches = [_pixels(images[i:i + batch_size], processor, image_size) for i in range(0, len(images), batch_size)]
    out: dict[str, Any] = {}
    for name, target in targets.items():
        cal = DyMUCalibration(r_total=target.merges) if isinstance(target, RTotal) else DyMUCalibration(target=target)
        try:
            p = vtoken.patch(model, cal)
        except vtoken.BudgetError as e:
            out[name] = {"target": target if isinstance(target, int) else None, "error": str(e)}
            continue
        with p:
            live = p.reducers[0]  # the configured copy
            for px in batches:
                run(px.to(device=device, dtype=dtype))
        entry = {"target": live._tokens - sum(live.schedule), "r": live.schedule, "thresholds": live.thresholds,
                 "images": len(images)}
        if isinstance(target, RTotal):
            entry["r_total"] = target.merges
        out[name] = entry
    # how many tokens each preset's thresholds leave on the same images
    for entry in out.values():
        if "error" in entry:
            continue
        counts: list[float] = []
        with vtoken.patch(model, "dymu", thresholds=entry["thresholds"]) as p:
            for px in batches:
                run(px.to(device=device, dtype=dtype))
                counts += _tokens_left(p)
        entry["mean_tokens"] = float(np.mean(counts))
    return out


def _tokens_left(p: vtoken.Patch) -> list[float]:
    """Patch tokens per image leaving the last merging layer of the last tower run."""
    merger = getattr(p.adapter, "merger", None)
    st = merger.state if merger is not None else None
    if st is None:
        return []
    prefix = p.reducers[0]._prefix
    return [c - prefix for c in st.counts]


def save(result: dict[str, Any], path: str | Path, model_ref: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model_ref, "presets": result}, indent=2))


def targets_for(n_tokens: int, target: int | None, preset: str | None) -> dict[str, int | RTotal]:
    """`--target N`: N tokens at the last merging layer; otherwise DyMU's presets scaled to the model."""
    if target is not None:
        return {preset or "mid": target}
    names: Iterable[str] = [preset] if preset else PRESETS
    return {name: RTotal(round(n_tokens * PRESETS[name])) for name in names}
