"""`Patch.stats`: what the last forward / generate did — tokens, FLOPs by part, reducer time."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Statistics of the last patched call (a forward, or a whole `generate`).

    visual_tokens:    per sample, visual tokens entering the LLM (after boundary reducers), pinned
                      ones included.
    pinned_tokens:    per sample, visual tokens always kept outside the budget (LLaVA-NeXT's row-end
                      newline tokens: `keep=64` on an image with crops delivers 64 + these).
    visual_per_layer: per LLM layer, per sample, visual tokens that layer processes in the prefill.
    tokens_per_layer: per LLM layer, per sample, all tokens (text + visual) in the prefill.
    vision_tokens:    per vision-tower layer, tokens per image (encoder-stage merging shrinks them).
    flops:            FLOPs by part, summed over the batch: "vision", "projector", "llm_prefill",
                      "lm_head", "decode" (all decoded tokens), "reducer", and "total".
    decode_steps:     decoding forwards since the prefill.
    overhead_s:       seconds spent inside reducers (scoring, selection, merging).
    """

    visual_tokens: list[int] = field(default_factory=list)
    pinned_tokens: list[int] = field(default_factory=list)
    visual_per_layer: list[list[int]] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    vision_tokens: list[int] = field(default_factory=list)
    images: int = 0
    flops: dict[str, int] = field(default_factory=dict)
    decode_steps: int = 0
    overhead_s: float = 0.0
    # (kind, record) of static (graph-safe) calls whose counts are computed when the stats are read
    pending: list = field(default_factory=list, repr=False, compare=False)

    def add_flops(self, part: str, value: int) -> None:
        self.flops[part] = self.flops.get(part, 0) + int(value)
        self.flops["total"] = sum(v for k, v in self.flops.items() if k != "total")

    def summary(self) -> str:
        """A short human-readable summary."""
        vis = self.visual_tokens
        lines = [
            f"visual tokens entering the LLM per sample: {vis}"
            + (f" (of which pinned, outside the budget: {self.pinned_tokens})" if any(self.pinned_tokens) else ""),
            "FLOPs: " + ", ".join(f"{k}={v / 1e9:.3f}G" for k, v in self.flops.items()),
            f"reducer overhead: {self.overhead_s * 1e3:.2f} ms; decode steps: {self.decode_steps}",
        ]
        return "\n".join(lines)
