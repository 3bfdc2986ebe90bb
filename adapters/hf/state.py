"""Per-call and per-cache state of a patched transformers VLM (no state lives anywhere else).

`Call` is rebuilt by the top-level pre-hook at every forward, so an exception leaves nothing stale.
`DecodeState` is what a reducing prefill leaves for later cached steps. It travels with the KV cache
(`attach` / `attached`): the cache is the object users keep, reorder (beam search) and copy —
`copy.deepcopy(prompt_cache)` is transformers' documented way to reuse a prompt — and a side table
keyed by the cache would lose the state on such a copy, which would then decode silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtoken.ledger import ImageSpan, Layout

_CACHE_ATTR = "_vtoken_decode"


@dataclass
class Segment:
    """LLM layers from `layer` on run on `layout` (until the next segment)."""

    layer: int
    layout: Layout
    dec_shift: torch.Tensor | None  # (B,) subtract from decoded tokens' position ids (renumbering)
    new_rope: bool  # position embeddings must be recomputed from this layer on (renumbered here or before)


@dataclass
class DecodeState:
    """Left by a reducing prefill for the cached steps that follow it."""

    segments: list[Segment]
    orig_len: int
    batch: int
    lengths: list[int] | torch.Tensor  # real prompt tokens per sample before any reduction ((B,) device if static)
    next_pos: torch.Tensor  # (B,) or (axes, B): first position id after the prompt (original numbering)
    vtu: Any = None  # VirtualMap of the prefill (exact virtual token unmerging)

    @property
    def first(self) -> Segment | None:
        """The boundary segment (layer 0), if the prefill reduced before the LLM."""
        return self.segments[0] if self.segments and self.segments[0].layer == 0 else None

    @property
    def cached_prompt_rows(self) -> int:
        """Rows the cache holds for the prompt in its first layers."""
        seg = self.first
        return seg.layout.shape[1] if seg is not None else self.orig_len

    def at(self, layer: int) -> Segment | None:
        """The segment that starts at decoder layer `layer` (> 0), if any."""
        return next((s for s in self.segments if s.layer == layer and layer > 0), None)


def attach(cache: Any, state: DecodeState) -> None:
    """Tag a KV cache with the prefill's decode state (see the module docstring for why on the cache)."""
    setattr(cache, _CACHE_ATTR, state)


def attached(cache: Any) -> DecodeState | None:
    """The decode state a reducing prefill left on `cache`, or None."""
    return getattr(cache, _CACHE_ATTR, None)


@dataclass
class Call:
    """State of one top-level forward."""

    mode: str = "off"  # "off" | "prefill" | "decode"
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (sample, start, tokens) per image
    span_info: list[Any] = field(default_factory=list)  # adapter's per-image notes (Qwen: grid, video frame)
    inputs: dict[str, Any] = field(default_factory=dict)
    spans: list[ImageSpan] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B, L) bool, device
    lengths: list[int] | None = field(default_factory=list)  # host; None in a static (graph-safe) prefill
    right_align: bool | torch.Tensor = True  # a 0-d device bool in a static prefill
    starts: torch.Tensor | None = None  # static prefill: (n_img,) first column of each image, device
    static: Any = None  # static prefill: its StaticBatch (hf/static.py)
    len_t: torch.Tensor | None = None  # (B,) real prompt tokens per sample, device (set at the boundary)
    lm_rows: int | None = None  # rows the output embedding computed logits for (before re-expansion)
    layout: Layout | None = None
    pos: torch.Tensor | None = None  # position ids of the current layout's rows
    segments: list[Segment] = field(default_factory=list)
    seg_kwargs: dict[str, Any] | None = None
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
    # features added to visual rows after the first `carried_layers` LLM layers (Qwen3-VL's deepstack):
    # (B, L, layers, d) beside the current layout's rows, and (B, L) which rows take them
    carried: torch.Tensor | None = None
    carried_rows: torch.Tensor | None = None
    carried_layers: int = 0
    carried_added: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> what it added (backward)


def shift(pos: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """Subtract a per-sample shift (B,) from position ids (..., B, L)."""
    return pos - by.to(pos.device)[:, None]


def add_shifts(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two optional per-sample shifts."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b
