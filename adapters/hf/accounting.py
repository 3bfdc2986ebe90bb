"""FLOPs and token counts of a patched transformers VLM's calls, from host counts only (no device read)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtoken.flops import decode_step_flops, layer_flops, linear_flops
from vtoken.ledger import layer_counts, per_sample

if TYPE_CHECKING:
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter


def record_prefill(adapter: HFVisionLanguageAdapter, lm_rows: int) -> None:
    """Write a finished call's statistics: vision FLOPs of the tower run it used, and for a reducing
    prefill the tokens per layer and the LLM, lm_head and reducer side-path FLOPs."""
    st = adapter.runtime.stats
    call = adapter.call
    if adapter.vision_record is not None:
        vis, proj = adapter.vision_flops()
        st.add_flops("vision", vis)
        st.add_flops("projector", proj)
        adapter.vision_record = None
    if call.mode != "prefill":
        return
    spec = adapter.llm_spec()
    b = len(call.lengths)
    per_layer = layer_counts({s.layer: s.layout for s in call.segments}, len(adapter.layers), call.lengths, call.spans)
    st.tokens_per_layer = [lens for lens, _ in per_layer]
    st.visual_per_layer = [vis for _, vis in per_layer]
    st.visual_tokens = list(per_layer[0][1]) if per_layer else [0] * b
    st.pinned_tokens = per_sample(call.spans, [sp.pinned for sp in call.spans], b)
    if call.vtu is not None:  # attention over the virtual (unmerged) rows, the rest on unique rows
        st.add_flops("llm_prefill", sum(layer_flops(spec, n, queries=v) for lens, _ in per_layer
                                        for n, v in zip(lens, call.lengths)))
    else:
        st.add_flops("llm_prefill", sum(layer_flops(spec, n) for lens, _ in per_layer for n in lens))
    st.add_flops("lm_head", linear_flops(lm_rows, [(spec.d, adapter.text_config().vocab_size)]))
    st.add_flops("reducer", call.signal_flops)


def record_decode(adapter: HFVisionLanguageAdapter, rows: int) -> None:
    """A cached step's FLOPs: each layer attends over the rows its segment kept plus the new tokens."""
    call = adapter.call
    st = call.decode
    spec = adapter.llm_spec()
    n_layers = len(adapter.layers)
    starts = {s.layer: s.layout for s in st.segments}
    base = None
    ctx: list[list[int]] = []
    for i in range(n_layers):
        base = starts.get(i, base)
        lens = base.lengths if base is not None else st.lengths
        ctx.append([n + call.n_new for n in lens])
    stats = adapter.runtime.stats
    total = sum(decode_step_flops(spec, [ctx[i][s] for i in range(n_layers)]) for s in range(st.batch))
    stats.add_flops("decode", total)
    stats.add_flops("lm_head", linear_flops(st.batch * rows, [(spec.d, adapter.text_config().vocab_size)]))
