"""One top-level forward of a patched transformers VLM: how it begins (prefill, decode or off) and ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtoken.adapters.hf import accounting, compat, decode
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
    cache_len = compat.seq_length(cache) if cache is not None else 0
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
    x = inputs.get("input_ids")
    x = inputs.get("inputs_embeds") if x is None else x
    if x is None:
        return None
    b, length = x.shape[:2]
    stats.visual_tokens = [0] * b
    am = inputs.get("attention_mask")
    if am is not None and am.dim() != 2:
        raise LayoutError(
            "vtoken needs a 2-D padding attention_mask (batch, length); a prepared 4-D mask cannot "
            "be re-sliced for the reduced sequence (generate() prepares one for a static cache: "
            "cache_implementation='static' is not supported yet, use the default dynamic cache)"
        )
    # graph-safe: the images' structure from shapes; no tensor op here (the boundary locates them), so
    # a graph break inside transformers' forward leaves no vtoken graph before it
    plan = adapter.static_batch(inputs, b, rt.static_layout is True) if rt.static_wanted() else None
    if plan is not None:
        call.static = plan
        images = plan.images()
        call.lengths = None
    else:
        mask = adapter.image_token_mask(inputs)
        if mask is None:
            return None
        valid = am.bool() if am is not None else torch.ones(b, length, dtype=torch.bool, device=mask.device)
        img = mask.cpu()
        valid_cpu = valid.cpu()
        images = adapter.split_runs(inputs, placeholder_runs(img & valid_cpu))
        if not images:
            return None
        call.valid = valid
        call.lengths = valid_cpu.sum(1).tolist()
        call.right_align = bool(valid_cpu[:, -1].all())
    call.mode = "prefill"
    adapter.prefill_starts(inputs)
    call.images = images
    call.inputs = inputs
    if inputs.get("labels") is not None:
        call.labels = inputs.pop("labels")
        call.loss_kwargs = {k: inputs[k] for k in ("num_items_in_batch",) if k in inputs}
    ltk = inputs.get("logits_to_keep", 0)
    if not (isinstance(ltk, int) and ltk in (0, 1)):
        call.logits_to_keep = ltk
        inputs["logits_to_keep"] = 0
    inputs["return_dict"] = True
    return (), inputs


def expand_logits(adapter: HFVisionLanguageAdapter, module: nn.Module, inputs: tuple, output: Any) -> Any:
    """The output embedding's forward hook: a prefill's logits back to the original length (here, not
    in the top-level hook, so that they belong to the graph that computes them when compiled)."""
    call = adapter.call
    if call.mode != "prefill" or call.done or not isinstance(output, torch.Tensor) or output.dim() != 3:
        return None
    call.lm_rows, output = _original_length(call, output)
    return output


def _original_length(call: Call, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(rows the output embedding computed, the logits re-expanded to the original length)."""
    rows = logits.shape[0] * logits.shape[1]
    if call.segments and logits.shape[1] == call.layout.shape[1]:
        logits = expand_to_original(logits, call.layout)
    return rows, logits


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
        lm_rows = call.lm_rows
        if lm_rows is None:  # no output-embedding hook fired (a model without get_output_embeddings)
            lm_rows, output.logits = _original_length(call, output.logits)
        logits = output.logits
        cache = adapter.names.output_cache_of(output)
        if cache is not None:
            exact = adapter.vtu is not None and adapter.vtu.mode == "exact"
            segments = call.segments
            if adapter.vtu is not None and not exact:  # expand: the cache holds the virtual (original) rows
                segments = [s for s in segments if s.layer != 0]
            state = DecodeState(segments, final.orig_len, final.shape[0],
                                call.len_t if call.lengths is None else list(call.lengths),
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
