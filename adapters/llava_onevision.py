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

Vision signals: only the tower's received attention (`vision_attention`, query "all"), for reducers
whose authors resample it as the tokens are (`Reducer.resampled_attention`: HoliTom, whose code pools
the last layer's attention map bilinearly with the frame features). Each image tile's map is read
as is, a crop grid's is gathered from its crops and shrunk bilinearly as transformers shrinks the
features, a video frame's is pooled 2x2 bilinearly as `apply_pooling` pools them.

Refused: other reducers that read the vision tower (HiPrune, VisionZip) or merge inside it (ToMe,
PiToMe, DyMU). The LLM's tokens are bilinear resamples of the tower's patches for shrunk crop grids
and for video frames, so no tower token stands for one LLM token, and SigLIP has no CLS for VisionZip.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vtoken.adapter import register_adapter
from vtoken.adapters.hf import compat
from vtoken.adapters.hf.vision_match import fingerprint, match_images
from vtoken.adapters.hf_vlm import wrap_method
from vtoken.adapters.llava_next import LlavaNextAdapter
from vtoken.errors import LayoutError, SignalError, UnsupportedModelError
from vtoken.ledger import ImageSpan
from vtoken.ops.attention import received_attention, received_attention_flops
from vtoken.reducers.base import SignalRequest

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
        def resampled(r: Any, req: SignalRequest) -> bool:
            return r.resampled_attention and req.kind == "vision_attention" and req.query == "all"

        tower = sorted({r.name or r.stage for r in self.runtime.reducers if not r.internal and (
            r.stage == "encoder" or any(s.kind.startswith(TOWER_SIGNALS) and not resampled(r, s)
                                        for s in r.signals()))})
        if tower:
            raise UnsupportedModelError(
                f"{', '.join(tower)}: reducers that read the vision tower's attention or merge tokens inside it "
                "are not supported on LLaVA-OneVision: its LLM tokens are bilinear resamples of the tower's "
                "patches for shrunk crop grids and for video frames (2x2 pooling), so no tower token stands for "
                "one LLM token, and SigLIP has no CLS token for VisionZip. Use a reducer that reads the projected "
                "tokens or the LLM: random, pool, fastv, divprune, todre, transprune, aim; or holitom, whose "
                "authors resample the tower's attention with the tokens")
        super().install_hooks()
        self._video_rows: list[int] | None = None  # per video of the call: its index in the video tower run
        if any(r.kind.startswith("vision_") for r in self.runtime.signals):
            # Why a wrapper: only `get_video_features` knows that a tower run encodes videos (frames of
            # every video, in order); its output identifies each video in the prompt (as for images)
            wrap_method(self, compat.attribute(self.model, "model", self.family), "get_video_features",
                        self._record_videos)

    def check_vision_signals(self, reqs: list[SignalRequest]) -> None:
        """SigLIP has no CLS and OneVision feeds every patch ("full"): the tower's rows are the patches."""
        if self.tower_prefix() or self.model.config.vision_feature_select_strategy != "full":
            raise SignalError("vision signals on LLaVA-OneVision need a tower without CLS and "
                              "vision_feature_select_strategy='full' (every patch reaches the projector)")

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
        """Tiles, placeholder count and crop grid (rows, cols) of one image (as `pack_image_features`), with
        the (crop, patch) source of every position of the crop grid before its shrink (`unshrunk`)."""
        size, crops, most = key
        side = self.grid()[0]
        if not crops:
            return {"crops": 1, "tokens": side * side + 1, "grid": None}
        lay = LlavaNextAdapter._layout(self, size)
        if lay["grid"] is None:
            return lay
        rows, cols = lay["unshrunk"] = lay["grid"]
        ratio = math.sqrt(rows * cols / (most * side**2))
        if ratio > 1.1:  # the bilinear shrink of large crop grids
            rows, cols = int(rows // ratio), int(cols // ratio)
        return {**lay, "tokens": side * side + rows * (cols + 1), "grid": (rows, cols)}

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
        self._sources = []  # per span: where its tower attention comes from (`vision_signal`)
        first = list(itertools.accumulate((self._layout(k)["crops"] for k in keys or ()), initial=0))
        rows = iter(self._vision_rows.tolist())
        videos = iter(self._video_rows or [])
        g = self.frame_side()
        for item, frames in zip(self.call.images, self.call.span_info):
            if frames is None:
                row = next(rows)
                lay = self._layout(keys[row])
                self.add_image(spans, item, lay, first[row])
                if lay["grid"] is not None:  # the crop grid's sources, sized before the shrink
                    self._sources[-1] = (*self._sources[-1], lay["unshrunk"], lay["grid"])
                continue
            sample, start, _ = item  # the frames' grids, then one trailing newline (text)
            spans += [ImageSpan(sample, start + f * g * g, (g, g), part=(f, frames)) for f in range(frames)]
            video = next(videos, None)
            self._sources += [("frame", None if video is None else video * frames + f) for f in range(frames)]
        return spans

    # --- vision signals: the tower's attention, resampled as the tokens are -------------------------------
    def prepare_vision(self, embeds: torch.Tensor) -> None:
        super().prepare_vision(embeds)
        self._video_rows = None
        videos = [it for it, f in zip(self.call.images, self.call.span_info) if f is not None]
        if not videos or not any(r.kind.startswith("vision_") for r in self.runtime.signals):
            return
        cap = self.vision_capture or {}
        if "video_packed" not in cap:
            raise SignalError("the videos of this call were encoded before the model was patched; pass "
                              "pixel_values_videos to the patched model")
        grids = [(s, start, n - 1) for s, start, n in videos]  # a video's frames, without its trailing newline
        self._video_rows = match_images(embeds, grids, [(grids[0][2], fp) for fp in cap["video_packed"]],
                                        "the videos of this call do not match the last video tower run")

    def _record_images(self, args: dict[str, Any], out: Any) -> None:
        super()._record_images(args, out)
        if self.vision_capture is not None:
            self._keep_run("image_qk")

    def _record_videos(self, args: dict[str, Any], out: Any) -> None:
        """Keep the video run's captures and each video's fingerprint (its frames' pooled tokens)."""
        if self.vision_capture is None:
            return
        packed = out.pooler_output
        pixels = args.get("pixel_values_videos", args.get("pixel_values"))  # named pixel_values before 5.2x
        tokens = pixels.shape[1] * self.frame_side() ** 2  # the frames' tokens (5.24+ appends a newline)
        self.vision_capture["video_packed"] = [fingerprint(t[None, :tokens]) for t in packed]
        self._keep_run("video_qk")

    def _keep_run(self, key: str) -> None:
        """Move the q/k projections the last tower run captured under `key` (images and videos run apart)."""
        cap = self.vision_capture
        cap[key] = {k: cap.pop(k) for k in [k for k in cap if k.startswith(("q_proj", "k_proj"))]}

    def _attention(self, key: str, layer: int) -> torch.Tensor:
        """(tower rows, side * side) attention each patch receives (mean over heads and queries)."""
        run = (self.vision_capture or {}).get(key, {})
        q, k = run.get(f"q_proj{layer}"), run.get(f"k_proj{layer}")
        if q is None or k is None:
            raise SignalError(f"vision layer {layer} was not captured for this call's {key[:5]}s")
        attn = self.vision_tower().encoder.layers[layer].self_attn
        self.call.signal_flops += received_attention_flops(q, k, "all")
        return received_attention(q, k, attn.num_heads, attn.scale, "all")

    def vision_signal(self, req: SignalRequest) -> torch.Tensor:
        """Per span, the attention its tokens receive in tower layer `req.layer`: a tile's as is, a crop
        grid's gathered and shrunk bilinearly (`pack_image_features`), a frame's pooled 2x2 bilinearly
        (`apply_pooling`), as the authors of HoliTom pool it with the features."""
        if req.kind != "vision_attention" or req.query != "all":
            raise SignalError(f"the {self.family} adapter provides only vision_attention with query 'all', not {req}")
        layer = self.vision_layer(req.layer)
        side, g = self.grid()[0], self.frame_side()
        tiles = self._attention("image_qk", layer) if self._vision_rows.numel() else None
        frames = None
        if any(isinstance(src[0], str) for src in self._sources):
            raw = self._attention("video_qk", layer).view(-1, 1, side, side)
            frames = F.interpolate(raw, size=(g, g), mode="bilinear").flatten(1)
        chosen = []
        for src in self._sources:
            if isinstance(src[0], str):  # ("frame", row of the video tower run)
                if src[1] is None:
                    raise SignalError("this call's videos were not matched to a tower run")
                chosen.append(frames[src[1]])
                continue
            crop, patch = src[:2]
            vals = tiles[crop.to(tiles.device), patch.to(tiles.device)]
            if len(src) == 4 and src[2] != src[3]:  # the shrunk crop grid
                vals = F.interpolate(vals.view(1, 1, *src[2]), size=src[3], mode="bilinear").flatten()
            chosen.append(vals)
        return pad_sequence(chosen, batch_first=True)

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
        if record is not None:  # a call's second run (its videos after its images): keep the first's captures;
            for key in ("image_qk", "video_qk", "video_packed"):  # a new call's first run drops the last call's
                if key in cap:
                    self.vision_capture.setdefault(key, cap[key])
