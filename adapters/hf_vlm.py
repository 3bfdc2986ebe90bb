"""Shared machinery for Hugging Face vision-language models (transformers 5.x) whose language model is
a decoder-only stack of layers (`language_model.layers`) fed `inputs_embeds`.

Hooks, all on the given instance (nothing is patched on a class):
- a forward pre-hook (with kwargs) on the top-level model starts a call: it finds the image tokens,
  decides prefill / decode, and takes `labels` (the loss is recomputed on re-expanded logits);
  a forward hook ends it: logits are re-expanded to the original length, the KV cache is tagged
  with the ledger's decode state, statistics are written;
- a forward pre-hook on the language model runs the **boundary** stage: it slices `inputs_embeds`,
  the 2-D `attention_mask` and `position_ids` (kept tokens keep their original position ids), so the
  language model builds its own mask and rotary embeddings for the reduced sequence;
- forward pre-hooks on decoder layers run the **decoder** stage: at layer k the visual rows are
  dropped from `hidden_states`, and every later layer gets the sliced `position_embeddings`,
  `position_ids` and a causal mask built by transformers' own `create_causal_mask` for the reduced
  rows (sized against that layer's cache, so decoding stays consistent);
- forward hooks on `q_proj` / `k_proj` of the layers whose attention a reducer reads capture their
  outputs, from which the attention signal is computed on a side path (the model keeps SDPA).

Decoding with a KV cache: the cache carries a `DecodeState` (`hf/state.py`) naming, for each layer
range, the prefill rows it holds; `hf/decode.py` rewrites each cached step so that it attends
exactly to what the prefill kept plus the new tokens. Beam search reorders the cache within each
prompt's beams, whose states are identical, so the tag stays valid. LLM-side signals (captures, side
path attention, TTV) are `hf/llm_signals.py`; statistics and FLOPs `hf/accounting.py`.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from vtoken.adapter import Adapter
from vtoken.adapters.hf import accounting, compat, decode, prefill
from vtoken.adapters.hf.llm_signals import LLMSignals
from vtoken.adapters.hf.state import Call, DecodeState, attach, attached
from vtoken.errors import BudgetError, LayoutError, SignalError, UnsupportedModelError
from vtoken.flops import TransformerSpec
from vtoken.ledger import ImageSpan, Layout, expand_to_original, per_sample
from vtoken.reducers.base import ModelInfo, Signal, SignalRequest


class HFVisionLanguageAdapter(Adapter):
    """Base for transformers VLM adapters; subclasses describe the family's anatomy."""

    stages = frozenset({"encoder", "boundary", "decoder"})
    pos_emb_seq_dim = LLMSignals.pos_emb_seq_dim

    # --- anatomy, provided by subclasses -----------------------------------------------------------
    # attribute paths of the family's parts from the top-level model (resolved by compat.attribute)
    paths: ClassVar[dict[str, str]] = {"language_model": "model.language_model"}

    def part(self, name: str) -> nn.Module:
        """The family's part `name` (see `paths`); UnsupportedModelError if the model lacks it."""
        return compat.attribute(self.model, self.paths[name], self.family)

    def language_model(self) -> nn.Module:
        """The decoder-only LLM (transformers 5.x VLMs keep it at `model.model.language_model`)."""
        return self.part("language_model")

    def text_config(self) -> Any:
        return self.model.config.text_config

    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """(B, L) bool mask of image placeholder tokens in this call's inputs (None if none can exist).

        From `input_ids` when given, else by matching `inputs_embeds` rows to the image token's
        embedding (the placeholder rows are still unfilled when the language model's pre-hook runs).
        """
        image_id = self.model.config.image_token_id
        ids = inputs.get("input_ids")
        if ids is not None:
            return ids == image_id
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            return None
        token = self.model.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
        return (embeds == token).all(-1)

    def image_grids(self, inputs: dict[str, Any], images: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        """Token grid (rows, cols) of each image, in order ((sample, start, tokens) per image)."""
        raise NotImplementedError

    def has_new_images(self, inputs: dict[str, Any]) -> bool:
        """True when this call carries images (pixels or pre-computed encoder outputs)."""
        return inputs.get("pixel_values") is not None or self.names.pre_computed_vision(inputs) is not None

    def vision_depth(self) -> int:
        """Layers (blocks) of the vision tower; subclasses with vision signals provide it."""
        raise SignalError(f"the {self.family} adapter does not read vision-tower signals")

    def feature_layer(self) -> int:
        """The tower layer whose output reaches the LLM (default: the last)."""
        return self.vision_depth() - 1

    def vision_layer(self, layer: int) -> int:
        """Resolve a signal's vision layer (-1: the feature layer)."""
        n = self.vision_depth()
        idx = self.feature_layer() if layer == -1 else layer
        if not 0 <= idx < n:
            raise SignalError(f"vision layer {layer} does not exist; the tower has {n} layers (0..{n - 1})")
        return idx

    def llm_spec(self) -> TransformerSpec:
        cfg = self.text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return TransformerSpec(
            d=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim, mlp=cfg.intermediate_size, mlp_mats=3, layers=cfg.num_hidden_layers,
        )

    def vision_flops(self) -> tuple[int, int]:
        """(vision tower FLOPs, projector FLOPs) of the images of the last vision-tower run."""
        return 0, 0

    def model_info(self) -> ModelInfo:
        return ModelInfo(family=self.family, llm_layers=len(self.language_model().layers))

    # --- installation ------------------------------------------------------------------------------
    def install(self) -> None:
        rt = self.runtime
        lm = self.language_model()
        self.lm = lm
        self.layers = compat.attribute(lm, "layers", self.family)
        if len(self.layers) == 0:
            raise UnsupportedModelError(f"the {self.family} language model has no decoder layers")
        self.names = compat.probe(self.model, lm, self.layers[0])
        self.rotary = getattr(lm, "rotary_emb", None)
        n_layers = len(self.layers)
        for layer, reducers in rt.decoder.items():
            if not 0 <= layer < n_layers:
                raise BudgetError(
                    f"{reducers[0].name}: layer {layer} does not exist; the language model has "
                    f"{n_layers} layers (0..{n_layers - 1})"
                )
            if any(r.renumber for r in reducers) and self.rotary is None:
                raise UnsupportedModelError("renumber=True needs the language model's rotary_emb module")
        for req in rt.signals:
            if req.kind.startswith(("llm_", "ttv")) and not 0 <= req.layer < n_layers:
                raise SignalError(f"{req} asks for layer {req.layer}, but the LLM has {n_layers} layers")
        self.llm_signals = LLMSignals(self)
        self._check_static_budgets()
        self.vtu = None
        self.projecting = False
        self._sig = inspect.signature(self.model.forward)
        self.vision_record: tuple[int, int] | None = None
        self.call = Call()
        self.handles.append(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._top_post, with_kwargs=True))
        self.handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        first = min([*rt.decoder, self.llm_signals.first_layer()], default=n_layers)
        for i in range(first, n_layers):
            self.handles.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        self.llm_signals.install(self.handles)
        self.install_vision()

    def prefill_starts(self, inputs: dict[str, Any]) -> None:
        """A prefill call begins (before its vision tower runs); subclasses may drop stale captures."""

    def install_vision(self) -> None:
        """Install vision-tower hooks (statistics, vision signals); subclasses override."""

    def _check_static_budgets(self) -> None:
        """Fail at patch time when an int budget exceeds the tokens an image can have."""
        n = self.static_image_tokens()
        if n is None:
            return
        entry = n
        for layer, reducers in self.runtime.points():
            for r in reducers:
                if r.adaptive:
                    continue
                n = r.budget(n, layer, entry)  # raises BudgetError if an int keep exceeds n
            if layer is None:
                entry = n

    def static_image_tokens(self) -> int | None:
        """Tokens per image if every image has the same count (None if it varies)."""
        return None

    # --- top-level call ----------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._sig.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        for name, p in self._sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
                out.update(out.pop(name))
        return out

    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        self.call = call = Call()
        rt = self.runtime
        inputs = self._bind(args, kwargs)
        rd = inputs.get("return_dict")
        call.return_dict = bool(getattr(module.config, "return_dict", True) if rd is None else rd)
        cache = self.names.cache(inputs)
        cache_len = cache.get_seq_length() if cache is not None else 0
        if cache_len > 0:
            state = attached(cache)
            if state is None:
                if self.has_new_images(inputs):
                    raise LayoutError(decode.NEW_IMAGES)
                rt.new_stats()
                return None
            call.mode = "decode"
            call.decode = state
            rt.stats.decode_steps += 1
            inputs["return_dict"] = True
            decode.cached_inputs(self, inputs, state, cache_len)
            return (), inputs
        stats = rt.new_stats()
        mask = self.image_token_mask(inputs)
        if mask is None:
            return None
        stats.visual_tokens = [0] * mask.shape[0]
        am = inputs.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise LayoutError(
                "vtoken needs a 2-D padding attention_mask (batch, length); a prepared 4-D mask cannot "
                "be re-sliced for the reduced sequence"
            )
        b, length = mask.shape
        img = mask.cpu()
        valid = am.bool() if am is not None else torch.ones(b, length, dtype=torch.bool, device=mask.device)
        valid_cpu = valid.cpu()
        images = self.split_runs(inputs, self._runs(img & valid_cpu))
        if not images:
            return None
        call.mode = "prefill"
        self.prefill_starts(inputs)
        call.images = images
        call.inputs = inputs
        call.valid = valid
        call.lengths = valid_cpu.sum(1).tolist()
        call.right_align = bool(valid_cpu[:, -1].all())
        if inputs.get("labels") is not None:
            call.labels = inputs.pop("labels")
            call.loss_kwargs = {k: inputs[k] for k in ("num_items_in_batch",) if k in inputs}
            # scoring: the first scored label starts the continuation, which must not steer the reduction
            scored = call.labels != -100
            pos = torch.arange(scored.shape[1], device=scored.device).expand_as(scored)
            call.prompt_end = torch.where(scored, pos, scored.shape[1]).amin(1)
        ltk = inputs.get("logits_to_keep", 0)
        if not (isinstance(ltk, int) and ltk in (0, 1)):
            call.logits_to_keep = ltk
            inputs["logits_to_keep"] = 0
        inputs["return_dict"] = True
        return (), inputs

    @staticmethod
    def _runs(img: torch.Tensor) -> list[tuple[int, int, int]]:
        """(sample, start, length) of each run of image tokens in a host (B, L) mask, in order."""
        b = img.shape[0]
        flat = torch.cat([torch.zeros(b, 1, dtype=torch.bool), img, torch.zeros(b, 1, dtype=torch.bool)], 1)
        edges = flat[:, 1:].int() - flat[:, :-1].int()
        starts = (edges == 1).nonzero().tolist()
        ends = (edges == -1).nonzero().tolist()
        return [(s[0], s[1], e[1] - s[1]) for s, e in zip(starts, ends)]

    def split_runs(self, inputs: dict[str, Any], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """The images, (sample, start, tokens), in the runs of placeholder tokens. Default: one per run."""
        return runs

    def image_spans(self) -> list[ImageSpan]:
        """Give each image of this prefill its token grid (after `prepare_vision`)."""
        call = self.call
        grids = self.image_grids(call.inputs, call.images)
        if len(grids) != len(call.images):
            raise LayoutError(f"{len(call.images)} images in the prompt but {len(grids)} image grids")
        spans = []
        for (sample, start, n), grid in zip(call.images, grids):
            if grid[0] * grid[1] != n:
                raise LayoutError(f"image at sample {sample}, position {start} has {n} tokens, not {grid[0]}x{grid[1]}")
            spans.append(ImageSpan(sample, start, grid))
        return spans

    def _top_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        call = self.call
        rt = self.runtime
        if call.mode == "prefill":
            final = call.layout
            rt.last_layout, rt.last_spans = final, call.spans
            logits = output.logits
            lm_rows = logits.shape[0] * logits.shape[1]
            if call.segments and logits.shape[1] == final.shape[1]:
                logits = expand_to_original(logits, final)
            cache = self.names.output_cache_of(output)
            if cache is not None:
                exact = self.vtu is not None and self.vtu.mode == "exact"
                segments = call.segments
                if self.vtu is not None and not exact:  # expand: the cache holds the virtual (original) rows
                    segments = [s for s in segments if s.layer != 0]
                state = DecodeState(segments, final.orig_len, final.shape[0], list(call.lengths),
                                    call.next_pos, vtu=call.vtu if exact else None)
                attach(cache, state)
            if call.logits_to_keep is not None:
                ltk = call.logits_to_keep
                logits = logits[:, -ltk:] if isinstance(ltk, int) else logits[:, ltk]
            output.logits = logits
            if call.labels is not None:
                output.loss = module.loss_function(
                    logits=logits, labels=call.labels, vocab_size=self.text_config().vocab_size,
                    **call.loss_kwargs,
                )
            accounting.record_prefill(self, lm_rows)
            call.done = True  # what runs again now (checkpoint recomputation in backward) must not re-reduce
        elif call.mode == "decode":
            accounting.record_decode(self, output.logits.shape[1])
        elif call.mode == "off" and self.vision_record is not None:
            accounting.record_prefill(self, 0)
        if not call.return_dict:
            return output.to_tuple()
        return output

    # --- language model: boundary stage and decoding ------------------------------------------------
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self.call
        if call.mode == "decode":
            return args, decode.lm_kwargs(call, self.names.cache(kwargs, "lm"), kwargs)
        if call.mode != "prefill":
            return None
        return prefill.boundary(self, args, kwargs)

    def decode_tail(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        """(B, n) padding mask of the last n tokens appended after the prefill (exact VTU reads it)."""
        return decode.tail(self.call, b, n, device)

    # --- decoder layers: decoder stage -------------------------------------------------------------
    def _layer_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            call = self.call
            if call.mode == "prefill":
                return prefill.decoder_layer(self, i, args, kwargs)
            if call.mode == "decode":
                hidden = args[0] if args else kwargs["hidden_states"]
                new = decode.layer_kwargs(self, i, hidden, kwargs)
                return None if new is None else (args, new)
            return None

        return hook

    # --- signals -----------------------------------------------------------------------------------
    def signal(self, req: SignalRequest, layout: Layout) -> Signal:
        """The requested signal for the tokens of `layout`, computed on demand."""
        if req.kind.startswith("vision_") or req.kind == "encoder_groups":
            return Signal(self.vision_signal(req), "raster")
        return self.llm_signals.signal(req, layout)

    def vision_signal(self, req: SignalRequest) -> torch.Tensor:
        """(n_img, N0, ...) per image of this prefill, in raster order; subclasses provide it."""
        raise SignalError(f"the {self.family} adapter does not provide signal {req.kind!r}")

    def projector(self):
        """Callable mapping vision features into the LLM embedding space, if the family has one."""
        return None

    def side_projector(self) -> Any:
        """The projector as a reducer calls it (VisionZip's contextual tokens). The call is vtoken's
        own: `projecting` tells the vision capture not to record it as the tower's output."""
        module = self.projector()
        if module is None:
            return None

        def project(x: torch.Tensor) -> torch.Tensor:
            self.projecting = True
            try:
                return module(x)
            finally:
                self.projecting = False

        return project

    def prepare_vision(self, embeds: torch.Tensor) -> None:
        """Called at the start of each prefill: locate this call's images among captured vision signals."""

    def per_sample(self, counts: list[int], b: int) -> list[int]:
        """Per-sample totals of this prefill's per-image host counts."""
        return per_sample(self.call.spans, counts, b)
