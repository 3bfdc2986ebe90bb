"""Token budgets: `keep=int` (tokens per image) or `keep=float` (fraction of the image's tokens)."""

from __future__ import annotations

import math

from vtoken.errors import BudgetError

Keep = int | float


def check_keep(keep: Keep | None, what: str = "keep") -> None:
    """Validate a budget without knowing the image size (called when a reducer is built)."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise BudgetError(f"{what} must be an int (tokens per image) or a float in (0, 1], got {keep!r}")
    if isinstance(keep, float):
        if not (0.0 < keep <= 1.0) or math.isnan(keep):
            raise BudgetError(
                f"{what}={keep} is a fraction and must lie in (0, 1]; pass an int for a token count"
            )
    elif keep <= 0:
        raise BudgetError(f"{what}={keep}: at least one visual token per image must be kept")


def resolve_keep(keep: Keep, n: int, what: str = "keep") -> int:
    """Tokens to keep out of `n` for one image: an int as is, a float as round(keep * n) (at least 1)."""
    check_keep(keep, what)
    if isinstance(keep, float):
        return max(1, min(n, round(keep * n)))
    if keep > n:
        raise BudgetError(
            f"{what}={keep} but the image has only {n} visual tokens at this stage; "
            f"use {what} <= {n}, or a fraction in (0, 1]"
        )
    return keep
