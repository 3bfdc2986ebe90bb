"""`vtoken.patch(model, reducer, **params) -> Patch`, `vtoken.unpatch(model)`."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vtoken.adapter import Adapter, find_adapter
from vtoken.errors import AlreadyPatchedError, ParameterError, VTokenError
from vtoken.ledger import Layout, image_rows
from vtoken.reducers.base import Reducer, build
from vtoken.registry import get
from vtoken.runtime import Runtime
from vtoken.stats import Stats

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Patch] = weakref.WeakKeyDictionary()

ReducerSpec = str | Reducer


class Patch:
    """Handle of an installed patch. A context manager: leaving the `with` block removes it."""

    def __init__(self, model: nn.Module, adapter: Adapter, runtime: Runtime, note: str = "") -> None:
        self._model = weakref.ref(model)
        self.adapter = adapter
        self.runtime = runtime
        self.note = note
        self.active = True

    @property
    def reducers(self) -> list[Reducer]:
        return list(self.runtime.reducers)

    @property
    def stats(self) -> Stats:
        """Statistics of the last forward / generate (see `vtoken.stats.Stats`)."""
        stats = self.runtime.stats
        stats.overhead_s = self.runtime.timer.seconds
        return stats

    @contextmanager
    def prompt(self, length: int | Sequence[int]) -> Iterator[Patch]:
        """Within this block, only the first `length` tokens (original columns; an int, or one per
        sample) count as the prompt for text-conditioned reducers (FastV, TransPrune IGA, ToDRE stage 2).

        Use it when scoring a continuation in one forward (log-likelihood), or to recompute a
        generation without cache: the reduction then depends on the prompt alone, as it does in a
        cached generate.
        """
        prev = self.runtime.prompt_end
        self.runtime.prompt_end = int(length) if isinstance(length, int) else [int(x) for x in length]
        try:
            yield self
        finally:
            self.runtime.prompt_end = prev

    @property
    def layout(self) -> Layout | None:
        """The token ledger after the last layer of the last prefill (None before any image input)."""
        return self.runtime.last_layout

    def kept_positions(self) -> list[torch.Tensor]:
        """Per image of the last prefill, the raster positions of its surviving tokens (in order).

        A merged token is listed at its representative position (the first of its sources).
        """
        lay = self.runtime.last_layout
        spans = self.runtime.last_spans
        if lay is None:
            return []
        flat, valid = image_rows(lay)
        starts = torch.tensor([s.start for s in spans], device=flat.device)
        pos = lay.index.reshape(-1)[flat] - starts[:, None]
        return [p[v].cpu() for p, v in zip(pos, valid)]

    def describe(self) -> str:
        """What was applied, to which model, and why (e.g. the family default)."""
        lines = [f"vtoken patch on {self.adapter.describe()}" + ("" if self.active else " (removed)")]
        lines += [f"  {r.describe()}" for r in self.runtime.reducers]
        if self.note:
            lines.append(f"  ({self.note})")
        return "\n".join(lines)

    def remove(self) -> None:
        """Remove every hook: the model computes exactly what it did before patching."""
        if not self.active:
            return
        self.adapter.remove()
        self.active = False
        model = self._model()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return self.describe()


def _resolve(reducer: ReducerSpec | Sequence[ReducerSpec] | None, params: dict[str, Any],
             default: tuple[str, dict[str, Any]]) -> tuple[list[Reducer], str]:
    if reducer is None:
        name, defaults = default
        return [build(get(name), {**defaults, **params})], f"family default: {name} {defaults}"
    if isinstance(reducer, (str, Reducer)):
        return [_one(reducer, params)], ""
    if isinstance(reducer, Sequence):
        items = list(reducer)
        names = [r if isinstance(r, str) else r.name for r in items]
        extra = [k for k in params if k not in names]
        if extra:
            raise ParameterError(
                f"with a list of reducers, pass parameters per reducer as name=dict(...) "
                f"(e.g. fastv=dict(keep=64)) or pass configured instances; got {', '.join(extra)}"
            )
        for k, v in params.items():
            if not isinstance(v, dict):
                raise ParameterError(f"parameters for {k!r} must be a dict, got {type(v).__name__}")
        return [_one(r, params.get(n, {})) for r, n in zip(items, names)], ""
    raise ParameterError(f"reducer must be a name, a Reducer instance or a list of them, got {reducer!r}")


def _one(spec: ReducerSpec, params: dict[str, Any]) -> Reducer:
    if isinstance(spec, Reducer):
        if params:
            raise ParameterError(
                f"{spec.name} is already an instance; set its parameters when building it, "
                f"not as patch() keywords ({', '.join(params)})"
            )
        return spec
    if isinstance(spec, str):
        return build(get(spec), params)
    raise ParameterError(f"expected a reducer name or instance, got {spec!r}")


def patch(model: nn.Module, reducer: ReducerSpec | Sequence[ReducerSpec] | None = None, **params: Any) -> Patch:
    """Patch `model` in place so that its visual tokens are reduced; returns the handle.

    reducer: a registered name (see `vtoken.available()`), a Reducer instance, or a list of them
             (applied in stage order: encoder, boundary, decoder by layer). None applies the model
             family's default (see README).
    params:  the reducer's parameters (e.g. keep=64); with a list, name=dict(...) per reducer.
    """
    if not isinstance(model, nn.Module):
        raise VTokenError(f"vtoken.patch expects a torch.nn.Module, got {type(model).__name__}")
    if model in _ACTIVE:
        raise AlreadyPatchedError(
            f"this {type(model).__name__} is already patched ({_ACTIVE[model].describe().splitlines()[1].strip()}); "
            "call .remove() on that patch or vtoken.unpatch(model) first"
        )
    adapter_cls = find_adapter(model)
    reducers, note = _resolve(reducer, params, adapter_cls.default_reducer)
    adapter = adapter_cls(model)
    Runtime(reducers).check_stages(adapter_cls.stages, adapter.family)  # before per-model configuration
    info = adapter.model_info()
    parts: list[Reducer] = []
    for r in reducers:
        r = copy.copy(r)  # instances may be shared between patches of different models
        r.configure(info)
        parts.extend(r.parts())
    runtime = Runtime(parts)
    runtime.check_stages(adapter_cls.stages, adapter.family)
    adapter.runtime = runtime
    try:
        adapter.install()
    except BaseException:
        adapter.remove()
        raise
    handle = Patch(model, adapter, runtime, note)
    _ACTIVE[model] = handle
    return handle


def unpatch(model: nn.Module) -> bool:
    """Remove vtoken's patch from `model`; returns False if it was not patched."""
    handle = _ACTIVE.get(model)
    if handle is None:
        return False
    handle.remove()
    return True


def patched(model: nn.Module) -> Patch | None:
    """The active patch of `model`, if any."""
    return _ACTIVE.get(model)
