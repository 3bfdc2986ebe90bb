"""The adapter contract and registry. Adapters (in `vtoken.adapters`) know one model family's anatomy;
the core only talks to them through this interface and never imports one by name."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from vtoken.errors import ParameterError, UnsupportedModelError

if TYPE_CHECKING:
    from vtoken.reducers.base import ModelInfo
    from vtoken.runtime import Runtime

_ADAPTERS: list[type[Adapter]] = []


class Adapter(ABC):
    """Installs vtoken's hooks on one model instance and removes them again.

    family:          short name shown to users ("llava", "qwen2_vl", ...).
    stages:          the stages this adapter can run.
    default_reducer: what `vtoken.patch(model)` applies for this family.
    """

    family: ClassVar[str] = ""
    stages: ClassVar[frozenset[str]] = frozenset()
    default_reducer: ClassVar[tuple[str, dict[str, Any]]] = ("fastv", {"keep": 0.5})
    supports: ClassVar[str] = ""  # human-readable list of supported classes

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # an adapter first only reads the model (`model_info`); `install` is given the runtime
        self.runtime: Runtime | None = None
        self.handles: list[Any] = []

    @abstractmethod
    def model_info(self) -> ModelInfo:
        """Facts reducers use to resolve per-model defaults (layer counts, feature layer, ...)."""

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True if this adapter handles `model`."""

    def install(self, runtime: Runtime) -> None:
        """Take the patch's runtime, validate its reducers against the model and install the hooks
        (recorded in `self.handles`)."""
        self.runtime = runtime
        self.install_hooks()

    @abstractmethod
    def install_hooks(self) -> None:
        """Install the hooks for `self.runtime` (subclasses)."""

    def declare_static_grid(self, grid: tuple[int, int] | None) -> None:
        """Take a user-declared (rows, cols) per image for static prefills (`Patch.static_grid`); families
        whose static layout follows from shapes alone refuse one."""
        if grid is not None:
            raise ParameterError(f"static_grid is for families whose image grids vary (Qwen2-VL / 2.5-VL); the "
                                 f"{self.family} adapter reads its static layout from tensor shapes: leave it None")

    def resolve_stats(self) -> None:  # noqa: B027 (optional hook with a no-op default)
        """Finish statistics recorded as pending (static prefills count on the device); default: none."""

    def remove(self) -> None:
        """Remove every hook this adapter installed (idempotent)."""
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()

    def describe(self) -> str:
        return f"{self.family} ({type(self.model).__name__})"


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter discoverable by `find_adapter`."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def find_adapter(model: nn.Module) -> type[Adapter]:
    """The adapter class for `model`, or UnsupportedModelError naming what is supported."""
    importlib.import_module("vtoken.adapters")  # plugin package: its modules register themselves
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls
    names = "; ".join(f"{a.family}: {a.supports}" for a in _ADAPTERS)
    raise UnsupportedModelError(
        f"vtoken has no adapter for {type(model).__name__}. Supported models — {names}. "
        "Pass the top-level model object (e.g. the *ForConditionalGeneration instance)."
    )
