"""FLOPs and token counts of a patched transformers VLM's calls, from host counts only (no device read).

A static (graph-safe) prefill keeps its per-sample lengths on the device, so its token counts and
LLM FLOPs are recorded as pending and computed when the statistics are read (`resolve`), outside
the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vtoken.flops import decode_step_flops, layer_flops, linear_flops
from vtoken.ledger import host_lengths, layer_counts, per_sample

if TYPE_CHECKING:
    from vtoken.adapters.hf.state import DecodeState
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter


def record_prefill(adapter: HFVisionLanguageAdapter, lm_rows: int) -> None:
    """Write a finished call's statistics: vision FLOPs of the tower run it used, and for a reducing
    prefill the tokens per layer and the LLM, lm_head and reducer side-path FLOPs."""
    st = adapter.runtime.stats
    call = adapter.call
    if adapter.vision_record is not None:
        if call.lengths is None and call.mode == "prefill":  # static: the tower's grids may be on the device
            st.pending.append(("vision", adapter.vision_record))
        else:
            _write_vision(adapter)
        adapter.vision_record = None
    if call.mode != "prefill":
        return
    if call.lengths is None:
        st.pending.append(("prefill", _Prefill(list(call.segments), call.len_t, call.spans,
                                               call.vtu is not None, lm_rows, call.signal_flops)))
        return
    _write_prefill(adapter, _Prefill(list(call.segments), call.lengths, call.spans, call.vtu is not None,
                                     lm_rows, call.signal_flops))


@dataclass
class _Prefill:
    """What a prefill's statistics need (lengths: host list, or (B,) device tensor if static)."""

    segments: list
    lengths: list[int] | torch.Tensor
    spans: list
    vtu: bool
    lm_rows: int
    signal_flops: int


def resolve(adapter: HFVisionLanguageAdapter) -> None:
    """Compute the statistics recorded as pending by static prefills and their cached steps."""
    st = adapter.runtime.stats
    pending, st.pending = st.pending, []
    for kind, rec in pending:
        if kind == "vision":  # the tower run's record, as vision_flops reads it
            adapter.vision_record, current = rec, adapter.vision_record
            _write_vision(adapter)
            adapter.vision_record = current
        elif kind == "prefill":
            if isinstance(rec.lengths, torch.Tensor):
                rec.lengths = rec.lengths.tolist()
            _write_prefill(adapter, rec)
        else:
            _write_decode(adapter, *rec)


def _write_vision(adapter: HFVisionLanguageAdapter) -> None:
    vis, proj = adapter.vision_flops()
    adapter.runtime.stats.add_flops("vision", vis)
    adapter.runtime.stats.add_flops("projector", proj)


def _write_prefill(adapter: HFVisionLanguageAdapter, rec: _Prefill) -> None:
    st = adapter.runtime.stats
    spec = adapter.llm_spec()
    b = len(rec.lengths)
    per_layer = layer_counts({s.layer: s.layout for s in rec.segments}, len(adapter.layers), rec.lengths, rec.spans)
    st.tokens_per_layer = [lens for lens, _ in per_layer]
    st.visual_per_layer = [vis for _, vis in per_layer]
    st.visual_tokens = list(per_layer[0][1]) if per_layer else [0] * b
    st.pinned_tokens = per_sample(rec.spans, [sp.pinned for sp in rec.spans], b)
    if rec.vtu:  # attention over the virtual (unmerged) rows, the rest on unique rows
        st.add_flops("llm_prefill", sum(layer_flops(spec, n, queries=v) for lens, _ in per_layer
                                        for n, v in zip(lens, rec.lengths)))
    else:
        st.add_flops("llm_prefill", sum(layer_flops(spec, n) for lens, _ in per_layer for n in lens))
    st.add_flops("lm_head", linear_flops(rec.lm_rows, [(spec.d, adapter.text_config().vocab_size)]))
    st.add_flops("reducer", rec.signal_flops)


def record_decode(adapter: HFVisionLanguageAdapter, rows: int) -> None:
    """A cached step's FLOPs: each layer attends over the rows its segment kept plus the new tokens."""
    call = adapter.call
    if isinstance(call.decode.lengths, torch.Tensor):  # static prefill: lengths on the device, counted when read
        adapter.runtime.stats.pending.append(("decode", (call.decode, call.n_new, rows)))
        return
    _write_decode(adapter, call.decode, call.n_new, rows)


def _write_decode(adapter: HFVisionLanguageAdapter, st: DecodeState, n_new: int, rows: int) -> None:
    spec = adapter.llm_spec()
    n_layers = len(adapter.layers)
    starts = {s.layer: s.layout for s in st.segments}
    base = None
    ctx: list[list[int]] = []
    for i in range(n_layers):
        base = starts.get(i, base)
        lens = host_lengths(base) if base is not None else st.lengths
        if isinstance(lens, torch.Tensor):
            lens = lens.tolist()
        ctx.append([n + n_new for n in lens])
    stats = adapter.runtime.stats
    total = sum(decode_step_flops(spec, [ctx[i][s] for i in range(n_layers)]) for s in range(st.batch))
    stats.add_flops("decode", total)
    stats.add_flops("lm_head", linear_flops(st.batch * rows, [(spec.d, adapter.text_config().vocab_size)]))
