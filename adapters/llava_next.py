"""Adapter for `LlavaNextForConditionalGeneration` (LLaVA-NeXT / 1.6, AnyRes), transformers 5.x.

Each image is a base view plus crops, all run through the CLIP tower as separate 336-px images.
transformers packs its placeholder tokens as: the base view's grid, then the crops stitched into one
grid, unpadded to the image's aspect ratio, with an `image_newline` token closing every row.

The ledger sees two sub-images per image (`ImageSpan`s): the base grid, and the stitched crop grid.
Newline tokens are **pinned**: they always reach the LLM (they tell it where rows end) and are never
offered to reducers; an image without crops has a single trailing newline, left as text. An int
budget is split as the papers do per crop: the base view gets 1/P of it and the crop grid (P-1)/P,
P = 1 + number of crops (HiPrune's N'/P per crop). Vision signals of the crop grid are gathered from
each crop's own tower run. The crop span names its base span (`ImageSpan.base`), so ToDRE takes its
one pivot from the base view and starts the crops' selection from it. Encoder-stage merging runs
per crop inside the tower.

The image sizes needed to lay the crops out are only passed to `get_image_features` (a method, not a
module, so no hook sees them): the adapter wraps that method *on this model instance* to record them
and the packed features, and restores it on `remove()`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vtoken.adapter import register_adapter
from vtoken.adapters.hf import compat
from vtoken.adapters.hf.static import StaticBatch
from vtoken.adapters.hf.vision_match import fingerprint, match_images
from vtoken.adapters.hf_vlm import wrap_method
from vtoken.adapters.llava import LlavaAdapter
from vtoken.errors import LayoutError, SignalError, UnsupportedModelError
from vtoken.ledger import ImageSpan
from vtoken.reducers.base import SignalRequest


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    supports = "LlavaNextForConditionalGeneration (LLaVA-NeXT, AnyRes)"
    anyres_family = "llava_next"  # whose modeling file defines the anyres layout functions

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaNextForConditionalGeneration" and hasattr(model, "model")

    def static_image_tokens(self) -> int | None:
        return None  # the crops make the count depend on the image size

    def static_batch(self, inputs: dict[str, Any], batch: int, forced: bool) -> StaticBatch | None:
        return None  # an image's token count follows from its size (a host value), not from shapes

    def install_hooks(self) -> None:
        for r in self.runtime.encoder:
            if r.vtu is not None:
                raise UnsupportedModelError("vtu (virtual token unmerging) is not supported for LLaVA-NeXT")
        self._anyres = compat.anyres_helpers(self.anyres_family)
        super().install_hooks()
        # Why a wrapper: what lays out the crops (the image sizes; OneVision's batch_num_images and
        # vision_aspect_ratio) only reaches `get_image_features`, a method of the model (no module sees
        # it; generate() drops it before the prefill); it runs the tower, whose hooks capture the rest.
        wrap_method(self, compat.attribute(self.model, "model", self.family), "get_image_features",
                    self._record_images)

    # --- layout of one image --------------------------------------------------------------------------
    def image_keys(self, args: dict[str, Any]) -> list[Any] | None:
        """Per image, what lays out its tokens (here: its size), from the arguments of
        `get_image_features` or of the top-level forward; None if they do not say."""
        sizes = args.get("image_sizes")
        if sizes is None:
            return None
        return [tuple(int(v) for v in s) for s in torch.as_tensor(sizes).tolist()]

    def _layout(self, size: tuple[int, int]) -> dict[str, Any]:
        """Crops, placeholder count and the crop grid's (crop, patch) source of every position."""
        get_anyres_image_grid_shape = self._anyres.grid_shape
        image_size_to_num_patches = self._anyres.num_patches
        unpad_image = self._anyres.unpad
        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, tile)
        if crops == 1:
            return {"crops": 1, "tokens": side * side + 1, "grid": None}
        nh, nw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, tile)
        crop = torch.arange(nh * nw).view(nh, nw, 1, 1).expand(nh, nw, side, side)
        patch = torch.arange(side * side).view(1, 1, side, side).expand(nh, nw, side, side)
        src = torch.stack([crop, patch], -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # as transformers
        src = unpad_image(src, list(size))
        rows, cols = src.shape[1:]
        return {"crops": crops, "tokens": side * side + rows * (cols + 1), "grid": (rows, cols),
                "crop": src[0].reshape(-1), "patch": src[1].reshape(-1)}

    def _record_images(self, args: dict[str, Any], out: Any) -> None:
        keys = self.image_keys(args)
        if self.vision_capture is None or keys is None:
            return
        packed = out.pooler_output
        self.vision_capture["keys"] = keys
        self.vision_capture["packed"] = [fingerprint(t[None]) for t in packed]
        self.vision_capture["lengths"] = [t.shape[0] for t in packed]

    def split_runs(self, inputs: dict[str, Any], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        keys = self.image_keys(inputs) or (self.vision_capture or {}).get("keys")
        if keys is None:
            return runs  # one image per run; checked against the capture in prepare_vision
        lengths = [self._layout(k)["tokens"] for k in keys]
        out, k = [], 0
        for sample, start, length in runs:
            pos = start
            while pos < start + length and k < len(lengths):
                out.append((sample, pos, lengths[k]))
                pos += lengths[k]
                k += 1
            if pos != start + length:
                return runs  # beam search repeated the images: match by value in prepare_vision
        return out

    # --- matching this prefill's images to the tower run, and their sub-image spans --------------------
    def still_images(self) -> list[tuple[int, int, int]]:
        """The images of this call among `call.images` (LLaVA-NeXT: all of them)."""
        return self.call.images

    def prepare_vision(self, embeds: torch.Tensor) -> None:
        images = self.still_images()
        if not images:
            self._vision_rows = torch.zeros(0, dtype=torch.long)
            return
        cap = self.vision_capture
        if not cap or "packed" not in cap:
            raise SignalError("the images of this call were encoded before the model was patched; pass "
                              "pixel_values (and image_sizes) to the patched model")
        rows = match_images(embeds, images, list(zip(cap["lengths"], cap["packed"])),
                            "the images of this call do not match the last vision-tower run")
        self._vision_rows = torch.tensor(rows)

    def image_spans(self) -> list[ImageSpan]:
        cap = self.vision_capture
        spans: list[ImageSpan] = []
        self._sources: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tower row, patch) per grid position
        offsets = [0]
        for key in cap["keys"]:
            offsets.append(offsets[-1] + self._layout(key)["crops"])
        for image, row in zip(self.call.images, self._vision_rows.tolist()):
            self.add_image(spans, image, self._layout(cap["keys"][row]), offsets[row])
        return spans

    def add_image(self, spans: list[ImageSpan], image: tuple[int, int, int], lay: dict[str, Any], first: int) -> None:
        """Append one image's spans: its base view, then (with crops) the crop grid with its row-end
        newlines pinned; a lone trailing newline stays text. `first`: the tower row of its base view."""
        sample, start, n = image
        if lay["tokens"] != n:
            raise LayoutError(f"image at sample {sample} has {n} tokens, its layout {lay['tokens']}")
        side = self.grid()[0]
        share = 1.0 / lay["crops"]
        base = len(spans)
        spans.append(ImageSpan(sample, start, (side, side), share=share))
        self._sources.append((torch.full((side * side,), first), torch.arange(side * side)))
        if lay["grid"] is None:
            return
        rows_, cols = lay["grid"]
        inner = tuple(-1 if q % (cols + 1) == cols else (q // (cols + 1)) * cols + q % (cols + 1)
                      for q in range(rows_ * (cols + 1)))
        spans.append(ImageSpan(sample, start + side * side, (rows_, cols), length=rows_ * (cols + 1),
                               inner=inner, share=1.0 - share, base=base))
        if "crop" in lay:  # the tower source of every crop-grid position (vision signals)
            self._sources.append((first + 1 + lay["crop"], lay["patch"]))

    def vision_signal(self, req: SignalRequest) -> torch.Tensor:
        per_crop = self.tower_signal(req)  # (tower images, side*side, ...)
        chosen = []
        for crop, patch in self._sources:
            vals = per_crop[crop.to(per_crop.device), patch.to(per_crop.device)]
            if req.kind == "encoder_groups":  # merged-token ids unique within the sub-image
                key = crop.to(vals.device) * per_crop.shape[1] + vals.long()
                vals = torch.unique(key, return_inverse=True)[1]
            chosen.append(vals)
        return pad_sequence(chosen, batch_first=True)
