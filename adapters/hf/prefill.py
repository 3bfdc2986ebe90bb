"""The prefill's rewriting: the boundary stage before the language model and the decoder stage at
its layers. Each reduction point runs `vtoken.stage.run_point` on the call's current layout; the
kept rows then go on with their original position ids (or renumbered ones), the layer's RoPE
gathered or recomputed, and a causal mask built by transformers for the reduced rows.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from vtoken.adapters.hf.state import Call, Segment, add_shifts
from vtoken.adapters.vtu import virtual_map
from vtoken.errors import LayoutError
from vtoken.ledger import Layout, gather_rows
from vtoken.stage import run_point

if TYPE_CHECKING:
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter


def boundary(adapter: HFVisionLanguageAdapter, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The language model's pre-hook in a prefill: lay out the call's images (the ledger's first
    layout) and run the boundary reducers on `inputs_embeds`; the language model then builds its
    own mask and rotary embeddings for the reduced rows."""
    call = adapter.call
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        raise LayoutError("vtoken expects the language model to be called with inputs_embeds")
    b, length, _ = embeds.shape
    kwargs, taken = adapter.take_carried(kwargs)  # Qwen3-VL: deepstack features now follow the ledger
    if call.static is not None:  # graph-safe: the images' columns and the padding stay on the device
        mask = adapter.image_token_mask(call.inputs)
        am = call.inputs.get("attention_mask")
        call.valid = am.bool() if am is not None else torch.ones(b, length, dtype=torch.bool, device=embeds.device)
        call.starts = call.static.locate(mask & call.valid)
        adapter.static_asserts(call.inputs)
        call.right_align = call.valid[:, -1].all()
    call.len_t = call.valid.sum(1)
    if call.labels is not None:  # scoring: the first scored label starts the continuation, which must not
        scored = call.labels != -100  # steer the reduction
        col = torch.arange(scored.shape[1], device=scored.device).expand_as(scored)
        call.prompt_end = torch.where(scored, col, scored.shape[1]).amin(1)
    adapter.prepare_vision(embeds)
    call.spans = adapter.image_spans()
    if call.lengths is None:  # static: a host bound (the sample's columns less its image tokens)
        call.text_after = [length - n for n in adapter.per_sample([sp.n for sp in call.spans], b)]
    else:
        ends = [call.lengths[i] if not call.right_align else length for i in range(b)]
        last_end = [-1] * b
        for sp in call.spans:
            last_end[sp.sample] = max(last_end[sp.sample], sp.start + sp.n)
        call.text_after = [ends[i] - last_end[i] if last_end[i] >= 0 else call.lengths[i] for i in range(b)]
    layout = Layout.initial(call.valid, call.spans, call.lengths, call.right_align, starts=call.starts)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(length, device=embeds.device)[None]
    pos = pos.expand(*pos.shape[:-2], b, length)
    call.layout, call.pos = layout, pos
    call.next_pos = torch.where(call.valid, pos, -1).amax(-1) + 1  # per axis of multi-axis ids
    rt = adapter.runtime
    unchanged = (args, kwargs) if taken else None
    if not rt.boundary:
        return unchanged
    res = run_point(rt.boundary, layout, embeds, call.spans, adapter.signal, rt.timer,
                    project=adapter.side_projector(), carried=call.carried)
    res.layout.entry = [c - s.pinned for c, s in zip(res.layout.counts, call.spans)]
    call.layout = res.layout
    call.carried = res.carried
    if not res.changed:
        return unchanged
    if call.carried_rows is not None:
        call.carried_rows = gather_rows(call.carried_rows, res.src, fill=False)
    if adapter.vtu is not None:
        call.vtu = virtual_map(adapter, layout, res.src, res.layout, pos)
    pos = gather_rows(pos, res.src, dim=-1)
    if res.pos_shift is not None:
        pos = pos - res.pos_shift
    call.pos = pos
    call.segments.append(Segment(0, res.layout, res.dec_shift, False))
    kwargs = dict(kwargs, inputs_embeds=res.hidden, attention_mask=res.layout.valid, position_ids=pos)
    return args, kwargs


def decoder_layer(adapter: HFVisionLanguageAdapter, i: int, args: tuple, kwargs: dict[str, Any]) -> Any:
    """Decoder layer i of a prefill: run its reducers (decoder stage), then give the layer the rows,
    mask, position ids and RoPE of the current segment."""
    call = adapter.call
    rt = adapter.runtime
    hidden = args[0] if args else kwargs["hidden_states"]
    if call.done:  # gradient checkpointing re-runs the layer in backward: repeat the forward's rewrite
        return _replay(adapter.call, i, args, kwargs, hidden)
    reduced_here: torch.Tensor | None = None
    if i in rt.decoder and call.layout is not None:
        cur = call.seg_kwargs if call.seg_kwargs is not None else kwargs
        call.point = {"layer": i, "hidden": hidden, "position_embeddings": cur["position_embeddings"]}
        grad = torch.is_grad_enabled()
        carried = call.carried if i < call.carried_layers else None  # still added after layer >= i
        with torch.no_grad():  # scoring and selection: no autograd graph (the kept rows are gathered below)
            res = run_point(rt.decoder[i], call.layout, hidden, call.spans, adapter.signal, rt.timer, layer=i,
                            carried=carried)
        if grad and res.changed:
            if res.merged:
                raise LayoutError(f"{rt.decoder[i][0].name} merges token values inside the LLM, which vtoken "
                                  "does not differentiate; run it under torch.no_grad()")
            res = dataclasses.replace(res, hidden=gather_rows(hidden, res.src, fill=0))
        call.point = None
        call.layout = res.layout
        if carried is not None:
            call.carried = res.carried
            if res.changed:
                call.carried_rows = gather_rows(call.carried_rows, res.src, fill=False)
        if res.changed:
            pos = gather_rows(call.pos, res.src, dim=-1)
            if res.pos_shift is not None:
                pos = pos - res.pos_shift
            prev = call.segments[-1] if call.segments else None
            new_rope = res.pos_shift is not None or (prev is not None and prev.new_rope)
            if new_rope:
                pe = adapter.rotary(res.hidden, pos)
            else:
                pe = tuple(gather_rows(t, res.src, dim=adapter.pos_emb_seq_dim) for t in cur["position_embeddings"])
            mask = adapter.names.causal_mask(
                adapter.text_config(), res.hidden, res.layout.valid, adapter.names.cache(kwargs, "layer"),
                position_ids=pos if pos.dim() == 2 else None, layer_idx=i,
            )
            shift = add_shifts(prev.dec_shift if prev is not None else None, res.dec_shift)
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
    adapter.llm_signals.note_layer_input(i, call.layout, kwargs)
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs

def _replay(call: Call, i: int, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> Any:
    """Layer i's rewrite from the forward, applied to the recomputation's (identical) inputs."""
    if i not in call.replay:
        return None
    src, seg = call.replay[i]
    if src is not None:
        hidden = gather_rows(hidden, src, fill=0)
    if seg is not None:
        kwargs = dict(kwargs, **seg)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)
