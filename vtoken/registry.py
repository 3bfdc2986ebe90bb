"""Registry of reducers by name: `@register("tome")`, `get("tome")`, `available()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from vtoken.errors import ParameterError, UnknownReducerError, close_names

_REDUCERS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding a reducer under `name` (lower case, unique)."""
    if not isinstance(name, str) or not name or name != name.lower():
        raise ParameterError(f"reducer names are non-empty lower-case strings, got {name!r}")

    def deco(cls: T) -> T:
        if name in _REDUCERS and _REDUCERS[name] is not cls:
            raise ParameterError(
                f"a reducer named {name!r} is already registered ({_REDUCERS[name].__qualname__}); "
                "pick another name"
            )
        cls.name = name
        _REDUCERS[name] = cls
        return cls

    return deco


def get(name: str) -> type:
    """The reducer class registered under `name`."""
    _load_builtin()
    try:
        return _REDUCERS[name]
    except (KeyError, TypeError):
        raise UnknownReducerError(
            f"no reducer named {name!r}.{close_names(str(name), _REDUCERS)} "
            f"Registered: {', '.join(sorted(_REDUCERS))}."
        ) from None


def available() -> list[str]:
    """Names of all registered reducers, sorted."""
    _load_builtin()
    return sorted(_REDUCERS)


def _load_builtin() -> None:
    # The built-in reducers register themselves on import.
    import vtoken.reducers  # noqa: F401
