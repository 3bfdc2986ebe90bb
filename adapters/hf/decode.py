"""Cached steps after a reducing prefill: make them equal a full recompute of the original sequence.

The cache holds fewer prompt rows than the original positions it stands for. A cached call is
rewritten in three places: its top-level inputs (only truly new tokens are fed, numbered after the
original prompt: `cached_inputs`), the language model's 2-D mask (the rows the prefill kept plus the
new tokens: `lm_kwargs`), and every decoder layer where the prefill changed the rows (`layer_kwargs`:
that segment's mask, shifted position ids, recomputed RoPE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vtoken.adapters.hf import compat
from vtoken.adapters.hf.state import Call, DecodeState, Segment, shift
from vtoken.errors import LayoutError

if TYPE_CHECKING:
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter

NEW_IMAGES = ("vtoken cannot add images to a KV cache that already holds tokens (multi-turn with new "
              "images); start from an empty cache, or unpatch for this call")


def cached_inputs(adapter: HFVisionLanguageAdapter, inputs: dict[str, Any], state: DecodeState, cache_len: int) -> None:
    """Rewrite a cached call's inputs over a reduced cache, in place.

    A caller that continues from the cache with the whole conversation so far (generate(prev +
    follow-up, cache), as multi-turn chat does) passes tokens the cache already holds: with a 2-D mask
    over the whole sequence, only its last `mask length - seen` tokens are new, and only those are fed.
    New tokens are numbered after the original prompt (not after the reduced cache's length).
    """
    appended = cache_len - state.cached_prompt_rows  # tokens added to the cache since the prefill
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
    if key == "input_ids" and adapter.has_new_images(inputs):
        mask = adapter.image_token_mask(inputs)
        if mask is not None and bool(mask.any()):
            raise LayoutError(NEW_IMAGES)
    for name in compat.VISION_INPUTS:  # the images of the cached prompt: already encoded
        inputs.pop(name, None)
    if inputs.get("attention_mask") is None and inputs.get("position_ids") is None and state.first is not None:
        inputs["attention_mask"] = torch.ones(b, seen + q, dtype=torch.long, device=x.device)
    if inputs.get("position_ids") is None:
        steps = appended + torch.arange(q, device=x.device)
        inputs["position_ids"] = state.next_pos.to(x.device)[..., None] + steps


def lm_kwargs(call: Call, cache: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The language model's kwargs for a cached step: the prefill's first-layer rows + the new tokens."""
    st = call.decode
    embeds = kwargs.get("inputs_embeds")
    if cache is None or embeds is None:
        raise LayoutError("decoding a reduced prefill needs the KV cache and inputs_embeds")
    b, q = embeds.shape[:2]
    if b != st.batch:
        raise LayoutError(
            f"the KV cache was reduced for a batch of {st.batch} but this step has {b} rows; "
            "vtoken supports greedy/sampling/beam search, not batch-reshaping decoders"
        )
    call.n_new = compat.seq_length(cache, 0) - st.cached_prompt_rows + q
    am = kwargs.get("attention_mask")
    if am is not None:
        if am.dim() != 2 or am.shape[1] != st.orig_len + call.n_new:
            raise LayoutError(
                f"decoding step got an attention_mask of shape {tuple(am.shape)}; expected a 2-D mask "
                f"over the original prompt and new tokens (length {st.orig_len + call.n_new})"
            )
        call.tail = am[:, st.orig_len:].bool()
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = (torch.arange(q, device=embeds.device) + st.orig_len + call.n_new - q)[None].expand(b, q)
    call.orig_pos = pos
    seg0 = st.first
    if seg0 is None:
        return kwargs
    kwargs = dict(kwargs, attention_mask=mask2d(call, seg0, b, embeds.device))
    if seg0.dec_shift is not None:
        kwargs["position_ids"] = shift(pos, seg0.dec_shift)
    return kwargs


def layer_kwargs(adapter: HFVisionLanguageAdapter, i: int, hidden: torch.Tensor,
                 kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Decoder layer i's kwargs for a cached step (None: unchanged). From a segment start on, the
    segment's mask (and shifted positions / RoPE) hold for every later layer."""
    call = adapter.call
    seg = call.decode.at(i)
    if seg is not None:
        b = hidden.shape[0]
        pos = call.orig_pos if seg.dec_shift is None else shift(call.orig_pos, seg.dec_shift)
        mask = adapter.names.causal_mask(
            adapter.text_config(), hidden, mask2d(call, seg, b, hidden.device),
            adapter.names.cache(kwargs, "layer"), position_ids=pos if pos.dim() == 2 else None, layer_idx=i,
        )
        call.seg_kwargs = {"attention_mask": mask}
        layer_pos = kwargs.get("position_ids")
        if layer_pos is not None and seg.dec_shift is not None:
            call.seg_kwargs["position_ids"] = shift(layer_pos, seg.dec_shift)
        if seg.new_rope:
            call.seg_kwargs["position_embeddings"] = adapter.rotary(hidden, pos)
    if call.seg_kwargs is None:
        return None
    return dict(kwargs, **call.seg_kwargs)


def mask2d(call: Call, seg: Segment, b: int, device: torch.device) -> torch.Tensor:
    """(B, rows + new) padding mask of a segment's prefill rows followed by the new tokens."""
    return torch.cat([seg.layout.valid, tail(call, b, call.n_new, device)], dim=1)


def tail(call: Call, b: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, n) padding mask of the last n tokens appended after the prefill."""
    if call.tail is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    return call.tail[:, -n:].to(device)

