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
path attention, TTV) are `hf/llm_signals.py`; the top-level call's start and end `hf/forward.py`;
statistics and FLOPs `hf/accounting.py`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from vtoken.adapter import Adapter
from vtoken.adapters.hf import accounting, compat, decode, forward, prefill
from vtoken.adapters.hf.llm_signals import LLMSignals
from vtoken.adapters.hf.state import Call
from vtoken.adapters.hf.static import StaticBatch
from vtoken.errors import BudgetError, LayoutError, SignalError, UnsupportedModelError
from vtoken.flops import TransformerSpec
from vtoken.ledger import ImageSpan, Layout, per_sample
from vtoken.reducers.base import ModelInfo, Signal, SignalRequest


class InstanceAttr:
    """Removal handle of an attribute vtoken set on one model instance (never on its class)."""

    def __init__(self, owner: nn.Module, name: str, value: Any) -> None:
        self.owner, self.name, self.value = owner, name, value

    def remove(self) -> None:
        if self.owner.__dict__.get(self.name) is self.value:
            del self.owner.__dict__[self.name]


def wrap_method(adapter: Adapter, owner: nn.Module, name: str, after: Callable[[dict[str, Any], Any], None]) -> None:
    """Wrap the method `name` of `owner` on this instance (never its class): `after(arguments, output)`
    sees each call's arguments by name and its output; `remove()` restores the original."""
    original = compat.attribute(owner, name, adapter.family)
    sig = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        after(sig.bind_partial(*args, **kwargs).arguments, out)
        return out

    setattr(owner, name, wrapper)
    adapter.handles.append(InstanceAttr(owner, name, wrapper))


class HFVisionLanguageAdapter(Adapter):
    """Base for transformers VLM adapters; subclasses describe the family's anatomy."""

    stages = frozenset({"encoder", "boundary", "decoder"})
    pos_emb_seq_dim = 1  # sequence dim of the (cos, sin) position embeddings (side path and rewriting)

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
        return self.token_mask(inputs, self.model.config.image_token_id)

    def token_mask(self, inputs: dict[str, Any], token_id: int) -> torch.Tensor | None:
        """(B, L) bool mask of `token_id` placeholders, from input_ids or inputs_embeds (see above)."""
        ids = inputs.get("input_ids")
        if ids is not None:
            return ids == token_id
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            return None
        token = self.model.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
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
        return ModelInfo(family=self.family, llm_layers=len(self.language_model().layers), llm=self.llm_kind())

    def llm_kind(self) -> str:
        """The language model's architecture: its config's model_type (e.g. "llama", "qwen2")."""
        return str(getattr(self.text_config(), "model_type", ""))

    # --- installation ------------------------------------------------------------------------------
    def install_hooks(self) -> None:
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
        head = self.model.get_output_embeddings()
        if head is not None:
            self.handles.append(head.register_forward_hook(self._logits_post))
        first = min([*rt.decoder, self.llm_signals.first_layer()], default=n_layers)
        for i in range(first, n_layers):
            self.handles.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        self.llm_signals.install(self.handles)
        self.install_vision()
        # Why an instance attribute: generate() asks the model for `create_masks_for_generate` to build
        # a static cache's 4-D mask in advance (no hook sees it), which vtoken could not re-slice.
        if "create_masks_for_generate" not in self.model.__dict__:
            self.model.create_masks_for_generate = compat.keep_2d_mask
            self.handles.append(InstanceAttr(self.model, "create_masks_for_generate", compat.keep_2d_mask))

    def resolve_stats(self) -> None:
        accounting.resolve(self)

    def take_carried(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """At a prefill's boundary: take per-token features the language model would add to visual rows
        by a mask vtoken's reductions invalidate (Qwen3-VL's deepstack) into `call.carried`, so that
        they follow the ledger. Returns the language model's kwargs and whether any were taken."""
        return kwargs, False

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
                    fixed = r.static_count()
                    n = n if fixed is None else fixed
                    continue
                n = r.budget(n, layer, entry)  # raises BudgetError if an int keep exceeds n
            if layer is None:
                entry = n

    def static_image_tokens(self) -> int | None:
        """Tokens per image if every image has the same count (None if it varies)."""
        return None

    def static_batch(self, inputs: dict[str, Any], batch: int, forced: bool) -> StaticBatch | None:
        """This call's image structure from shapes alone, for a graph-safe prefill (`hf/static.py`);
        None where the family or the call cannot give it (the prefill then reads it from the mask).
        forced: the user set `static_layout = True` (else: automatic, while compiling)."""
        return None

    def static_grids(self) -> list[tuple[int, int]]:
        """A static prefill's token grid per image (default: the images' grids from `image_grids`)."""
        return self.image_grids(self.call.inputs, self.call.images)

    def static_asserts(self, inputs: dict[str, Any]) -> None:
        """Device-side checks of a static prefill's promise beyond the placeholder runs (at the boundary)."""

    def counts_fixed(self) -> bool:
        """Every reducer's count per image is fixed by the configuration (content-adaptive ones only
        where it fixes them anyway: merged groups after ToMe / PiToMe), or bounded by it and reported on
        the device by a reducer at the last reduction point (`Reducer.device_counts`: ToDRE's stage 2)."""
        dec = self.runtime.decoder
        last = dec[max(dec)][-1] if dec else None  # the reducer that acts last
        return all(not r.adaptive or r.static_count() is not None or (r.device_counts and r is last)
                   for r in self.runtime.reducers)

    def static_ok(self) -> bool:
        """Counts fixed by the configuration (`counts_fixed`) and no VTU."""
        return self.counts_fixed() and not any(r.vtu for r in self.runtime.encoder)

    # --- top-level call ----------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The top-level forward's arguments by name (**kwargs flattened)."""
        bound = self._sig.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        for name, p in self._sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
                out.update(out.pop(name))
        return out

    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        return forward.begin(self, module, args, kwargs)

    def split_runs(self, inputs: dict[str, Any], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """The images, (sample, start, tokens), in the runs of placeholder tokens. Default: one per run."""
        return runs

    def image_spans(self) -> list[ImageSpan]:
        """Give each image of this prefill its token grid (after `prepare_vision`)."""
        call = self.call
        grids = self.static_grids() if call.static is not None else self.image_grids(call.inputs, call.images)
        if len(grids) != len(call.images):
            raise LayoutError(f"{len(call.images)} images in the prompt but {len(grids)} image grids")
        spans = []
        for k, ((sample, start, n), grid) in enumerate(zip(call.images, grids)):
            if grid[0] * grid[1] != n:
                raise LayoutError(f"image at sample {sample}, position {start} has {n} tokens, not {grid[0]}x{grid[1]}")
            spans.append(ImageSpan(sample, start, grid, part=self.span_part(k)))
        return spans

    def span_part(self, k: int) -> tuple[int, int] | None:
        """(frame, frames) when span k of this call is one frame of a video, else None."""
        return None

    def _logits_post(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        return forward.expand_logits(self, module, inputs, output)

    def _top_post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return forward.end(self, module, args, kwargs, output)

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
