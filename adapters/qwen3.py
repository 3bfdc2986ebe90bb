"""Adapter for Qwen3-VL (`Qwen3VLForConditionalGeneration`), transformers 5.x.

Qwen3-VL is Qwen2-VL's anatomy (packed tower without windows, 2x2 merger, interleaved M-RoPE ids from
`get_rope_index`) plus **deepstack** (Meng et al., "DeepStack", 2024, as Qwen3-VL uses it): the tower
also projects the hidden states of the blocks in `vision_config.deepstack_visual_indexes`, each through
its own merger, and the language model adds feature list entry i to the visual rows of the hidden
states after decoder layer i (`Qwen3VLTextModel._deepstack_process`, at a (B, L) `visual_pos_masks`).

A reduction shortens the rows that mask indexes, so vtoken takes both out of the language model's
kwargs at the boundary (`take_carried`) and carries the features beside the rows through the token
ledger (`run_point(carried=...)`): a kept token keeps its own features; a merged one (pool,
VisionZip's contextual tokens) gets the same weighted combination of its inputs' features as its
hidden state (`Selection.mix`). Forward hooks on decoder layers 0..k-1 then add them at the rows that
hold visual tokens, with the same arithmetic as transformers (so patching with no reduction is
bit-identical). Kept tokens keep their original 3-D position ids, as for Qwen2-VL.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtoken.adapter import register_adapter
from vtoken.adapters.hf.static import StaticBatch
from vtoken.adapters.qwen import QwenVLAdapter
from vtoken.errors import ParameterError
from vtoken.flops import linear_flops

CLASS = "Qwen3VLForConditionalGeneration"


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    supports = "Qwen3VLForConditionalGeneration (Qwen3-VL, deepstack)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == CLASS and hasattr(model, "model")

    def deepstack_layers(self) -> int:
        """LLM layers after which deepstack features are added (one per deepstack vision layer)."""
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or [])

    def install_hooks(self) -> None:
        super().install_hooks()
        for i in range(min(self.deepstack_layers(), len(self.layers))):
            self.handles.append(self.layers[i].register_forward_hook(self._deepstack_hook(i)))

    # --- deepstack: carried beside the ledger's rows -------------------------------------------------
    def take_carried(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        rows, feats = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if rows is None or not feats:
            return kwargs, False
        embeds = kwargs["inputs_embeds"]
        rows = rows.to(embeds.device)
        stack = torch.stack([f.to(embeds.device) for f in feats], 1)  # (N_vis, k, d) in mask order
        carried = stack.new_zeros(*rows.shape, *stack.shape[1:])
        call = self.call
        call.carried = carried.masked_scatter(rows[..., None, None], stack)  # no host read (graph-safe)
        call.carried_rows, call.carried_layers = rows, len(feats)
        return dict(kwargs, visual_pos_masks=None, deepstack_visual_embeds=None), True

    def _deepstack_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            call = self.call
            if call.mode != "prefill" or i >= call.carried_layers:
                return None
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            if call.done:  # a checkpoint's recomputation in backward: add what the forward added
                rows, add = call.carried_added[i]
            else:
                rows, add = call.carried_rows, call.carried[:, :, i].to(hidden.device, hidden.dtype)
                if torch.is_grad_enabled():
                    call.carried_added[i] = (rows, add)
                if i == call.carried_layers - 1 and not torch.is_grad_enabled():
                    call.carried = None  # no later layer reads them
            new = torch.where(rows[..., None], hidden + add, hidden)  # transformers' `hidden[mask] + embeds`
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        return hook

    # --- anatomy differences from Qwen2-VL ------------------------------------------------------------
    def static_batch(self, inputs: dict[str, Any], batch: int, forced: bool) -> StaticBatch | None:
        if forced or self.runtime.static_grid is not None:
            raise ParameterError("static_layout / static_grid: the graph-safe prefill is not built for "
                                 "qwen3_vl yet (its deepstack features); set static_layout = False and "
                                 "static_grid = None")
        return None

    @staticmethod
    def _merger_norm(merger: nn.Module) -> nn.Module:
        return merger.norm

    @staticmethod
    def _merger_out(merger: nn.Module) -> int:
        return merger.linear_fc2.out_features

    def projector(self):
        merger = self.visual().merger

        def project(x: torch.Tensor) -> torch.Tensor:  # the merger after its per-patch norm
            return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))

        return project

    def _run_flops(self, cap: dict[str, Any]) -> tuple[int, int]:
        """Qwen2-VL's count plus the deepstack mergers (each a norm and two linears per LLM token)."""
        tower, proj = super()._run_flops(cap)
        visual = self.visual()
        for merger in getattr(visual, "deepstack_merger_list", []):
            hid = merger.hidden_size
            tower += sum(linear_flops(h * w, [(hid, hid), (hid, self._merger_out(merger))])
                         for h, w in cap.get("grids") or [])
        return tower, proj
