"""`vtoken viz IMAGE --model M --reducer tome --reducer fastv ...`: which tokens each reducer keeps,
drawn on the image, side by side.

Pruning: kept patches are shown as they are, dropped ones darkened. Merging: the patches of each
merged token share a colour (the source map); a token's representative patch keeps its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

import vtoken
from vtoken.eval.models import prompt_text

DIM = 0.25  # brightness of dropped patches


@dataclass
class Panel:
    title: str
    image: Image.Image
    kept: list[int]  # raster positions of the surviving tokens
    groups: list[int] | None  # merged token of every patch (merging only)


def model_image(pixel_values: torch.Tensor, processor: Any) -> Image.Image:
    """The image exactly as the model sees it (undo the processor's normalisation)."""
    ip = getattr(processor, "image_processor", processor)
    mean = np.array(ip.image_mean)[:, None, None]
    std = np.array(ip.image_std)[:, None, None]
    arr = pixel_values[0].float().cpu().numpy() * std + mean
    return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def draw(base: Image.Image, grid: tuple[int, int], kept: list[int], groups: list[int] | None,
         seed: int = 0) -> Image.Image:
    """Overlay on `base` (size divisible by the grid): dropped patches dimmed, merged groups coloured."""
    arr = np.asarray(base.convert("RGB")).astype(np.float32)
    rows, cols = grid
    ph, pw = arr.shape[0] // rows, arr.shape[1] // cols
    out = arr.copy()
    keep = np.zeros(rows * cols, dtype=bool)
    keep[kept] = True
    if groups is not None:
        rng = np.random.default_rng(seed)
        palette = rng.uniform(40, 255, (max(groups) + 1, 3))
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        tile = (slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
        if groups is not None and not keep[p]:
            out[tile] = 0.5 * arr[tile] + 0.5 * palette[groups[p]]
        elif not keep[p]:
            out[tile] = DIM * arr[tile]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


@torch.no_grad()
def visualize(model: Any, processor: Any, image: Image.Image, reducers: list[tuple[str, dict[str, Any]]],
              question: str = "what is in the image?") -> list[Panel]:
    inputs = processor(images=[image], text=[prompt_text(processor, question)], return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
    if inputs["pixel_values"].dim() == 4:
        base = model_image(inputs["pixel_values"], processor)
    else:  # packed patches (Qwen2-VL): the resized image, 28 px per merged token
        _t, h, w = inputs["image_grid_thw"][0].tolist()
        base = image.convert("RGB").resize((w * 14, h * 14), Image.BICUBIC)
    panels = [Panel("input", base, [], None)]
    for name, params in reducers:
        with vtoken.patch(model, name, **params) as p:
            model(**inputs)
            kept = p.kept_positions()[0].tolist()
            span = p.runtime.last_spans[0]
            cap = getattr(p.adapter, "vision_capture", None) or {}
            groups = cap["groups"][0].tolist() if "groups" in cap else None
        title = name + ("" if not params else " " + ", ".join(f"{k}={v}" for k, v in params.items()))
        panels.append(Panel(f"{title}: {len(kept)} tokens", draw(base, span.grid, kept, groups), kept, groups))
    return panels


def compose(panels: list[Panel], label_height: int = 18) -> Image.Image:
    w, h = panels[0].image.size
    sheet = Image.new("RGB", (w * len(panels), h + label_height), "white")
    pen = ImageDraw.Draw(sheet)
    for i, panel in enumerate(panels):
        sheet.paste(panel.image, (i * w, label_height))
        pen.text((i * w + 4, 3), panel.title, fill="black")
    return sheet
