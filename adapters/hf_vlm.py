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

Decoding with a KV cache: the cache carries a `DecodeState` (attribute `_vtoken_decode`) naming, for
each layer range, the prefill rows it holds. Each decoding step rebuilds the 2-D mask of those rows
plus the new tokens, so later steps attend exactly to what the prefill kept. Beam search reorders
the cache within each prompt's beams, whose states are identical, so the tag stays valid.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vtoken.adapter import Adapter
from vtoken.adapters.hf import compat
from vtoken.errors import BudgetError, LayoutError, SignalError, UnsupportedModelError
from vtoken.flops import TransformerSpec, decode_step_flops, layer_flops, linear_flops
from vtoken.ledger import ImageSpan, Layout, expand_to_original, gather_rows
from vtoken.reducers.base import ModelInfo, Signal, SignalRequest
from vtoken.stage import run_point

STATE_ATTR = "_vtoken_decode"


@dataclass
class Segment:
    """LLM layers from `layer` on run on `layout` (until the next segment)."""

    layer: int
    layout: Layout
    dec_shift: torch.Tensor | None  # (B,) subtract from decoded tokens' position ids (renumbering)
    new_rope: bool  # position embeddings must be recomputed from this layer on (renumbered here or before)


@dataclass
class DecodeState:
    """Carried by a KV cache produced by a reducing prefill."""

    segments: list[Segment]
    orig_len: int
    batch: int
    lengths: list[int]  # real prompt tokens per sample before any reduction
    next_pos: torch.Tensor  # (B,) or (axes, B): first position id after the prompt (original numbering)
    vtu: Any = None  # VirtualMap of the prefill (exact virtual token unmerging)


@dataclass
class Call:
    """State of one top-level forward (reset at every call, so an exception leaves nothing stale)."""

    mode: str = "off"  # "off" | "prefill" | "decode"
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (sample, start, tokens) per image
    inputs: dict[str, Any] = field(default_factory=dict)
    spans: list[ImageSpan] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B, L) bool, device
    lengths: list[int] = field(default_factory=list)
    right_align: bool = True
    layout: Layout | None = None
    pos: torch.Tensor | None = None  # position ids of the current layout's rows
    segments: list[Segment] = field(default_factory=list)
    seg_kwargs: dict[str, Any] | None = None
    seg_layer: int = -1
    captures: dict[int, dict[str, Any]] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    prompt_end: torch.Tensor | None = None  # (B,) set from labels: where the scored continuation starts
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    logits_to_keep: int | torch.Tensor | None = None
    return_dict: bool = True
    decode: DecodeState | None = None
    orig_pos: torch.Tensor | None = None  # decode: position ids in original numbering
    tail: torch.Tensor | None = None  # decode: 2-D mask columns of the tokens after the prefill
    n_new: int = 0
    signal_flops: int = 0
    next_pos: torch.Tensor | None = None  # (B,) or (axes, B): first position after the prompt
    done: bool = False  # the forward has returned (hooks firing now are a backward recomputation)
    # with autograd on: per layer, (rows it kept, kwargs vtoken gave it), for a checkpoint's recomputation
    replay: dict[int, tuple[torch.Tensor | None, dict[str, Any] | None]] = field(default_factory=dict)
    text_after: list[int] = field(default_factory=list)  # host: prompt tokens after each sample's last image
    point: dict[str, Any] | None = None  # the decoder point being reduced: its layer and input
    ttv: torch.Tensor | None = None  # (B, L_orig + 1) TTV accumulated per original column
    vtu: Any = None  # VirtualMap (virtual token unmerging) of this prefill
    vtu_hidden: torch.Tensor | None = None
    vtu_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    vtu_mask: Any = None


class HFVisionLanguageAdapter(Adapter):
    """Base for transformers VLM adapters; subclasses describe the family's anatomy."""

    stages = frozenset({"encoder", "boundary", "decoder"})
    pos_emb_seq_dim = 1  # sequence dim of the (cos, sin) position embeddings

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
        self._check_static_budgets()
        self.vtu = None
        self.projecting = False
        self._sig = inspect.signature(self.model.forward)
        self.vision_record: tuple[int, int] | None = None
        self.call = Call()
        self.handles.append(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._top_post, with_kwargs=True))
        self.handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        signal_layers = self._signal_layers()
        ttv = [r for r in rt.signals if r.kind == "ttv"]
        ttv_end = max(rt.decoder, default=0)
        first = min([*rt.decoder, *signal_layers, *(r.layer for r in ttv)], default=n_layers)
        for i in range(first, n_layers):
            self.handles.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for i in sorted(signal_layers):
            attn = self.layers[i].self_attn
            for name in ("q_proj", "k_proj"):
                self.handles.append(getattr(attn, name).register_forward_hook(self._proj_hook(i, name)))
        if len({r.query for r in ttv}) > 1:
            raise SignalError("reducers disagree on the TTV direction variant; use one per patch")
        for i in range(min((r.layer for r in ttv), default=ttv_end), ttv_end):
            layer = self.layers[i]
            self.handles.append(layer.self_attn.register_forward_hook(self._ttv_hook(ttv[0].query), with_kwargs=True))
            self.handles.append(layer.mlp.register_forward_hook(self._ttv_hook(ttv[0].query), with_kwargs=True))
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
            state = getattr(cache, STATE_ATTR, None)
            if state is None:
                if self.has_new_images(inputs):
                    raise LayoutError(
                        "vtoken cannot add images to a KV cache that already holds tokens (multi-turn "
                        "with new images); start from an empty cache, or unpatch for this call"
                    )
                rt.new_stats()
                return None
            call.mode = "decode"
            call.decode = state
            rt.stats.decode_steps += 1
            inputs["return_dict"] = True
            self._decode_inputs(inputs, state, cache_len)
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

    def _decode_inputs(self, inputs: dict[str, Any], state: DecodeState, cache_len: int) -> None:
        """Rewrite a cached call over a reduced cache (in place) so that it equals a full recompute.

        The cache holds fewer rows than the original positions it stands for (`seen`). A caller that
        continues from it with the whole conversation so far (generate(prev + follow-up, cache), as
        multi-turn chat does) passes tokens the cache already holds: with a 2-D mask over the whole
        sequence, only its last `mask length - seen` tokens are new, and only those are fed. New
        tokens are numbered after the original prompt (not after the reduced cache's length).
        """
        seg0 = state.segments[0] if state.segments and state.segments[0].layer == 0 else None
        rows0 = seg0.layout.shape[1] if seg0 is not None else state.orig_len
        appended = cache_len - rows0  # tokens added to the cache since the prefill
        seen = state.orig_len + appended
        key = "input_ids" if inputs.get("input_ids") is not None else "inputs_embeds"
        x = inputs[key]
        b, q = x.shape[:2]
        am = inputs.get("attention_mask")
        if am is not None and am.dim() == 2:
            new = am.shape[1] - seen
            if new <= 0:
                raise LayoutError(
                    f"the attention_mask covers {am.shape[1]} positions but the KV cache already stands for "
                    f"{seen} (the reduced prompt and {appended} generated tokens); pass a mask over the whole "
                    "sequence including the new tokens"
                )
            if q > new:  # per-token inputs keep their last `new` tokens (seq is the last dim but for embeds)
                for name in ("position_ids", *compat.TOKEN_TYPE_INPUTS):
                    if inputs.get(name) is not None:
                        inputs[name] = inputs[name][..., -new:]
                inputs[key] = x[:, -new:]
                q = new
        # placeholders among the new tokens with pixels passed: new images (a generated token that
        # happens to be the placeholder id, with no pixels, is only a token)
        new_images = self.image_token_mask(inputs) if key == "input_ids" and self.has_new_images(inputs) else None
        if new_images is not None and bool(new_images.any()):
            raise LayoutError(
                "vtoken cannot add images to a KV cache that already holds tokens (multi-turn with new "
                "images); start from an empty cache, or unpatch for this call"
            )
        for name in compat.VISION_INPUTS:  # the images of the cached prompt: already encoded
            inputs.pop(name, None)
        if inputs.get("attention_mask") is None and inputs.get("position_ids") is None and seg0 is not None:
            inputs["attention_mask"] = torch.ones(b, seen + q, dtype=torch.long, device=x.device)
        if inputs.get("position_ids") is None:
            steps = appended + torch.arange(q, device=x.device)
            inputs["position_ids"] = state.next_pos.to(x.device)[..., None] + steps

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

    def _spans(self) -> list[ImageSpan]:
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
                setattr(cache, STATE_ATTR, state)
            if call.logits_to_keep is not None:
                ltk = call.logits_to_keep
                logits = logits[:, -ltk:] if isinstance(ltk, int) else logits[:, ltk]
            output.logits = logits
            if call.labels is not None:
                output.loss = module.loss_function(
                    logits=logits, labels=call.labels, vocab_size=self.text_config().vocab_size,
                    **call.loss_kwargs,
                )
            self._prefill_stats(lm_rows)
            call.done = True  # what runs again now (checkpoint recomputation in backward) must not re-reduce
        elif call.mode == "decode":
            self._decode_stats(output.logits.shape[1])
        elif call.mode == "off" and self.vision_record is not None:
            self._prefill_stats(0)
        if not call.return_dict:
            return output.to_tuple()
        return output

    # --- language model: boundary stage and decoding ------------------------------------------------
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self.call
        if call.mode == "decode":
            return args, self._lm_decode(kwargs)
        if call.mode != "prefill":
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise LayoutError("vtoken expects the language model to be called with inputs_embeds")
        b, length, _ = embeds.shape
        self.prepare_vision(embeds)
        call.spans = self._spans()
        ends = [call.lengths[i] if not call.right_align else length for i in range(b)]
        last_end = [-1] * b
        for sp in call.spans:
            last_end[sp.sample] = max(last_end[sp.sample], sp.start + sp.n)
        call.text_after = [ends[i] - last_end[i] if last_end[i] >= 0 else call.lengths[i] for i in range(b)]
        layout = Layout.initial(call.valid, call.spans, call.lengths, call.right_align)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=embeds.device)[None]
        pos = pos.expand(*pos.shape[:-2], b, length)
        call.layout, call.pos = layout, pos
        call.next_pos = torch.where(call.valid, pos, -1).amax(-1) + 1  # per axis of multi-axis ids
        rt = self.runtime
        if not rt.boundary:
            return None
        res = run_point(rt.boundary, layout, embeds, call.spans, self._signal, rt.timer,
                        project=self._side_projector())
        res.layout.entry = [c - s.pinned for c, s in zip(res.layout.counts, call.spans)]
        call.layout = res.layout
        if not res.changed:
            return None
        if self.vtu is not None:
            call.vtu = self.virtual_map(layout, res.src, res.layout, pos)
        pos = gather_rows(pos, res.src, dim=-1)
        if res.pos_shift is not None:
            pos = pos - res.pos_shift
        call.pos = pos
        call.segments.append(Segment(0, res.layout, res.dec_shift, False))
        kwargs = dict(kwargs, inputs_embeds=res.hidden, attention_mask=res.layout.valid, position_ids=pos)
        return args, kwargs

    def _lm_decode(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        call = self.call
        st = call.decode
        assert st is not None
        cache = self.names.cache(kwargs, "lm")
        embeds = kwargs.get("inputs_embeds")
        if cache is None or embeds is None:
            raise LayoutError("decoding a reduced prefill needs the KV cache and inputs_embeds")
        b, q = embeds.shape[:2]
        if b != st.batch:
            raise LayoutError(
                f"the KV cache was reduced for a batch of {st.batch} but this step has {b} rows; "
                "vtoken supports greedy/sampling/beam search, not batch-reshaping decoders"
            )
        seg0 = st.segments[0] if st.segments and st.segments[0].layer == 0 else None
        rows0 = seg0.layout.shape[1] if seg0 is not None else st.orig_len
        n_new = cache.get_seq_length(0) - rows0 + q
        call.n_new = n_new
        am = kwargs.get("attention_mask")
        if am is not None:
            if am.dim() != 2 or am.shape[1] != st.orig_len + n_new:
                raise LayoutError(
                    f"decoding step got an attention_mask of shape {tuple(am.shape)}; expected a 2-D mask "
                    f"over the original prompt and new tokens (length {st.orig_len + n_new})"
                )
            call.tail = am[:, st.orig_len:].bool()
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = (torch.arange(q, device=embeds.device) + st.orig_len + n_new - q)[None].expand(b, q)
        call.orig_pos = pos
        if seg0 is None:
            return kwargs
        kwargs = dict(kwargs, attention_mask=self._decode_mask2d(seg0, b, embeds.device))
        if seg0.dec_shift is not None:
            kwargs["position_ids"] = _shift(pos, seg0.dec_shift)
        return kwargs

    def _decode_mask2d(self, seg: Segment, b: int, device: torch.device) -> torch.Tensor:
        return torch.cat([seg.layout.valid, self.decode_tail(b, self.call.n_new, device)], dim=1)

    def decode_tail(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        """(B, n) padding mask of the last n tokens appended after the prefill."""
        tail = self.call.tail
        if tail is None:
            return torch.ones(b, n, dtype=torch.bool, device=device)
        return tail[:, -n:].to(device)

    def virtual_map(self, original: Layout, src: torch.Tensor, reduced: Layout, pos: torch.Tensor):
        """The virtual sequence (VTU): each original row -> the reduced row holding its merged group."""
        from vtoken.adapters.vtu import build_map
        from vtoken.ledger import image_rows
        from vtoken.reducers.merging import representatives

        b, length = original.shape
        device = original.valid.device
        unique = reduced.shape[1]
        to_row = torch.full((b, length + 1), unique, dtype=torch.long, device=device)
        to_row.scatter_(1, src, torch.arange(unique, device=device).expand(b, unique).contiguous())
        rep_row = torch.arange(length, device=device).expand(b, length).contiguous()
        groups = self.vision_signal(SignalRequest("encoder_groups", -1))
        n = groups.shape[1]
        ones = torch.ones_like(groups, dtype=torch.bool)
        rep, _ = representatives(groups, ones, torch.arange(n, device=device).expand_as(groups))
        flat, valid = image_rows(original)
        starts = torch.tensor([s.start for s in self.call.spans], device=device)
        rep_row.view(-1)[flat[valid]] = (starts[:, None] + rep)[valid]
        to_unique = to_row.gather(1, rep_row)
        return build_map(to_unique, original.valid, pos.expand(b, length), unique)

    # --- decoder layers: decoder stage -------------------------------------------------------------
    def _layer_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            call = self.call
            if call.mode == "prefill":
                return self._layer_prefill(i, args, kwargs)
            if call.mode == "decode":
                return self._layer_decode(i, args, kwargs)
            return None

        return hook

    def _layer_prefill(self, i: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self.call
        rt = self.runtime
        hidden = args[0] if args else kwargs["hidden_states"]
        if call.done:  # gradient checkpointing re-runs the layer in backward: repeat the forward's rewrite
            return self._replay(i, args, kwargs, hidden)
        reduced_here: torch.Tensor | None = None
        if i in rt.decoder and call.layout is not None:
            cur = call.seg_kwargs if call.seg_kwargs is not None else kwargs
            call.point = {"layer": i, "hidden": hidden, "position_embeddings": cur["position_embeddings"]}
            grad = torch.is_grad_enabled()
            with torch.no_grad():  # scoring and selection: no autograd graph (the kept rows are gathered below)
                res = run_point(rt.decoder[i], call.layout, hidden, call.spans, self._signal, rt.timer, layer=i)
            if grad and res.changed:
                if res.merged:
                    raise LayoutError(f"{rt.decoder[i][0].name} merges token values inside the LLM, which vtoken "
                                      "does not differentiate; run it under torch.no_grad()")
                res = dataclasses.replace(res, hidden=gather_rows(hidden, res.src, fill=0))
            call.point = None
            call.layout = res.layout
            if res.changed:
                pos = gather_rows(call.pos, res.src, dim=-1)
                if res.pos_shift is not None:
                    pos = pos - res.pos_shift
                prev = call.segments[-1] if call.segments else None
                new_rope = res.pos_shift is not None or (prev is not None and prev.new_rope)
                if new_rope:
                    pe = self.rotary(res.hidden, pos)
                else:
                    pe = tuple(gather_rows(t, res.src, dim=self.pos_emb_seq_dim) for t in cur["position_embeddings"])
                mask = self.names.causal_mask(
                    self.text_config(), res.hidden, res.layout.valid, self.names.cache(kwargs, "layer"),
                    position_ids=pos if pos.dim() == 2 else None, layer_idx=i,
                )
                shift = _add(prev.dec_shift if prev is not None else None, res.dec_shift)
                call.segments.append(Segment(i, res.layout, shift, new_rope))
                call.pos = pos
                seg = {"attention_mask": mask, "position_embeddings": pe}
                layer_pos = cur.get("position_ids")  # what the layers receive (text positions for M-RoPE models)
                if layer_pos is not None:
                    b = res.hidden.shape[0]
                    layer_pos = gather_rows(layer_pos.expand(*layer_pos.shape[:-2], b, layer_pos.shape[-1]),
                                            res.src, dim=-1)
                    seg["position_ids"] = layer_pos - res.pos_shift if res.pos_shift is not None else layer_pos
                call.seg_kwargs = seg
                hidden = res.hidden
                reduced_here = res.src
        if torch.is_grad_enabled() and (reduced_here is not None or call.seg_kwargs is not None):
            call.replay[i] = (reduced_here, call.seg_kwargs)  # what a recomputation must repeat
        if call.seg_kwargs is not None:
            kwargs = dict(kwargs, **call.seg_kwargs)
        if i in self._signal_layers():
            call.captures.setdefault(i, {}).update(
                layout=call.layout, position_embeddings=kwargs.get("position_embeddings"),
            )
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _replay(self, i: int, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> Any:
        """Layer i's rewrite from the forward, applied to the recomputation's (identical) inputs."""
        if i not in self.call.replay:
            return None
        src, seg = self.call.replay[i]
        if src is not None:
            hidden = gather_rows(hidden, src, fill=0)
        if seg is not None:
            kwargs = dict(kwargs, **seg)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    def _layer_decode(self, i: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self.call
        st = call.decode
        seg = next((s for s in st.segments if s.layer == i and i > 0), None)
        if seg is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            b = hidden.shape[0]
            pos = call.orig_pos if seg.dec_shift is None else _shift(call.orig_pos, seg.dec_shift)
            mask = self.names.causal_mask(
                self.text_config(), hidden, self._decode_mask2d(seg, b, hidden.device),
                self.names.cache(kwargs, "layer"), position_ids=pos if pos.dim() == 2 else None, layer_idx=i,
            )
            call.seg_kwargs = {"attention_mask": mask}
            layer_pos = kwargs.get("position_ids")
            if layer_pos is not None and seg.dec_shift is not None:
                call.seg_kwargs["position_ids"] = _shift(layer_pos, seg.dec_shift)
            if seg.new_rope:
                call.seg_kwargs["position_embeddings"] = self.rotary(hidden, pos)
        if call.seg_kwargs is None:
            return None
        return args, dict(kwargs, **call.seg_kwargs)

    # --- signals -----------------------------------------------------------------------------------
    def _signal_layers(self) -> set[int]:
        """LLM layers whose q/k are captured (their attention is read after they ran)."""
        return {r.layer for r in self.runtime.signals if r.kind in ("llm_attention", "llm_modality_mass")}

    def _ttv_hook(self, variant: str):
        """Token transition variation of one sub-block (TransPrune Eq. 1-2), accumulated per column.

        T_in is the sub-block's (normalised) input, T_out its output before the residual:
        TTV = |T_out| / |T_in| * softmax_rows(1 - cos(T_out, T_in)), the softmax over each sample's
        real rows. variant "signed" follows the official code; "abs" the paper's 1 - |cos|.
        """

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            call = self.call
            if call.mode != "prefill" or call.layout is None or call.done:
                return  # done: a gradient-checkpointing recomputation in backward, after the forward
            t_in = args[0] if args else kwargs["hidden_states"]
            t_out = output[0] if isinstance(output, tuple) else output
            # a selection signal, not part of the model's function: no autograd graph (which would
            # also make a checkpoint's recomputation save fewer tensors than the forward did)
            t_in, t_out = t_in.detach().float(), t_out.detach().float()
            mag = t_out.norm(dim=-1) / t_in.norm(dim=-1).clamp_min(1e-12)
            cos = torch.nn.functional.cosine_similarity(t_out, t_in, dim=-1)
            direction = 1 - (cos.abs() if variant == "abs" else cos)
            lay = call.layout
            valid = self._prompt_rows(lay).to(direction.device)
            ttv = mag * direction.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)
            if call.ttv is None:
                call.ttv = torch.zeros(ttv.shape[0], lay.orig_len + 1, device=ttv.device)
            col = torch.where(valid, lay.index.to(ttv.device), lay.orig_len)
            call.ttv.scatter_add_(1, col, ttv.masked_fill(~valid, 0))

        return hook

    def _proj_hook(self, i: int, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.call.mode == "prefill" and not self.call.done:  # not in a checkpoint recomputation
                self.call.captures.setdefault(i, {})[name] = output

        return hook

    def _signal(self, req: SignalRequest, layout: Layout) -> Signal:
        """The requested signal for the tokens of `layout`, computed on demand."""
        if req.kind == "llm_attention":
            return Signal(self._llm_attention(req, layout), "rows")
        if req.kind == "llm_attention_pre":
            return Signal(self._llm_attention_pre(req, layout), "rows")
        if req.kind == "llm_modality_mass":
            return Signal(self._modality_mass(req, layout), "rows")
        if req.kind == "ttv":
            if self.call.ttv is None:
                raise SignalError("no TTV was accumulated before this point (check the accumulation layers)")
            col = torch.where(layout.valid, layout.index, layout.orig_len).to(self.call.ttv.device)
            return Signal(self.call.ttv.gather(1, col), "rows")
        if req.kind.startswith("vision_") or req.kind == "encoder_groups":
            return Signal(self.vision_signal(req), "raster")
        raise SignalError(f"the {self.family} adapter does not provide signal {req.kind!r}")

    def vision_signal(self, req: SignalRequest) -> torch.Tensor:
        """(n_img, N0, ...) per image of this prefill, in raster order; subclasses provide it."""
        raise SignalError(f"the {self.family} adapter does not provide signal {req.kind!r}")

    def projector(self):
        """Callable mapping vision features into the LLM embedding space, if the family has one."""
        return None

    def _side_projector(self) -> Any:
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

    def _prompt_rows(self, layout: Layout) -> torch.Tensor:
        """(B, L) real rows that belong to the prompt (see `Patch.prompt`): only these shape signals."""
        end = self.runtime.prompt_end if self.runtime.prompt_end is not None else self.call.prompt_end
        if end is None:
            return layout.valid
        if isinstance(end, list) and len(end) not in (1, layout.shape[0]):
            raise LayoutError(
                f"p.prompt was given {len(end)} prompt lengths but this call has a batch of {layout.shape[0]}; pass "
                "one length per sample (with beam search or num_return_sequences, one per expanded row) or one int"
            )
        end_t = torch.as_tensor(end, device=layout.valid.device).expand(layout.shape[0])
        return layout.valid & (layout.index < end_t[:, None])

    def _modality_mass(self, req: SignalRequest, layout: Layout) -> torch.Tensor:
        """Per sample, broadcast over its rows: the share of attention that instruction rows put on
        visual keys (query "t2v") or visual rows put on instruction keys ("v2t") at layer `req.layer`
        (head mean; ToDRE Eq. 8). Each query row's attention sums to 1, so a share is a mean."""
        b, length = layout.shape
        device = layout.valid.device
        rows = torch.arange(length, device=device)
        is_img = layout.image >= 0
        last_img = torch.where(is_img, rows, -1).amax(1)
        is_instr = self._prompt_rows(layout) & (rows[None] > last_img[:, None])
        if req.query == "t2v":
            recv, keys = self._llm_attention(SignalRequest("llm_attention", req.layer, "instruction"), layout), is_img
        elif req.query == "v2t":
            recv, keys = self._llm_attention(SignalRequest("llm_attention", req.layer, "visual"), layout), is_instr
        else:
            raise SignalError(f"llm_modality_mass takes query 't2v' or 'v2t', got {req.query!r}")
        mass = (recv * keys.to(recv.device)).sum(1)
        return mass[:, None].expand(b, length)

    def _llm_attention(self, req: SignalRequest, layout: Layout) -> torch.Tensor:
        """Attention each row receives at LLM layer `req.layer` (which already ran in this forward),
        from that layer's captured q_proj / k_proj outputs."""
        cap = self.call.captures.get(req.layer, {})
        if "q_proj" not in cap or "k_proj" not in cap:
            raise SignalError(f"attention of LLM layer {req.layer} was not captured in this forward")
        if cap.get("layout") is not layout:
            raise SignalError(
                f"LLM layer {req.layer}'s attention was computed on another token layout than the one "
                "being reduced (another reducer acted in between); put the reducers at the same layer"
            )
        attn = self.layers[req.layer].self_attn
        q_all = cap["q_proj"]

        def q_of(idx: torch.Tensor) -> torch.Tensor:
            return gather_rows(q_all, idx)

        return self._received(attn, req.query, layout, q_of, cap["k_proj"], cap["position_embeddings"])

    def _llm_attention_pre(self, req: SignalRequest, layout: Layout) -> torch.Tensor:
        """Attention each row would receive in LLM layer `req.layer`, computed from the hidden states
        entering it (its input norm, q/k projections and RoPE), before the layer runs. Queries are
        projected for the query rows only."""
        point = self.call.point
        if point is None or point["layer"] != req.layer:
            raise SignalError(f"{req} can only be read by a reducer acting before LLM layer {req.layer}")
        layer = self.layers[req.layer]
        normed = layer.input_layernorm(point["hidden"])
        attn = layer.self_attn
        b, length, d = normed.shape

        def q_of(idx: torch.Tensor) -> torch.Tensor:
            self.call.signal_flops += 2 * idx.numel() * d * attn.q_proj.out_features
            return attn.q_proj(gather_rows(normed, idx))

        self.call.signal_flops += 2 * b * length * d * attn.k_proj.out_features
        return self._received(attn, req.query, layout, q_of, attn.k_proj(normed), point["position_embeddings"])

    def _query_rows(self, query: str, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) rows of the query tokens (and which are real), Q bounded on the host (no sync).

        "last": the last prompt row; "instruction": the prompt rows after the last image; "visual":
        the visual rows.
        """
        b, length = layout.shape
        device = layout.valid.device
        rows = torch.arange(length, device=device)
        valid = self._prompt_rows(layout)
        if query == "last":
            last = torch.where(valid, rows, -1).amax(1)
            return last.clamp_min(0)[:, None], (last >= 0)[:, None]
        is_img = layout.image >= 0
        if query == "instruction":
            last_img = torch.where(is_img, rows, -1).amax(1)
            qmask = valid & (rows[None] > last_img[:, None])
            bound = max(self.call.text_after, default=0)
        elif query == "visual":
            qmask = valid & is_img
            bound = max(self._per_sample(layout.counts, b), default=0)
        else:
            raise SignalError(f"unknown query {query!r} for LLM attention (use 'last', 'instruction', 'visual')")
        bound = max(1, min(bound, length))
        idx = (~qmask).int().argsort(dim=1, stable=True)[:, :bound]  # query rows first, in order
        return idx, qmask.gather(1, idx)

    def _received(self, attn: nn.Module, query: str, layout: Layout, q_of: Any, k_proj: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, L) attention probability each row receives from the query rows, mean over heads and
        query rows: softmax(q k^T * scaling) under the causal + padding mask, as eager attention
        computes it, with the layer's q/k norms and RoPE, for the query rows only."""
        b, length = layout.shape
        hd = attn.head_dim
        idx, qvalid = self._query_rows(query, layout)
        idx, qvalid = idx.to(k_proj.device), qvalid.to(k_proj.device)
        q = q_of(idx).view(b, idx.shape[1], -1, hd)
        k = k_proj.view(b, length, -1, hd)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        rows = torch.arange(length, device=k.device)
        valid = self._prompt_rows(layout).to(k.device)
        cos, sin = position_embeddings
        rope = self._rope_fn(attn)
        k = rope(k.transpose(1, 2), cos, sin)
        cq = gather_rows(cos, idx, dim=self.pos_emb_seq_dim)
        sq = gather_rows(sin, idx, dim=self.pos_emb_seq_dim)
        qh = rope(q.transpose(1, 2), cq, sq)  # (B, H, Q, hd)
        groups = qh.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        logits = torch.matmul(qh.float(), k.float().transpose(-1, -2)) * attn.scaling  # (B, H, Q, L)
        allowed = valid[:, None, None, :] & (rows[None, None, None, :] <= idx[:, None, :, None])
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)  # (B, Q, L)
        self.call.signal_flops += 4 * b * qh.shape[1] * qh.shape[2] * length * hd
        w = qvalid.float()
        return (probs * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)

    def _rope_fn(self, attn: nn.Module):
        """Apply the layer's rotary embedding to one (B, H, L, hd) tensor."""
        apply = self.names.rope
        return lambda x, cos, sin: apply(x, x, cos, sin)[0]

    # --- statistics --------------------------------------------------------------------------------
    def _prefill_stats(self, lm_rows: int) -> None:
        st = self.runtime.stats
        call = self.call
        if self.vision_record is not None:
            vis, proj = self.vision_flops()
            st.add_flops("vision", vis)
            st.add_flops("projector", proj)
            self.vision_record = None
        if call.mode != "prefill":
            return
        spec = self.llm_spec()
        b = len(call.lengths)
        # Layout lengths are host-side numbers: no device read.
        per_layer = self._layer_layouts_lengths()
        st.tokens_per_layer = [lens for lens, _ in per_layer]
        st.visual_per_layer = [vis for _, vis in per_layer]
        st.visual_tokens = list(per_layer[0][1]) if per_layer else [0] * b
        st.pinned_tokens = self._per_sample([sp.pinned for sp in call.spans], b)
        if call.vtu is not None:  # attention over the virtual (unmerged) rows, the rest on unique rows
            virtual = call.lengths
            st.add_flops("llm_prefill", sum(layer_flops(spec, n, queries=v) for lens, _ in per_layer
                                            for n, v in zip(lens, virtual)))
        else:
            st.add_flops("llm_prefill", sum(layer_flops(spec, n) for lens, _ in per_layer for n in lens))
        st.add_flops("lm_head", linear_flops(lm_rows, [(spec.d, self.text_config().vocab_size)]))
        st.add_flops("reducer", call.signal_flops)

    def _layer_layouts_lengths(self) -> list[tuple[list[int], list[int]]]:
        call = self.call
        n_layers = len(self.layers)
        b = len(call.lengths)
        counts0 = [s.n for s in call.spans]
        cur = (list(call.lengths), self._per_sample(counts0, b))
        segs = {s.layer: s.layout for s in call.segments}
        out = []
        for i in range(n_layers):
            if i in segs:
                lay = segs[i]
                cur = (list(lay.lengths), self._per_sample(lay.counts, b))
            out.append(cur)
        return out

    def _per_sample(self, counts: list[int], b: int) -> list[int]:
        per = [0] * b
        for s, n in zip(self.call.spans, counts):
            per[s.sample] += n
        return per

    def _decode_stats(self, rows: int) -> None:
        call = self.call
        st = call.decode
        spec = self.llm_spec()
        n_layers = len(self.layers)
        segs = {s.layer: s.layout for s in st.segments}
        base = None
        ctx: list[list[int]] = []
        for i in range(n_layers):
            base = segs.get(i, base)
            lens = base.lengths if base is not None else st.lengths
            ctx.append([n + call.n_new for n in lens])
        total = sum(decode_step_flops(spec, [ctx[i][s] for i in range(n_layers)]) for s in range(st.batch))
        stats = self.runtime.stats
        stats.add_flops("decode", total)
        stats.add_flops("lm_head", linear_flops(st.batch * rows, [(spec.d, self.text_config().vocab_size)]))


def _shift(pos: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Subtract a per-sample shift (B,) from position ids (..., B, L)."""
    return pos - shift.to(pos.device)[:, None]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b
