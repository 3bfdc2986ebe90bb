"""Adapter for Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`), transformers 5.x.

Anatomy: `model.model.visual` is a packed vision transformer (all images' patches in one sequence,
`cu_seqlens` per image; Qwen2.5-VL permutes patches into attention windows and back after the
merger) whose `merger` turns each 2x2 unit of patches into one LLM token; `model.model.language_model`
uses M-RoPE: position ids (3, B, L) (or (4, B, L) with text positions first, as `generate` passes).
An image of grid (t, h, w) patches becomes t*h*w/4 placeholder tokens, in raster order of the
(t*h/2, w/2) merged grid, between vision start/end tokens.

Kept tokens keep their original 3-D position ids (all rows), so `rope_deltas` and the positions
`generate` computes for decoding stay valid. `renumber=True` is refused (compacting 3-D ids has no
single meaning). Encoder-stage merging inside this packed tower is not supported.

Vision signals (HiPrune's Qwen recipe): attention is recomputed as a full softmax over each image's
patches (ignoring Qwen2.5-VL's windows) from the block's q/k with its 2-D RoPE, averaged per 2x2
merge unit, and mapped to raster order. There is no CLS token: a "cls" query (VisionZip, ToDRE's
pivot) is served by the mean over all queries, documented as vtoken's substitute.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vtoken.adapter import register_adapter
from vtoken.adapters.hf import compat
from vtoken.adapters.hf.static import StaticBatch
from vtoken.adapters.hf.vision_match import fingerprint, match_images
from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter
from vtoken.errors import LayoutError, ParameterError, SignalError, UnsupportedModelError
from vtoken.flops import TransformerSpec, linear_flops, stack_flops
from vtoken.ops.attention import received_attention, received_attention_flops
from vtoken.reducers.base import ModelInfo, SignalRequest

MAX_RUNS = 8  # tower runs kept while no prefill has used them (the image and video runs of a prompt)
FAMILIES = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}


@register_adapter
class QwenVLAdapter(HFVisionLanguageAdapter):
    family = "qwen2_vl"
    supports = "Qwen2VLForConditionalGeneration (Qwen2-VL), Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL)"
    stages = frozenset({"boundary", "decoder"})
    default_reducer = ("fastv", {"keep": 0.5})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.family = FAMILIES.get(type(model).__name__, self.family)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in FAMILIES and hasattr(model, "model")

    # --- anatomy ------------------------------------------------------------------------------------
    paths: ClassVar[dict[str, str]] = {"language_model": "model.language_model", "visual": "model.visual"}

    def visual(self) -> nn.Module:
        return self.part("visual")

    @property
    def unit(self) -> int:
        return self.visual().spatial_merge_size

    def model_info(self) -> ModelInfo:
        return ModelInfo(family=self.family, llm_layers=len(self.language_model().layers),
                         vision_layers=len(self.visual().blocks), feature_layer=len(self.visual().blocks) - 1,
                         has_cls=False, vision_tokens=None, prefix_tokens=0, tower="qwen-vit",
                         llm=self.llm_kind())

    def _grids_from(self, thw: torch.Tensor) -> list[tuple[int, int]]:
        """The LLM token grid of every frame of every (t, h, w) entry, in order (an image: one frame).
        Each frame is its own item: the tower attends within a frame, and a video's frames are reduced
        as images with the video's budget split over them."""
        m = self.unit
        return [(int(h) // m, int(w) // m) for t, h, w in thw.tolist() for _ in range(int(t))]

    def _frames_from(self, thw: torch.Tensor) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(grid, (frame, frames)) of every frame of the videos of `thw`, in order."""
        m = self.unit
        return [((int(h) // m, int(w) // m), (f, int(t))) for t, h, w in thw.tolist() for f in range(int(t))]

    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Image and video placeholder tokens (a video's frames are reduced like images)."""
        mask = super().image_token_mask(inputs)
        video = self._video_mask(inputs)
        return mask if video is None or mask is None else mask | video

    def _video_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        video_id = getattr(self.model.config, "video_token_id", None)
        return None if video_id is None else self.token_mask(inputs, video_id)

    def _video_frames(self, inputs: dict[str, Any]) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
        """Every video frame of this call in order: from video_grid_thw, or (generate() encodes the
        videos first and passes only their outputs) from the tower run that produced them."""
        thw = inputs.get("video_grid_thw")
        if thw is not None:
            return self._frames_from(thw)
        done = (inputs.get("mm_encoder_outputs") or {}).get("video")
        if done is None:
            return None
        out = done.pooler_output
        first = out[0] if isinstance(out, (list, tuple)) else out
        ptr = first.untyped_storage().data_ptr()
        cap = next((c for c in reversed(self.vision_runs) if c.get("out_ptr") == ptr), None)
        return None if cap is None else self._frames_from(cap["thw"])

    def split_runs(self, inputs: dict[str, Any], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Every image and every video frame as its own span. Without image_grid_thw each run of image
        tokens is one image (the chat template delimits each with vision start / end tokens)."""
        thw = inputs.get("image_grid_thw")
        sizes = None if thw is None else [h * w for h, w in self._grids_from(thw)]
        grids = None if thw is None else self._grids_from(thw)
        video = self._video_mask(inputs)
        is_video = [False] * len(runs) if video is None else video.cpu()[[s for s, _, _ in runs],
                                                                         [p for _, p, _ in runs]].tolist()
        frames = self._video_frames(inputs) if any(is_video) else None
        if any(is_video) and frames is None:
            raise LayoutError("video tokens in the prompt but their frame grids are unknown: pass video_grid_thw "
                              "(or pixel_values_videos with it) to the patched model")
        out, info, k, f = [], [], 0, 0
        for (sample, start, length), vid in zip(runs, is_video):
            pos = start
            if not vid and sizes is None:
                out.append((sample, start, length))
                info.append((None, None))
                continue
            while pos < start + length:
                items = frames if vid else sizes
                idx = f if vid else k
                if idx >= len(items):
                    raise LayoutError(f"more {'video' if vid else 'image'} tokens than "
                                      f"{'video frames in video_grid_thw' if vid else 'images in image_grid_thw'}")
                grid, part = frames[f] if vid else (grids[k], None)
                n = grid[0] * grid[1]
                out.append((sample, pos, n))
                info.append((grid, part))
                pos += n
                f, k = (f + 1, k) if vid else (f, k + 1)
            if pos != start + length:
                raise LayoutError(f"a run of {length} {'video' if vid else 'image'} tokens does not match "
                                  f"{'video_grid_thw' if vid else 'image_grid_thw'}")
        self.call.span_info = info
        return out

    def span_part(self, k: int) -> tuple[int, int] | None:
        info = self.call.span_info
        return info[k][1] if k < len(info) else None

    def static_batch(self, inputs: dict[str, Any], batch: int, forced: bool) -> StaticBatch | None:
        """Only when asked (`static_layout = True`, or a declared `static_grid`: Qwen's images vary in
        size, which shapes cannot tell): images of equal size (their token count from pixel_values'
        shape) and no video. The grid's rows and columns are in `image_grid_thw`, whose values only a
        host read gives (transformers reads them; vtoken does not): reducers that need them (pool,
        HiPrune, VisionZip) and vision-tower signals need the grid declared (`Patch.static_grid`)."""
        grid = self.runtime.static_grid
        if (not forced and grid is None) or not self.static_ok() or inputs.get("pixel_values_videos") is not None:
            return None
        thw, pixels = inputs.get("image_grid_thw"), inputs.get("pixel_values")
        if thw is None or pixels is None:
            return None
        count, unit = thw.shape[0], self.unit**2
        if count == 0 or count % batch or pixels.shape[0] % (count * unit):
            return None
        tokens = pixels.shape[0] // (count * unit)
        if grid is None:
            needs = [r.name for r in self.runtime.reducers if r.grid_shape and not r.internal]
            if any(r.kind.startswith("vision_") for r in self.runtime.signals):
                needs.append("vision-tower signals")
            if needs:
                raise ParameterError(
                    f"static_layout = True: {', '.join(sorted(set(needs)))} need each image's rows and columns, "
                    f"which {self.family} keeps in image_grid_thw's values (a host read). Declare them with "
                    f"vtoken.patched(model).static_grid = (rows, cols) (LLM tokens: image_grid_thw's h and w "
                    f"divided by {self.unit}), or set static_layout = False")
        elif grid[0] * grid[1] != tokens:
            raise ParameterError(
                f"static_grid = {grid} gives {grid[0] * grid[1]} LLM tokens per image, but this batch's images "
                f"have {tokens} each (pixel_values' shape); declare their grid, or set static_grid = None")
        return StaticBatch(count, count // batch, tokens)

    def declare_static_grid(self, grid: tuple[int, int] | None) -> None:
        """Plan a declared grid's tower order once, outside any trace: Qwen2.5-VL's window permutation
        (transformers computes it from image_grid_thw's values on the host) is the same for every
        image of that grid."""
        self._static_plan = None
        if grid is None:
            return
        m = self.unit
        thw = torch.tensor([[1, grid[0] * m, grid[1] * m]])
        cap = {"grids": [grid], "thw": thw}
        self._static_plan = {"order": self._unit_order(cap)[0], "windows": self._window_lengths(cap)}

    def static_grids(self) -> list[tuple[int, int]]:
        grid = self.runtime.static_grid or (1, self.call.static.tokens)  # undeclared: token counts only
        return [grid] * self.call.static.count

    def static_asserts(self, inputs: dict[str, Any]) -> None:
        thw = inputs["image_grid_thw"]
        grid = self.runtime.static_grid
        if grid is not None:
            want = torch.tensor([1, grid[0] * self.unit, grid[1] * self.unit], device=thw.device, dtype=thw.dtype)
            torch._assert_async((thw == want).all(), f"vtoken static (graph-safe) prefill: every image must have "
                                f"the declared static_grid {grid} (image_grid_thw [1, {grid[0] * self.unit}, "
                                f"{grid[1] * self.unit}]); declare this "
                                "batch's grid or run it eagerly (static_layout = False, static_grid = None)")
            return
        torch._assert_async((thw == thw[:1]).all(), "vtoken static (graph-safe) prefill: the images of a batch "
                            "must have equal image_grid_thw; run this batch eagerly (static_layout = False)")

    def image_grids(self, inputs: dict[str, Any], images: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        info = self.call.span_info
        if info and len(info) == len(images) and all(g is not None for g, _ in info):
            return [g for g, _ in info]
        # generate() encodes images first and drops image_grid_thw: use the matched tower runs
        rows = self._vision_rows
        if rows is None:
            raise LayoutError("image grids unknown: pass image_grid_thw, or pixel_values to the patched model")
        return [self.vision_runs[r]["grids"][i] for r, i in rows]

    # --- vision tower: capture, matching, signals ---------------------------------------------------
    def install_hooks(self) -> None:
        for r in self.runtime.reducers:
            if r.renumber:
                raise UnsupportedModelError(
                    f"{r.name}: renumber=True is not supported with M-RoPE (3-D position ids); keep the originals"
                )
        super().install_hooks()

    def vision_depth(self) -> int:
        return len(self.visual().blocks)

    def install_vision(self) -> None:
        visual = self.visual()
        blocks = compat.attribute(visual, "blocks", self.family)
        self._vision_rope = compat.qwen_vision_rope(compat.attribute(blocks[0], "attn", self.family))
        self._window_index = compat.vision_window_index() if self.family == "qwen2_5_vl" else None
        # Every tower run since the last prefill that used them: generate() encodes a prompt's images
        # and its videos in separate runs before the prefill (and not again in later uncached steps).
        self._static_plan: dict[str, Any] | None = None  # the declared static_grid's tower order
        if self.runtime.static_grid is not None:
            self.declare_static_grid(self.runtime.static_grid)
        self.vision_runs: list[dict[str, Any]] = []
        self._runs_used = False
        self.vision_capture: dict[str, Any] | None = None  # the run in progress (its hooks write here)
        self._vision_rows: list[tuple[int, int]] | None = None  # (run, image) of each prompt image
        self.handles.append(visual.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        self.handles.append(visual.register_forward_hook(self._vision_post))
        reqs = [r for r in self.runtime.signals if r.kind.startswith("vision_")]
        wanted = {self.vision_layer(r.layer) for r in reqs if r.kind != "vision_features"}
        # (rope, qkv) of each captured block, moved into the run's capture when the tower returns.
        # Every block gets the same two hooks (one code, one closure layout): a captured block's hooks
        # write to its own slot, the others' to one shared scratch slot. torch.compile guards on a
        # module's hooks (vtoken turns those guards on) and on the constants a hook reads, so hooks on
        # some blocks only, or hooks that differ by a per-layer constant, would make dynamo retrace the
        # tower's attention for each differing block and meet transformers' own graph break there
        # (`lengths.tolist()`, the non-flash vision attention) once more per retrace.
        self._block_slots: dict[int, list[Any]] = {layer: [None, None] for layer in sorted(wanted)}
        self._block_scratch: list[Any] = [None, None]
        if wanted:
            for i, blk in enumerate(blocks):
                slot = self._block_slots.get(i, self._block_scratch)
                self.handles.append(blk.register_forward_pre_hook(_store_rope(slot), with_kwargs=True))
                self.handles.append(blk.attn.qkv.register_forward_hook(_store_qkv(slot)))
        if any(r.kind == "vision_features" for r in reqs):
            self.handles.append(visual.merger.register_forward_pre_hook(self._capture_merger_input))

    def prefill_starts(self, inputs: dict[str, Any]) -> None:
        if inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None:
            self.vision_runs, self._runs_used = [], False  # this call encodes its own images

    def _vision_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        thw = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        pixels = args[0] if args else kwargs.get("hidden_states")
        if thw is None or pixels is None:
            return
        if self._runs_used:  # a new prompt's encoding starts
            self.vision_runs, self._runs_used = [], False
        # a static prefill reads no grid here: it has the declared one, or needs none (its FLOPs then
        # read the grids when counted)
        static = self.call.static is not None
        if static:
            grid = self.runtime.static_grid
            grids = None if grid is None else [grid] * thw.shape[0]
        else:
            grids = self._grids_from(thw)
        self.vision_capture = {"grids": grids, "thw": thw, "patches": pixels.shape[0], "static": static}
        self.vision_runs = [*self.vision_runs[-(MAX_RUNS - 1):], self.vision_capture]
        self.vision_record = (thw.shape[0], pixels.shape[0])

    def _vision_post(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        cap = self.vision_capture
        for layer, slot in self._block_slots.items():
            if cap is not None:
                cap[f"rope{layer}"], cap[f"qkv{layer}"] = slot
            slot[0] = slot[1] = None
        self._block_scratch[0] = self._block_scratch[1] = None
        if cap is None or cap["grids"] is None or cap["static"]:
            return  # a static prefill takes its images in order: no per-image features to match
        sizes = [h * w for h, w in cap["grids"]]
        cap["tokens"] = list(torch.split(output.pooler_output, sizes))
        cap["out_ptr"] = output.pooler_output.untyped_storage().data_ptr()  # to tell a video run later

    def _capture_merger_input(self, module: nn.Module, args: tuple) -> None:
        # Only kept here; its norm is applied when the signal is read. The tower's frame that calls the
        # merger falls back to eager around transformers' graph breaks, so dynamo compiles this hook as
        # a frame of its own: a tensor op here would be one more graph (one more break) than unpatched.
        if self.vision_capture is not None:
            self.vision_capture["merger_input"] = args[0]

    def prepare_vision(self, embeds: torch.Tensor) -> None:
        """Match this prefill's images to the images of the last tower run by their features."""
        needs = any(r.kind.startswith("vision_") for r in self.runtime.signals)
        info = self.call.span_info
        if not needs and info and all(g is not None for g, _ in info):
            self._runs_used = True
            return
        last = self.vision_runs[-1] if self.vision_runs else None
        if self.call.static is not None:  # static prefill: the images are the last tower run's, in order
            if last is None or not last["static"] or last["thw"].shape[0] != len(self.call.images):
                raise SignalError(
                    "a static (graph-safe) prefill reads vision signals from the tower run of the same call, in "
                    "order; pass pixel_values with image_grid_thw to the call, or set static_layout = False")
            self._vision_rows = [(len(self.vision_runs) - 1, i) for i in range(len(self.call.images))]
            self._runs_used = True
            return
        runs = [cap for cap in self.vision_runs if "tokens" in cap]
        if not runs:
            raise SignalError("the vision tower did not run on these images while patched; pass pixel_values "
                              "(with image_grid_thw) to the patched model")
        where = [(r, i) for r, cap in enumerate(self.vision_runs) for i in range(len(cap.get("tokens", [])))]
        recorded = [(t.shape[0], fingerprint(t[None])) for cap in self.vision_runs for t in cap.get("tokens", [])]
        found = match_images(embeds, self.call.images, recorded, "the images of this call do not match the "
                             "vision-tower runs since the last prompt; pass pixel_values", latest=True)
        self._vision_rows = [where[k] for k in found]  # the latest run holding each image
        self._runs_used = True

    def _unit_order(self, cap: dict[str, Any]) -> list[torch.Tensor]:
        """Per image of a tower run, the raster index of each merge unit in the tower's sequence order."""
        if cap.get("static") and self._static_plan is not None:
            return [self._static_plan["order"]] * len(cap["grids"])
        sizes = [h * w for h, w in cap["grids"]]
        if self._window_index is None:  # no attention windows: the tower keeps raster order
            return [torch.arange(n) for n in sizes]
        visual = self.visual()
        window_index, _ = self._window_index(cap["thw"], spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        out, off = [], 0
        for n in sizes:
            out.append(window_index[off:off + n].cpu() - off)
            off += n
        return out

    def _window_lengths(self, cap: dict[str, Any]) -> list[list[int]] | None:
        """Qwen2.5-VL: per image of a tower run, the lengths (patches) of its attention windows; else None."""
        if self.family != "qwen2_5_vl" or "thw" not in cap:
            return None
        if cap.get("static") and self._static_plan is not None:
            return self._static_plan["windows"] * len(cap["grids"])
        visual = self.visual()
        _, cu = self._window_index(cap["thw"], spatial_merge_size=visual.spatial_merge_size,
                                        window_size=visual.window_size, patch_size=visual.patch_size)
        unit = self.unit**2
        return _window_sizes(torch.as_tensor(cu), [h * w * unit for h, w in cap["grids"]])

    def vision_signal(self, req: SignalRequest) -> torch.Tensor:
        rows = self._vision_rows
        if rows is None:
            raise SignalError(f"{req} was not captured in this forward")
        per_run = {r: self._run_signal(self.vision_runs[r], req) for r in sorted({r for r, _ in rows})}
        chosen = [per_run[r][i] for r, i in rows]
        n_max = max(x.shape[0] for x in chosen)
        out = chosen[0].new_zeros(len(chosen), n_max, *chosen[0].shape[1:])
        for i, x in enumerate(chosen):
            out[i, : x.shape[0]] = x
        return out

    def _run_signal(self, cap: dict[str, Any], req: SignalRequest) -> list[torch.Tensor]:
        """The signal of every image of one tower run, in raster order."""
        sizes = [h * w for h, w in cap["grids"]]
        order = self._unit_order(cap)
        per_image: list[torch.Tensor] = []
        unit = self.unit**2
        if req.kind == "vision_features":
            x = self._merger_norm(self.visual().merger)(cap["merger_input"])
            feats = torch.split(x.reshape(-1, x.shape[-1] * unit), sizes)
            per_image = [_to_raster(f, o) for f, o in zip(feats, order)]
        else:
            layer = self.vision_layer(req.layer)
            qkv, rope = cap.get(f"qkv{layer}"), cap.get(f"rope{layer}")
            if qkv is None:
                raise SignalError(f"vision block {layer} was not captured (asked: {req})")
            attn = self.visual().blocks[layer].attn
            heads = attn.num_heads
            q, k, _ = qkv.reshape(qkv.shape[0], 3, heads, -1).unbind(1)
            apply = self._vision_rope
            q, k = apply(q, k, *rope)
            off = 0
            for n, o in zip(sizes, order):
                qi, ki = q[off * unit:(off + n) * unit], k[off * unit:(off + n) * unit]
                if req.kind == "vision_attention":  # no CLS: "cls" falls back to the mean over all queries
                    qf, kf = qi.reshape(1, n * unit, -1), ki.reshape(1, n * unit, -1)
                    self.call.signal_flops += received_attention_flops(qf, kf)  # the reducer's side path
                    score = received_attention(qf, kf, heads, attn.scaling, "all")[0]
                    per_image.append(_to_raster(score.view(n, unit).mean(1), o))
                elif req.kind == "vision_keys":
                    per_image.append(_to_raster(ki.mean(1).view(n, unit, -1).mean(1), o))
                else:
                    raise SignalError(f"the {self.family} adapter does not provide signal {req.kind!r}")
                off += n
        return per_image

    def projector(self):
        return self.visual().merger.mlp

    @staticmethod
    def _merger_norm(merger: nn.Module) -> nn.Module:
        """The merger's per-patch norm, applied before each 2x2 unit is concatenated."""
        return merger.ln_q

    @staticmethod
    def _merger_out(merger: nn.Module) -> int:
        return merger.mlp[-1].out_features

    # --- FLOPs ----------------------------------------------------------------------------------------
    def vision_flops(self) -> tuple[int, int]:
        runs = [cap for cap in self.vision_runs if not cap.get("counted")]
        tower = proj = 0
        for cap in runs:
            t, p = self._run_flops(cap)
            cap["counted"] = True
            tower, proj = tower + t, proj + p
        return tower, proj

    def _run_flops(self, cap: dict[str, Any]) -> tuple[int, int]:
        visual = self.visual()
        if cap.get("grids") is None and "thw" in cap:  # a static prefill's run: read when counted
            cap["grids"] = self._grids_from(cap["thw"])
        grids = cap.get("grids") or []
        cfg = self.model.config.vision_config
        blk = visual.blocks[0]
        d = blk.norm1.weight.shape[0]
        mlp = blk.mlp
        gated = hasattr(mlp, "gate_proj")
        width = next(getattr(mlp, n) for n in ("gate_proj", "fc1", "linear_fc1") if hasattr(mlp, n)).out_features
        spec = TransformerSpec(d=d, heads=blk.attn.num_heads, kv_heads=blk.attn.num_heads,
                               head_dim=d // blk.attn.num_heads, mlp=width, mlp_mats=3 if gated else 2,
                               layers=len(visual.blocks))
        unit = self.unit**2
        patch_in = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        windows = self._window_lengths(cap)
        full = set(getattr(visual, "fullatt_block_indexes", range(spec.layers)))
        a = spec.attn_width
        tower = proj = 0
        for i, (h, w) in enumerate(grids):
            n = h * w * unit
            tower += 2 * n * patch_in * d + stack_flops(spec, [n] * spec.layers)
            if windows is not None:  # Qwen2.5-VL: windowed blocks attend within windows only
                windowed = spec.layers - len(full & set(range(spec.layers)))
                tower -= windowed * (4 * n * n * a - sum(4 * x * x * a for x in windows[i]))
            hid = visual.merger.hidden_size
            proj += linear_flops(h * w, [(hid, hid), (hid, self._merger_out(visual.merger))])
        return tower, proj


def _store_rope(slot: list[Any]):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        slot[0] = kwargs.get("position_embeddings")

    return hook


def _store_qkv(slot: list[Any]):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        slot[1] = output

    return hook


def _window_sizes(cu: torch.Tensor, sizes: list[int]) -> list[list[int]]:
    """Split the global window boundaries into per-image lists of window lengths (in patches)."""
    lengths = [x for x in (cu[1:] - cu[:-1]).tolist() if x > 0]
    out, k = [], 0
    for n in sizes:
        acc, mine = 0, []
        while acc < n and k < len(lengths):
            mine.append(lengths[k])
            acc += lengths[k]
            k += 1
        out.append(mine)
    return out


def _to_raster(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows in the tower's unit order -> raster order."""
    out = torch.empty_like(x)
    out[order.to(x.device)] = x
    return out
