"""Adapter for `LlavaOnevisionForConditionalGeneration` (LLaVA-OneVision: SigLIP tower, AnyRes crops,
Qwen2 LLM), images and videos, transformers 5.x.

Images are laid out as in LLaVA-NeXT (`llava_next.py`): the base tile's grid (share 1/P of an int
budget), then the stitched crop grid (share 1 - 1/P, naming its base span) whose row-end
`image_newline` tokens are pinned. OneVision differs in two ways: an image gets crops only when it is
its sample's only image (`batch_num_images`; the others are one tile plus ONE trailing newline, left
as text), and the crop grid is shrunk bilinearly when sqrt(rows * cols / (max * side^2)) > 1.1
(`vision_aspect_ratio` "anyres_max_<max>"). A video (one row of `pixel_values_videos`, F frames) is
F grids of ceil(side/2)^2 tokens (2x2 bilinear pooling) and ONE trailing newline (text); each frame
is a span (`ImageSpan.part`), so an int budget is the video's, split over its frames.

Refused: reducers that read the vision tower (HiPrune, VisionZip) or merge inside it (ToMe, PiToMe,
DyMU). The LLM's tokens are bilinear resamples of the tower's patches for shrunk crop grids and for
video frames, so no tower token stands for one LLM token, and SigLIP has no CLS for VisionZip.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from vtoken.adapter import register_adapter
from vtoken.adapters.llava_next import LlavaNextAdapter
from vtoken.errors import LayoutError, UnsupportedModelError
from vtoken.ledger import ImageSpan

TOWER_SIGNALS = ("vision_", "encoder_groups")


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    supports = "LlavaOnevisionForConditionalGeneration (LLaVA-OneVision, images and videos)"
    anyres_family = "llava_onevision"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaOnevisionForConditionalGeneration" and hasattr(model, "model")

    def install_hooks(self) -> None:
        tower = sorted({r.name or r.stage for r in self.runtime.reducers if not r.internal and (
            r.stage == "encoder" or any(s.kind.startswith(TOWER_SIGNALS) for s in r.signals()))})
        if tower:
            raise UnsupportedModelError(
                f"{', '.join(tower)}: reducers that read the vision tower's attention or merge tokens inside it "
                "are not supported on LLaVA-OneVision: its LLM tokens are bilinear resamples of the tower's "
                "patches for shrunk crop grids and for video frames (2x2 pooling), so no tower token stands for "
                "one LLM token, and SigLIP has no CLS token for VisionZip. Use a reducer that reads the projected "
                "tokens or the LLM: random, pool, fastv, divprune, todre, transprune, aim")
        super().install_hooks()

    # --- layout of one image or video -------------------------------------------------------------------
    def image_keys(self, args: dict[str, Any]) -> list[Any] | None:
        """(size, gets crops, anyres max) per image: crops only for a sample's only image."""
        sizes = super().image_keys(args)
        if sizes is None:
            return None
        counts = args.get("batch_num_images")
        crops = ([True] * len(sizes) if counts is None
                 else [n == 1 for n in torch.as_tensor(counts).tolist() for _ in range(n)])
        ratio = args.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        most = int(ratio.strip("anyres_max_"))  # noqa: B005 (parsed exactly as transformers does)
        return [(s, c, most) for s, c in zip(sizes, crops)]

    def _layout(self, key: tuple[tuple[int, int], bool, int]) -> dict[str, Any]:
        """Tiles, placeholder count and crop grid (rows, cols) of one image (as `pack_image_features`)."""
        size, crops, most = key
        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        tiles = self._anyres.num_patches(size, cfg.image_grid_pinpoints, tile) if crops else 1
        if tiles == 1:
            return {"crops": 1, "tokens": side * side + 1, "grid": None}
        nh, nw = self._anyres.grid_shape(size, cfg.image_grid_pinpoints, tile)
        rows, cols = self._anyres.unpad(torch.empty(0, nh * side, nw * side), list(size)).shape[1:]
        ratio = math.sqrt(rows * cols / (most * side**2))
        if ratio > 1.1:  # the bilinear shrink of large crop grids
            rows, cols = int(rows // ratio), int(cols // ratio)
        return {"crops": tiles, "tokens": side * side + rows * (cols + 1), "grid": (rows, cols)}

    def frame_side(self) -> int:
        """Rows (= columns) of a video frame's pooled grid (`apply_pooling`: ceil(side / 2))."""
        return math.ceil(self.grid()[0] / 2)

    def _frames(self, inputs: dict[str, Any]) -> int | None:
        """Frames per video: from pixel_values_videos (B, F, C, H, W), or (generate() encodes videos first
        and passes only their outputs) from the encoded videos (B, F * g * g + 1, d)."""
        pixels = inputs.get("pixel_values_videos")
        if pixels is not None:
            return pixels.shape[1]
        done = self.names.pre_computed_vision(inputs, "video")
        if done is None:
            return None
        return (done.pooler_output.shape[1] - 1) // self.frame_side() ** 2

    # --- the call's images and videos -------------------------------------------------------------------
    def _video_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        return self.token_mask(inputs, self.model.config.video_token_id)

    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Image and video placeholders (a video's frames are reduced like images)."""
        mask, video = super().image_token_mask(inputs), self._video_mask(inputs)
        return mask if mask is None or video is None else mask | video

    def has_new_images(self, inputs: dict[str, Any]) -> bool:
        return (super().has_new_images(inputs) or inputs.get("pixel_values_videos") is not None
                or self.names.pre_computed_vision(inputs, "video") is not None)

    def split_runs(self, inputs: dict[str, Any], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Images (split as LLaVA-NeXT's) and videos (F * g * g + 1 tokens each), in order; `call.span_info`
        holds None for an image and the frame count for a video."""
        video = self._video_mask(inputs).cpu()
        pieces: list[tuple[tuple[int, int, int], bool]] = []
        for sample, start, length in runs:  # an image's run may touch a video's: split where the kind changes
            kind = video[sample, start:start + length]
            cuts = [0, *(torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1).tolist(), length]
            pieces += [((sample, start + a, b - a), bool(kind[a])) for a, b in itertools.pairwise(cuts)]
        items = [(it, None) for it in super().split_runs(inputs, [p for p, v in pieces if not v])]
        video_runs = [p for p, v in pieces if v]
        if video_runs:
            frames = self._frames(inputs)
            if frames is None:
                raise LayoutError("video tokens in the prompt but no frame count: pass pixel_values_videos to "
                                  "the patched model")
            n = frames * self.frame_side() ** 2 + 1
            for sample, start, length in video_runs:
                if length % n:
                    raise LayoutError(f"a run of {length} video tokens (sample {sample}) is not a whole number of "
                                      f"{n}-token videos ({frames} frames)")
                items += [((sample, start + i * n, n), frames) for i in range(length // n)]
        items.sort(key=lambda x: x[0][:2])
        self.call.span_info = [f for _, f in items]
        return [it for it, _ in items]

    def still_images(self) -> list[tuple[int, int, int]]:
        return [it for it, f in zip(self.call.images, self.call.span_info) if f is None]

    def image_spans(self) -> list[ImageSpan]:
        keys = (self.vision_capture or {}).get("keys")
        spans: list[ImageSpan] = []
        self._sources = []  # no tower sources: vision signals are refused
        rows = iter(self._vision_rows.tolist())
        g = self.frame_side()
        for item, frames in zip(self.call.images, self.call.span_info):
            if frames is None:
                self.add_image(spans, item, self._layout(keys[next(rows)]), 0)
                continue
            sample, start, _ = item  # the frames' grids, then one trailing newline (text)
            spans += [ImageSpan(sample, start + f * g * g, (g, g), part=(f, frames)) for f in range(frames)]
        return spans

    # --- vision tower: images and videos run it separately -----------------------------------------------
    def prefill_starts(self, inputs: dict[str, Any]) -> None:
        if inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None:
            self.vision_record = None  # this call encodes its own media: a tower run before it is not its own

    def _vision_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """A call encodes its images and its videos in two tower runs (generate(): both before the
        prefill): the record counts every tile and frame, and the video run keeps the images' layout."""
        record, cap = self.vision_record, self.vision_capture or {}
        super()._vision_pre(module, args, kwargs)
        if record is not None and self.vision_record is not record:
            self.vision_record = (record[0] + self.vision_record[0], self.vision_record[1])
        for key in ("keys", "packed", "lengths"):
            if key in cap:
                self.vision_capture.setdefault(key, cap[key])
