"""Analytic FLOPs of the parts of a VLM, from the token counts the ledger actually produced.

Conventions (ALGORITHMS.md, "Accounting"): a multiply-add is 2 FLOPs; per transformer layer with n
query tokens attending to c keys (c = n in a prefill), width d, attention width a = heads * head_dim,
key/value width a_kv = kv_heads * head_dim, MLP width m:

    projections  2 n d (a + 2 a_kv) + 2 n a d        (q, k, v, o)
    attention    4 n c a                             (QK^T and AV; causal masks counted in full)
    MLP          2 n d m * mats                      (mats = 3 for a gated/SwiGLU MLP, 2 for GELU)

plus the ViT patch embedding (2 N C p^2 d), the projector (2 n d_in d_out per linear) and the LM head
(2 rows d V). Norms, activations and softmax are not counted (they are not matmuls), matching what
`torch.utils.flop_counter.FlopCounterMode` counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerSpec:
    """Shapes of one transformer stack (vision tower or LLM)."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    mlp_mats: int
    layers: int

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def layer_flops(spec: TransformerSpec, n: int, context: int | None = None, queries: int | None = None) -> int:
    """FLOPs of one layer for `n` tokens, whose attention has `queries` query rows (default n; DyMU's
    virtual unmerging attends over more rows than it projects) attending to `context` keys
    (default: the queries)."""
    q = n if queries is None else queries
    c = q if context is None else context
    a, akv, d = spec.attn_width, spec.kv_width, spec.d
    proj = 2 * n * d * (a + 2 * akv) + 2 * n * a * d
    attn = 4 * q * c * a
    mlp = 2 * n * d * spec.mlp * spec.mlp_mats
    return proj + attn + mlp


def stack_flops(spec: TransformerSpec, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of a prefill through the stack, `tokens_per_layer[i]` tokens entering layer i."""
    return sum(layer_flops(spec, n) for n in tokens_per_layer)


def decode_step_flops(spec: TransformerSpec, context_per_layer: Sequence[int]) -> int:
    """FLOPs of decoding one token, attending to `context_per_layer[i]` keys (itself included) at layer i."""
    return sum(layer_flops(spec, 1, c) for c in context_per_layer)


def linear_flops(rows: int, dims: Sequence[tuple[int, int]]) -> int:
    """FLOPs of a chain of linear layers (d_in, d_out) applied to `rows` tokens (projector, LM head)."""
    return sum(2 * rows * i * o for i, o in dims)


def patch_embed_flops(patches: int, channels: int, patch: int, d: int) -> int:
    """FLOPs of a ViT's convolutional patch embedding over `patches` patches."""
    return 2 * patches * channels * patch * patch * d
