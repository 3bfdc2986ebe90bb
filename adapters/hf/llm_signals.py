"""LLM-side signals of a patched transformers VLM: what is captured in the decoder layers, and how a
reducer's request is answered from it (the formulas live in `vtoken.signals`).

- `llm_attention`: attention each row receives in a layer that already ran, from its captured
  q_proj / k_proj outputs (forward hooks), with the layer's q/k norms and RoPE, on a side path (the
  model keeps SDPA / FlashAttention);
- `llm_attention_pre`: the same for the layer about to run, from the hidden states entering it;
- `llm_modality_mass`: ToDRE's cross-modal attention shares (Eq. 8);
- `llm_pagerank`: AIM's PageRank importance over every prompt row's attention;
- `ttv`: TransPrune's token transition variation, accumulated per original column by forward hooks
  on the attention and MLP sub-blocks of the accumulation layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtoken.errors import LayoutError, SignalError
from vtoken.ledger import Layout, gather_rows
from vtoken.reducers.base import Signal, SignalRequest
from vtoken.signals.attention import instruction_rows, query_rows, received_from_queries, received_from_queries_flops
from vtoken.signals.modality import modality_mass
from vtoken.signals.pagerank import pagerank_flops, pagerank_importance
from vtoken.signals.transition import token_transition

if TYPE_CHECKING:
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter

ATTENTION_KINDS = ("llm_attention", "llm_modality_mass", "llm_pagerank")  # from q/k captured as the layer ran


class LLMSignals:
    """Installs the LLM captures a runtime's requests need and answers those requests."""

    def __init__(self, adapter: HFVisionLanguageAdapter) -> None:
        self.adapter = adapter
        requests = adapter.runtime.signals
        self.captured_layers = {r.layer for r in requests if r.kind in ATTENTION_KINDS}
        self.ttv_requests = [r for r in requests if r.kind == "ttv"]
        if len({r.query for r in self.ttv_requests}) > 1:
            raise SignalError("reducers disagree on the TTV direction variant; use one per patch")

    def first_layer(self) -> int:
        """The first LLM layer whose pre-hook this module needs (len(layers) if none)."""
        layers = [*self.captured_layers, *(r.layer for r in self.ttv_requests)]
        return min(layers, default=len(self.adapter.layers))

    def install(self, handles: list[Any]) -> None:
        layers = self.adapter.layers
        for i in sorted(self.captured_layers):
            attn = layers[i].self_attn
            for name in ("q_proj", "k_proj"):
                handles.append(getattr(attn, name).register_forward_hook(self._capture(i, name)))
        if self.ttv_requests:
            end = max(self.adapter.runtime.decoder, default=0)
            variant = self.ttv_requests[0].query
            for i in range(min(r.layer for r in self.ttv_requests), end):
                for block in (layers[i].self_attn, layers[i].mlp):
                    handles.append(block.register_forward_hook(self._accumulate_ttv(variant), with_kwargs=True))

    @property
    def call(self) -> Any:
        return self.adapter.call

    # --- captures ---------------------------------------------------------------------------------
    def _capture(self, i: int, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.call.mode == "prefill" and not self.call.done:  # not in a checkpoint recomputation
                self.call.captures.setdefault(i, {})[name] = output

        return hook

    def _accumulate_ttv(self, variant: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            call = self.call
            if call.mode != "prefill" or call.layout is None or call.done:
                return  # done: a gradient-checkpointing recomputation in backward, after the forward
            t_in = args[0] if args else kwargs["hidden_states"]
            t_out = output[0] if isinstance(output, tuple) else output
            lay = call.layout
            rows = self.prompt_rows(lay)
            ttv = token_transition(t_in, t_out, rows, variant)
            if call.ttv is None:
                call.ttv = torch.zeros(ttv.shape[0], lay.orig_len + 1, device=ttv.device)
            col = torch.where(rows.to(ttv.device), lay.index.to(ttv.device), lay.orig_len)
            call.ttv.scatter_add_(1, col, ttv)

        return hook

    def note_layer_input(self, i: int, layout: Layout, kwargs: dict[str, Any]) -> None:
        """Layer i is about to run on `layout` with these kwargs (their position embeddings are the
        ones its captured q / k will be rotated with)."""
        if i in self.captured_layers:
            pe = kwargs.get("position_embeddings")
            self.call.captures.setdefault(i, {}).update(layout=layout, position_embeddings=pe)

    # --- answering requests -------------------------------------------------------------------------
    def signal(self, req: SignalRequest, layout: Layout) -> Signal:
        if req.kind == "llm_attention":
            return Signal(self._attention(req, layout), "rows")
        if req.kind == "llm_attention_pre":
            return Signal(self._attention_pre(req, layout), "rows")
        if req.kind == "llm_modality_mass":
            return Signal(self._modality_mass(req, layout), "rows")
        if req.kind == "llm_pagerank":
            return Signal(self._attention(req, layout), "rows")
        if req.kind == "ttv":
            if self.call.ttv is None:
                raise SignalError("no TTV was accumulated before this point (check the accumulation layers)")
            col = torch.where(layout.valid, layout.index, layout.orig_len).to(self.call.ttv.device)
            return Signal(self.call.ttv.gather(1, col), "rows")
        raise SignalError(f"the {self.adapter.family} adapter does not provide signal {req.kind!r}")

    def prompt_rows(self, layout: Layout) -> torch.Tensor:
        """(B, L) real rows that belong to the prompt (see `Patch.prompt`): only these shape signals."""
        end = self.adapter.runtime.prompt_end
        if end is None:
            end = self.call.prompt_end
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
        """ToDRE Eq. 8 per sample, broadcast over its rows (query "t2v" or "v2t")."""
        prompt = self.prompt_rows(layout)
        is_img = layout.image >= 0
        if req.query == "t2v":
            received = self._attention(SignalRequest("llm_attention", req.layer, "instruction"), layout)
            keys = is_img
        elif req.query == "v2t":
            received = self._attention(SignalRequest("llm_attention", req.layer, "visual"), layout)
            keys = instruction_rows(prompt, layout.image)
        else:
            raise SignalError(f"llm_modality_mass takes query 't2v' or 'v2t', got {req.query!r}")
        return modality_mass(received, keys)[:, None].expand(layout.shape)

    def _attention(self, req: SignalRequest, layout: Layout) -> torch.Tensor:
        """Attention each row receives at LLM layer `req.layer` (which already ran in this forward)."""
        cap = self.call.captures.get(req.layer, {})
        if "q_proj" not in cap or "k_proj" not in cap:
            raise SignalError(f"attention of LLM layer {req.layer} was not captured in this forward")
        if cap.get("layout") is not layout:
            raise SignalError(
                f"LLM layer {req.layer}'s attention was computed on another token layout than the one "
                "being reduced (another reducer acted in between); put the reducers at the same layer"
            )
        q_all = cap["q_proj"]
        if req.kind == "llm_pagerank":
            return self._pagerank(req, layout, q_all, cap["k_proj"], cap["position_embeddings"])
        return self._received(req.layer, req.query, layout, lambda idx: gather_rows(q_all, idx),
                              cap["k_proj"], cap["position_embeddings"])

    def _attention_pre(self, req: SignalRequest, layout: Layout) -> torch.Tensor:
        """Attention each row would receive in LLM layer `req.layer`, from the hidden states entering
        it (its input norm, q/k projections and RoPE), before the layer runs. Queries are projected
        for the query rows only."""
        point = self.call.point
        if point is None or point["layer"] != req.layer:
            raise SignalError(f"{req} can only be read by a reducer acting before LLM layer {req.layer}")
        layer = self.adapter.layers[req.layer]
        normed = layer.input_layernorm(point["hidden"])
        attn = layer.self_attn
        b, length, d = normed.shape

        def q_of(idx: torch.Tensor) -> torch.Tensor:
            self.call.signal_flops += 2 * idx.numel() * d * attn.q_proj.out_features
            return attn.q_proj(gather_rows(normed, idx))

        self.call.signal_flops += 2 * b * length * d * attn.k_proj.out_features
        return self._received(req.layer, req.query, layout, q_of, attn.k_proj(normed), point["position_embeddings"])

    def _query_bound(self, query: str, layout: Layout) -> int:
        """Host bound on the query rows per sample (no device read): from the call's host counts."""
        if query == "instruction":
            return max(self.call.text_after, default=0)
        if query == "visual":
            return max(self.adapter.per_sample(layout.counts, layout.shape[0]), default=0)
        return 1

    def _pagerank(self, req: SignalRequest, layout: Layout, q_proj: torch.Tensor, k_proj: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, L) AIM's PageRank importance at layer `req.layer` over the prompt rows (every row a query)."""
        tau, steps = req.params
        q, k = self._roped(req.layer, q_proj, k_proj, position_embeddings)
        self.call.signal_flops += pagerank_flops(q, int(steps))
        prompt = self.prompt_rows(layout)
        return pagerank_importance(q, k, prompt, self.adapter.layers[req.layer].self_attn.scaling, tau, int(steps))

    def _roped(self, layer: int, q_proj: torch.Tensor, k_proj: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, L, hd) queries and (B, Hkv, L, hd) keys of every row with the layer's q/k norms and RoPE."""
        attn = self.adapter.layers[layer].self_attn
        b, length = k_proj.shape[:2]
        hd = attn.head_dim
        q, k = q_proj.view(b, length, -1, hd), k_proj.view(b, length, -1, hd)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = position_embeddings
        return self.adapter.names.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    def _received(self, layer: int, query: str, layout: Layout, q_of: Any, k_proj: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, L) attention each row receives from the `query` rows (see `received_from_queries`)."""
        attn = self.adapter.layers[layer].self_attn
        b, length = layout.shape
        hd = attn.head_dim
        prompt = self.prompt_rows(layout)
        try:
            idx, qvalid = query_rows(query, prompt, layout.image, self._query_bound(query, layout))
        except ValueError as e:
            raise SignalError(str(e)) from None
        idx, qvalid = idx.to(k_proj.device), qvalid.to(k_proj.device)
        q = q_of(idx).view(b, idx.shape[1], -1, hd)
        k = k_proj.view(b, length, -1, hd)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = position_embeddings
        rope = self.adapter.names.rope
        k = rope(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[0]
        cq = gather_rows(cos, idx, dim=self.adapter.pos_emb_seq_dim)
        sq = gather_rows(sin, idx, dim=self.adapter.pos_emb_seq_dim)
        qt = q.transpose(1, 2)
        qh = rope(qt, qt, cq, sq)[0]  # (B, H, Q, hd)
        self.call.signal_flops += received_from_queries_flops(qh, length)
        return received_from_queries(qh, k, idx, qvalid, prompt.to(k.device), attn.scaling)
