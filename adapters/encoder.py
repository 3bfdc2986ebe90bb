"""Encoder-stage merging inside a pre-norm ViT block, with hooks only.

Every supported block computes  x = x + attn(norm1(x));  x = x + mlp(norm2(x))  (HF CLIP, timm,
open_clip; LayerScale / drop-path are per-token). The papers merge between the two residual
additions. Hooks cannot reach the local variable holding the residual, so the merge is applied in
three exact steps:

1. a pre-hook on `norm2` computes the layer's merge plan (from the keys captured in this layer's
   attention) and feeds norm2 the merged states — so norm2 and the MLP run on the merged tokens;
2. a forward hook on `mlp` gives every source token its group's MLP output;
3. a forward hook on the block merges the block output with the same plan. Since the MLP output is
   constant within a group, merge(x + mlp_out) = merge(x) + mlp(norm2(merge(x))): exactly the
   merged-then-MLP result of the papers.

A reducer whose metric is the layer output (`metric_kind == "output"`, PiToMe's HF preset, as the
authors' LLaVA patch) is planned and merged in step 3 alone, after the MLP. Proportional attention
(log size added to every key's logits) and the padding of ragged batches (DyMU) go in through the
attention mask each block already accepts, so the attention kernel (SDPA) is kept. Nothing is
patched on a class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vtoken.ops.merge import MergePlan, expand, merge, merge_sizes, prefix_mask
from vtoken.reducers.base import EncoderReducer


@dataclass
class BlockSpec:
    """How to reach the parts of one ViT block.

    keys:  (module, kind) whose forward output holds the keys — kind "linear": (B, T, H*hd) from a
           k projection; "heads": (B, H, T, hd) (timm's k_norm); "mha": the block's
           nn.MultiheadAttention, whose packed in-projection gives the keys from its input.
    bias:  how the block takes an additive attention bias: "hf" (positional attention_mask of an HF
           encoder layer), "timm" (attn_mask keyword), "mha" (key_padding_mask of the MHA module).
    """

    block: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    keys: tuple[nn.Module, str]
    heads: int
    bias: str


@dataclass
class EncoderState:
    """Per tower run: tokens per image, sizes, and where each original token went."""

    counts: list[int]
    size: torch.Tensor  # (B, T) tokens each current token stands for
    group: torch.Tensor  # (B, T0) current slot of each original token
    metric: torch.Tensor | None = None
    plan: MergePlan | None = None
    merged: bool = False
    entering: list[list[int]] = field(default_factory=list)  # tokens per image entering each block

    @property
    def valid(self) -> torch.Tensor:
        return prefix_mask(self.counts, self.size.shape[1], self.size.device)


class ViTMerger:
    """Applies an encoder-stage reducer (`EncoderReducer`) to the blocks of one tower (see module docstring)."""

    def __init__(self, reducer: EncoderReducer, blocks: list[BlockSpec], merge_layers: int | None = None) -> None:
        self.configured = reducer
        self.reducer = reducer  # for this run: `configured`, re-solved for the run's token count
        self.blocks = blocks
        self.merge_layers = len(blocks) if merge_layers is None else merge_layers
        self.state: EncoderState | None = None
        self._sized: dict[int, EncoderReducer] = {}

    # --- lifecycle ---------------------------------------------------------------------------------
    def begin(self, batch: int, tokens: int, device: torch.device) -> None:
        """Start a tower run over `batch` images of `tokens` tokens (prefix included). A token count
        other than the configured one (timm `dynamic_img_size`) re-solves the reducer's schedule."""
        patches = tokens - self.configured.prefix_tokens
        if patches not in self._sized:
            self._sized[patches] = self.configured.resized(patches)
        self.reducer = self._sized[patches]
        self.state = EncoderState(
            counts=[tokens] * batch,
            size=torch.ones(batch, tokens, device=device),
            group=torch.arange(tokens, device=device).expand(batch, tokens).contiguous(),
        )

    def install(self, handles: list[Any]) -> None:
        for i, spec in enumerate(self.blocks):
            handles.append(spec.block.register_forward_pre_hook(self._bias_hook(spec), with_kwargs=True))
            if spec.bias == "mha":
                handles.append(spec.keys[0].register_forward_pre_hook(self._mha_pre(spec), with_kwargs=True))
            if i >= self.merge_layers:
                continue
            source = self.configured.metric_kind
            module, kind = spec.keys
            if source == "keys":
                if kind == "mha":
                    handles.append(module.register_forward_pre_hook(self._mha_keys(spec), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(self._key_hook(kind, spec.heads)))
            if source != "output":
                handles.append(spec.norm2.register_forward_pre_hook(self._norm2_pre(i, source == "states")))
                handles.append(spec.mlp.register_forward_hook(self._mlp_post))
            # prepend: run before any output-capturing hook transformers may have installed earlier
            handles.append(spec.block.register_forward_hook(self._block_post(i, source == "output"), prepend=True))

    # --- hooks -------------------------------------------------------------------------------------
    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, T) additive key bias: log(size) (proportional attention) and -inf-like on padding."""
        st = self.state
        if st is None:
            return None
        ragged = len(set(st.counts)) > 1
        if not ((st.merged and self.reducer.proportional) or ragged):
            return None
        work = torch.promote_types(dtype, torch.float32)  # float64 towers: a float64 bias (float64 min)
        bias = torch.zeros(st.size.shape, device=st.size.device, dtype=work)
        if self.reducer.proportional:
            bias = st.size.to(work).clamp_min(1).log()
        bias = bias.masked_fill(~st.valid, torch.finfo(dtype).min)
        return bias.to(dtype)

    def _bias_hook(self, spec: BlockSpec) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            if spec.bias == "mha":
                return None  # the MHA pre-hook adds it
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if self.state is not None:
                self.state.entering.append(list(self.state.counts))
            bias = self._bias(x.dtype)
            if bias is None:
                return None
            mask = bias[:, None, None, :]
            if spec.bias == "hf":
                if len(args) > 1:
                    return (args[0], _combine(args[1], mask), *args[2:]), kwargs
                return args, dict(kwargs, attention_mask=_combine(kwargs.get("attention_mask"), mask))
            return args, dict(kwargs, attn_mask=_combine(kwargs.get("attn_mask"), mask))

        return hook

    def _mha_pre(self, spec: BlockSpec) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any]) -> Any:
            q = args[0] if args else kwargs["query"]
            if self.state is not None:
                self.state.entering.append(list(self.state.counts))
            bias = self._bias(q.dtype)
            if bias is None:
                return None
            if not module.batch_first:
                raise NotImplementedError("vtoken merges in batch_first towers only")
            old = kwargs.get("key_padding_mask")
            if old is not None:
                bias = _combine(old, bias)
            return args, dict(kwargs, key_padding_mask=bias)

        return hook

    def _key_hook(self, kind: str, heads: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if self.state is None:
                return
            if kind == "linear":
                b, t, _ = out.shape
                self.state.metric = out.view(b, t, heads, -1).mean(2)
            else:  # (B, H, T, hd)
                self.state.metric = out.mean(1)

        return hook

    def _mha_keys(self, spec: BlockSpec) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.state is None:
                return
            x = args[1] if len(args) > 1 else kwargs.get("key", args[0] if args else kwargs["query"])
            d = module.embed_dim
            w = module.in_proj_weight[d:2 * d]
            bias = module.in_proj_bias[d:2 * d] if module.in_proj_bias is not None else None
            k = nn.functional.linear(x, w, bias)
            b, t, _ = k.shape
            self.state.metric = k.view(b, t, module.num_heads, -1).mean(2)

        return hook

    def _norm2_pre(self, layer: int, states: bool) -> Callable:
        """states: the metric is norm2's input (the tokens after the attention residual)."""

        def hook(module: nn.Module, args: tuple) -> Any:
            st = self.state
            if st is None or (st.metric is None and not states):
                return None
            plan = self.reducer.plan(layer, args[0] if states else st.metric, st.counts)
            st.metric = None
            st.plan = plan
            if plan is None:
                return None
            return (merge(args[0], plan, st.size, self.reducer.weighted), *args[1:])

        return hook

    def _mlp_post(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> Any:
        st = self.state
        if st is None or st.plan is None:
            return None
        return expand(out, st.plan)

    def _block_post(self, layer: int, output: bool) -> Callable:
        """output: plan this layer's merge here, from the block output (merge after the MLP)."""

        def hook(module: nn.Module, inputs: tuple, out: Any) -> Any:
            st = self.state
            if st is None:
                return None
            x = out[0] if isinstance(out, tuple) else out
            if output:
                st.plan = self.reducer.plan(layer, x, st.counts)
            if st.plan is None:
                return None
            plan, st.plan = st.plan, None
            merged = merge(x, plan, st.size, self.reducer.weighted)
            st.size = merge_sizes(st.size, plan)
            st.group = plan.dest.gather(1, st.group)
            st.counts = list(plan.counts)
            st.merged = True
            return (merged, *out[1:]) if isinstance(out, tuple) else merged

        return hook


def _combine(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    if old is None:
        return new
    if old.dtype == torch.bool:
        old = torch.zeros(old.shape, dtype=new.dtype, device=new.device).masked_fill(~old, torch.finfo(new.dtype).min)
    return old + new
