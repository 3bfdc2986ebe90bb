"""One top-level forward of a patched transformers VLM: how it begins (prefill, decode or off) and ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtoken.adapters.hf import accounting, decode
from vtoken.adapters.hf.state import Call, DecodeState, attach, attached
from vtoken.errors import LayoutError
from vtoken.ledger import expand_to_original

if TYPE_CHECKING:
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter


def begin(adapter: HFVisionLanguageAdapter, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The top-level pre-hook: a new `Call`; decide prefill (images in the prompt) / decode (a reduced
    cache) / off, take `labels` and `logits_to_keep` (recomputed on the re-expanded logits)."""
    adapter.call = call = Call()
    rt = adapter.runtime
    inputs = adapter.bind(args, kwargs)
    rd = inputs.get("return_dict")
    call.return_dict = bool(getattr(module.config, "return_dict", True) if rd is None else rd)
    cache = adapter.names.cache(inputs)
    cache_len = cache.get_seq_length() if cache is not None else 0
    if cache_len > 0:
        state = attached(cache)
        if state is None:
            if adapter.has_new_images(inputs):
                raise LayoutError(decode.NEW_IMAGES)
            rt.new_stats()
            return None
        call.mode = "decode"
        call.decode = state
        rt.stats.decode_steps += 1
        inputs["return_dict"] = True
        decode.cached_inputs(adapter, inputs, state, cache_len)
        return (), inputs
    stats = rt.new_stats()
    mask = adapter.image_token_mask(inputs)
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
    images = adapter.split_runs(inputs, placeholder_runs(img & valid_cpu))
    if not images:
        return None
    call.mode = "prefill"
    adapter.prefill_starts(inputs)
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


def placeholder_runs(img: torch.Tensor) -> list[tuple[int, int, int]]:
    """(sample, start, length) of each run of image tokens in a host (B, L) mask, in order."""
    b = img.shape[0]
    flat = torch.cat([torch.zeros(b, 1, dtype=torch.bool), img, torch.zeros(b, 1, dtype=torch.bool)], 1)
    edges = flat[:, 1:].int() - flat[:, :-1].int()
    starts = (edges == 1).nonzero().tolist()
    ends = (edges == -1).nonzero().tolist()
    return [(s[0], s[1], e[1] - s[1]) for s, e in zip(starts, ends)]


def end(adapter: HFVisionLanguageAdapter, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """The top-level hook: logits back to the original length, the decode state onto the cache,
    the loss from the caller's labels, statistics."""
    call = adapter.call
    rt = adapter.runtime
    if call.mode == "prefill":
        final = call.layout
        rt.last_layout, rt.last_spans = final, call.spans
        logits = output.logits
        lm_rows = logits.shape[0] * logits.shape[1]
        if call.segments and logits.shape[1] == final.shape[1]:
            logits = expand_to_original(logits, final)
        cache = adapter.names.output_cache_of(output)
        if cache is not None:
            exact = adapter.vtu is not None and adapter.vtu.mode == "exact"
            segments = call.segments
            if adapter.vtu is not None and not exact:  # expand: the cache holds the virtual (original) rows
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
                logits=logits, labels=call.labels, vocab_size=adapter.text_config().vocab_size,
                **call.loss_kwargs,
            )
        accounting.record_prefill(adapter, lm_rows)
        call.done = True  # what runs again now (checkpoint recomputation in backward) must not re-reduce
    elif call.mode == "decode":
        accounting.record_decode(adapter, output.logits.shape[1])
    elif call.mode == "off" and adapter.vision_record is not None:
        accounting.record_prefill(adapter, 0)
    if not call.return_dict:
        return output.to_tuple()
    return output
