"""Graph-safe (static) prefill: a batch's image structure from tensor shapes alone.

A compiled or CUDA-graph-captured prefill cannot read the image mask or the padding back to the
host. When every sample of a batch holds the same number of images and every image the same number
of tokens, that structure follows from shapes (pixel_values, the config), and the only
data-dependent quantities — where each image starts, how long each sample is, the padding side —
stay on the device. The layout then pads every reduction to a fixed row count (`ledger.compact`),
statistics are computed when read (`accounting.resolve`), and a batch that breaks the promise
fails a device-side assertion (on the CPU at once; on a GPU as a device assert) instead of being
laid out wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StaticBatch:
    """`count` images, `per_sample` in each sample, each `tokens` placeholders (one contiguous run)."""

    count: int
    per_sample: int
    tokens: int

    def images(self) -> list[tuple[int, int, int]]:
        """(sample, start, tokens) per image, in order; starts are on the device (`locate`): -1 here."""
        return [(i // self.per_sample, -1, self.tokens) for i in range(self.count)]

    def locate(self, mask: torch.Tensor) -> torch.Tensor:
        """(count,) first column of each image from the (B, L) placeholder mask, without a host read;
        asserts on the device that each sample has `per_sample` runs of `tokens` placeholders."""
        m, n = self.per_sample, self.tokens
        if m * n > mask.shape[1]:
            raise ValueError(f"{m} images of {n} tokens do not fit a sequence of {mask.shape[1]}")
        cols = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, : m * n]  # image columns, in order
        first, last = cols[:, ::n], cols[:, n - 1 :: n]
        ok = (mask.sum(1) == m * n).all() & (last - first == n - 1).all()
        torch._assert_async(ok, f"vtoken static (graph-safe) prefill: every sample must hold {m} image(s) of "
                            f"{n} placeholder tokens, in whole runs; this batch does not. Batch samples with "
                            "equal image counts, or run it eagerly with vtoken.patched(model).static_layout "
                            "= False")
        return first.reshape(-1)
