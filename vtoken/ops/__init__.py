"""Pure tensor operations used by reducers (batched, vectorised, documented with their equations)."""

from vtoken.ops.select import grid_factor, topk_mask

__all__ = ["grid_factor", "topk_mask"]
