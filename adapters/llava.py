"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 and relatives with a CLIP-like tower, an MLP
projector and a decoder-only LLM), transformers 5.x.

Anatomy: `model.model.vision_tower` (CLIPVisionModel: no `.vision_model` in 5.x), the projector
`model.model.multi_modal_projector`, the LLM `model.model.language_model` with `.layers`. Each image
becomes (image_size / patch)^2 placeholder tokens (`config.image_token_id`) with the "default"
feature strategy (CLS dropped), in raster order.

Boundary stage: a forward pre-hook on the language model, i.e. after the projected features have been
scattered into `inputs_embeds` (transformers' image-token count check therefore sees the unreduced
features and passes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vtoken.adapter import register_adapter
from vtoken.adapters.encoder import BlockSpec, ViTMerger
from vtoken.adapters.hf.static import StaticBatch
from vtoken.adapters.hf.vision_match import fingerprint, match_images
from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter
from vtoken.adapters.vtu import VirtualUnmerge
from vtoken.errors import LayoutError, SignalError, UnsupportedModelError
from vtoken.flops import TransformerSpec, linear_flops, patch_embed_flops, stack_flops
from vtoken.ops.attention import received_attention, received_attention_flops
from vtoken.reducers.base import ModelInfo, SignalRequest


@register_adapter
class LlavaAdapter(HFVisionLanguageAdapter):
    family = "llava"
    supports = "LlavaForConditionalGeneration (LLaVA-1.5)"
    default_reducer = ("fastv", {"keep": 0.5})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaForConditionalGeneration" and hasattr(model, "model")

    # --- anatomy ------------------------------------------------------------------------------------
    paths: ClassVar[dict[str, str]] = {"language_model": "model.language_model", "vision_tower": "model.vision_tower",
                                       "projector": "model.multi_modal_projector"}

    def vision_tower(self) -> nn.Module:
        return self.part("vision_tower")

    def grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        extra = self.extra_tokens()
        if extra:
            return (1, side * side + extra)  # CLS kept ("full"), or a patch dropped: no 2-D grid
        return (side, side)

    def tower_prefix(self) -> int:
        """Tokens the tower puts before its patches (CLIP: its CLS, 1; SigLIP: none), read from its
        position table (1 where the embeddings do not say)."""
        emb = self.vision_tower().embeddings
        positions, patches = getattr(emb, "num_positions", None), getattr(emb, "num_patches", None)
        return 1 if positions is None or patches is None else positions - patches

    def extra_tokens(self) -> int:
        """Tokens per tile reaching the projector beyond the patch grid: the "default" strategy drops the
        tower's first token (CLS where it has one), "full" keeps them all."""
        return self.tower_prefix() - (self.model.config.vision_feature_select_strategy == "default")

    def split_runs(self, inputs: dict[str, Any], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Adjacent images form one run of placeholders: split every run into images of N tokens."""
        g = self.grid()
        n = g[0] * g[1]
        out = []
        for sample, start, length in runs:
            if length % n:
                raise LayoutError(f"a run of {length} image tokens (sample {sample}) is not a whole number "
                                  f"of {n}-token images")
            out += [(sample, start + i * n, n) for i in range(length // n)]
        return out

    def image_grids(self, inputs: dict[str, Any], images: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        return [self.grid()] * len(images)

    def model_info(self) -> ModelInfo:
        h, w = self.grid()
        return ModelInfo(
            family=self.family, llm_layers=len(self.language_model().layers),
            vision_layers=len(self.vision_tower().encoder.layers), feature_layer=self.feature_layer(),
            has_cls=self.tower_prefix() > 0 and self.model.config.vision_feature_select_strategy == "default",
            vision_tokens=h * w, prefix_tokens=self.tower_prefix(), llm=self.llm_kind(),
        )

    def static_batch(self, inputs: dict[str, Any], batch: int, forced: bool) -> StaticBatch | None:
        if not self.static_ok():
            return None
        h, w = self.grid()
        pixels = inputs.get("pixel_values")
        if pixels is not None:
            count = pixels.shape[0]
        else:  # generate() 5.23+: the features encoded before the first step
            pre = self.names.pre_computed_vision(inputs)
            feats = getattr(pre, "pooler_output", None)
            if feats is None:
                return None
            feats = feats if isinstance(feats, (list, tuple)) else [feats]
            count = sum(f.numel() // f.shape[-1] for f in feats) // (h * w)
        if count == 0 or count % batch:
            return None
        return StaticBatch(count, count // batch, h * w)

    def static_image_tokens(self) -> int | None:
        if not self.counts_fixed():
            return None  # DyMU decides the count per image
        h, w = self.grid()
        return h * w

    # --- vision tower: statistics and signals ----------------------------------------------------------
    def feature_layer(self) -> int:
        """0-based index of the vision layer whose output the projector reads (the last one, if several)."""
        fl = self.model.config.vision_feature_layer
        fl = max(fl) if isinstance(fl, (list, tuple)) else fl
        n = len(self.vision_tower().encoder.layers)
        return n + fl if fl < 0 else fl - 1

    def vision_depth(self) -> int:
        return len(self.vision_tower().encoder.layers)

    def install_vision(self) -> None:
        tower = self.vision_tower()
        self.handles.append(tower.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
        self.vision_capture: dict[str, Any] | None = None
        self._vision_rows: torch.Tensor | None = None
        self.merger: ViTMerger | None = None
        encoder = self.runtime.encoder
        if encoder:
            if len(encoder) > 1:
                raise UnsupportedModelError("only one encoder-stage merger per patch")
            if self.model.config.vision_feature_select_strategy != "default":
                raise UnsupportedModelError("encoder merging needs vision_feature_select_strategy='default'")
            heads = self.model.config.vision_config.num_attention_heads
            blocks = [BlockSpec(layer, layer.layer_norm2, layer.mlp, (layer.self_attn.k_proj, "linear"), heads, "hf")
                      for layer in tower.encoder.layers]
            self.merger = ViTMerger(encoder[0], blocks, merge_layers=self.feature_layer() + 1)
            self.merger.install(self.handles)
            if encoder[0].vtu is not None:
                if any(not r.internal for r in self.runtime.boundary) or self.runtime.decoder:
                    raise UnsupportedModelError(
                        "vtu (virtual token unmerging) cannot be combined with pruning reducers: the LLM "
                        "must see every merged group"
                    )
                self.vtu = VirtualUnmerge(self, encoder[0].vtu)
                self.vtu.install(self.handles)
        reqs = [r for r in self.runtime.signals if r.kind.startswith("vision_") or r.kind == "encoder_groups"]
        if not reqs:
            return
        self.check_vision_signals(reqs)
        for layer in sorted({self.vision_layer(r.layer) for r in reqs if r.kind != "vision_features"}):
            attn = tower.encoder.layers[layer].self_attn
            for name in ("q_proj", "k_proj"):
                self.handles.append(getattr(attn, name).register_forward_hook(self._capture(f"{name}{layer}")))
        proj = self.part("projector")
        self.handles.append(proj.register_forward_hook(self._capture_projector))

    def check_vision_signals(self, reqs: list[SignalRequest]) -> None:
        """Refuse vision signals this layout cannot map to the LLM's tokens (here: only CLS dropped)."""
        if self.model.config.vision_feature_select_strategy != "default":
            raise SignalError("vision signals need vision_feature_select_strategy='default' (CLS dropped)")

    def _patch_slots(self) -> torch.Tensor:
        """(n, N) row of the projector's input/output holding each patch after encoder merging."""
        return self.merger.state.group[:, 1:] - 1  # tower slot 0 is CLS, dropped by LLaVA

    def _vision_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if pixels is not None:
            self.vision_record = (pixels.shape[0], pixels.shape[-2] * pixels.shape[-1])
            self.vision_capture = {}
            if self.merger is not None:
                h, w = self.grid()
                self.merger.begin(pixels.shape[0], h * w + 1, pixels.device)

    def _capture(self, key: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.vision_capture is not None:
                self.vision_capture[key] = output

        return hook

    def _capture_projector(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> Any:
        if self.vision_capture is None or self.projecting:  # vtoken's own projection (VisionZip): not the tower's
            return None
        features = inputs[0]
        if self.merger is not None and self.merger.state is not None:
            # one projected token per merged group, given to every patch of the group so that
            # transformers' image-token count check passes; the boundary keeps one row per group
            slots = self._patch_slots()
            self.vision_capture["groups"] = slots
            rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
            output = output[rows, slots]
            features = features[rows, slots]
        self.vision_capture["features"] = features
        self.vision_capture["fingerprint"] = fingerprint(output)
        return output

    def prepare_vision(self, embeds: torch.Tensor) -> None:
        """Match this prefill's images to the last vision-tower run by their projected features.

        The tower may have run before this call (generate() encodes images first, beam search then
        repeats them), so each image's features are found by value, never assumed by position.
        """
        if not any(r.kind.startswith("vision_") or r.kind == "encoder_groups" for r in self.runtime.signals):
            return
        cap = self.vision_capture
        if not cap or "fingerprint" not in cap:
            raise SignalError(
                "vision signals were not captured for these images: their features were computed "
                "before the model was patched; run the patched model on pixel_values"
            )
        tokens = cap["features"].shape[1]
        if self.call.lengths is None:  # static prefill: the images are the last tower run's, in order
            if cap["features"].shape[0] != len(self.call.images):
                raise SignalError(
                    f"the last vision-tower run encoded {cap['features'].shape[0]} images but this call has "
                    f"{len(self.call.images)}; a static (graph-safe) prefill reads vision signals in order "
                    "(pass pixel_values to the call, or set vtoken.patched(model).static_layout = False)")
            self._vision_rows = torch.arange(len(self.call.images))
            return
        rows = match_images(embeds, self.call.images, [(tokens, fp) for fp in cap["fingerprint"]],
                            "the images of this call do not match the last vision-tower run; vtoken reads vision "
                            "signals from the tower run that produced the features (pass pixel_values to the call)")
        self._vision_rows = torch.tensor(rows)

    def vision_signal(self, req: SignalRequest) -> torch.Tensor:
        rows = self._vision_rows
        if rows is None:
            raise SignalError(f"{req} was not captured in this forward")
        return self.tower_signal(req, rows)

    def tower_signal(self, req: SignalRequest, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The signal per image of the last tower run (raster order, CLS dropped), for `rows` of them."""
        cap = self.vision_capture or {}
        if req.kind == "vision_features":
            return cap["features"] if rows is None else cap["features"][rows]
        if req.kind == "encoder_groups":
            return cap["groups"] if rows is None else cap["groups"][rows]
        if self.merger is not None:
            raise SignalError(f"{req.kind} is not available after encoder merging (the tower's attention "
                              "maps cover merged tokens); apply attention-guided reducers without it")
        layer = self.vision_layer(req.layer)
        q, k = cap.get(f"q_proj{layer}"), cap.get(f"k_proj{layer}")
        if q is None or k is None:
            raise SignalError(f"vision layer {layer} was not captured (asked: {req})")
        if rows is not None:
            q, k = q[rows], k[rows]
        attn = self.vision_tower().encoder.layers[layer].self_attn
        if req.kind == "vision_attention":  # a side path over the tower's rows: its cost is the reducer's
            self.call.signal_flops += received_attention_flops(q, k, req.query)
            return received_attention(q, k, attn.num_heads, attn.scale, req.query)[:, 1:]
        if req.kind == "vision_keys":
            return k.view(*k.shape[:2], attn.num_heads, -1).mean(2)[:, 1:]
        raise SignalError(f"the {self.family} adapter does not provide signal {req.kind!r}")

    def projector(self):
        return self.part("projector")

    def vision_spec(self) -> TransformerSpec:
        vc = self.model.config.vision_config
        return TransformerSpec(
            d=vc.hidden_size, heads=vc.num_attention_heads, kv_heads=vc.num_attention_heads,
            head_dim=vc.hidden_size // vc.num_attention_heads, mlp=vc.intermediate_size, mlp_mats=2,
            layers=vc.num_hidden_layers,
        )

    def vision_flops(self) -> tuple[int, int]:
        assert self.vision_record is not None
        n_images, pixels = self.vision_record
        vc = self.model.config.vision_config
        patches = pixels // (vc.patch_size * vc.patch_size)
        spec = self.vision_spec()
        layers = self.model.config.vision_feature_layer
        n_feat = 1 if isinstance(layers, int) else len(layers)
        d = self.text_config().hidden_size
        embed = patch_embed_flops(patches, vc.num_channels, vc.patch_size, vc.hidden_size)
        st = self.merger.state if self.merger is not None else None
        if st is not None and st.entering:
            per_image = list(zip(*st.entering))  # tokens entering each layer, per image
            tower = sum(stack_flops(spec, list(t)) for t in per_image) + n_images * embed
            self.runtime.stats.vision_tokens = [sum(t) / len(t) for t in st.entering]
            proj = sum(linear_flops(c - 1, [(vc.hidden_size * n_feat, d), (d, d)]) for c in st.entering[-1])
            return tower, proj
        tower = embed + stack_flops(spec, [patches + self.tower_prefix()] * spec.layers)
        rows = patches + self.extra_tokens()
        proj = linear_flops(rows, [(vc.hidden_size * n_feat, d), (d, d)])
        return n_images * tower, n_images * proj
