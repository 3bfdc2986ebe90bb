"""Errors raised by vtoken. Every message says what was wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VTokenError(Exception):
    """Base class of every error vtoken raises on purpose."""


class UnknownReducerError(VTokenError, KeyError):
    """A reducer name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(VTokenError, TypeError):
    """A model no adapter knows, or a reducer/stage that the model's adapter cannot run."""


class BudgetError(VTokenError, ValueError):
    """A token budget (`keep`, `r`, ratio ...) that cannot be met."""


class ParameterError(VTokenError, TypeError):
    """A parameter a reducer does not have, or a value it does not accept."""


class AlreadyPatchedError(VTokenError, RuntimeError):
    """The model already carries a vtoken patch."""


class SignalError(VTokenError, RuntimeError):
    """A reducer asked for a signal that was not captured in this forward."""


class LayoutError(VTokenError, RuntimeError):
    """Inputs that the token ledger cannot keep consistent (e.g. images in a continued KV cache)."""


def close_names(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A human-readable 'did you mean' suffix for `name` among `candidates` ('' if nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
