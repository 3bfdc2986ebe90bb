"""`copy.deepcopy` of a patched model: the copy is a patched model that vtoken manages (its own
adapter, hooks and handle), never one that silently shares the original's adapter."""

from __future__ import annotations

import copy
import types
import weakref
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from vtoken.runtime import Runtime

if TYPE_CHECKING:
    from vtoken.adapter import Adapter
    from vtoken.patch import Patch


class Guard:
    """A no-op forward hook on every patched model that carries its patch through `copy.deepcopy`.

    A deep copy of a module copies its hook dicts: hooks that are bound methods of the adapter get a
    copied adapter (whose `.model` is the copy, and whose removal handles point at the copy's hook
    dicts), but plain functions are copied by reference, so closures made by the adapter would still
    drive the original's adapter. The guard is the first hook of the model's first hook dict, so it is
    copied before any other hook: it copies those closures with their captured variables first (deep,
    through the same memo), then the adapter, and registers the copy's handle.
    """

    def __init__(self, handle: Patch | None) -> None:
        self.patch = handle

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> Guard:
        from vtoken.patch import _ACTIVE, Patch  # patch.py installs the guard

        new = Guard(None)
        memo[id(self)] = new
        old = self.patch
        model = None if old is None else old._model()
        twin = None if model is None else memo.get(id(model))
        if old is None or not old.active or not isinstance(twin, nn.Module) or twin is model:
            return new  # copied without its model: an inert hook
        closures = _adapter_closures(old.adapter)
        shells = [(fn, _shell(fn, memo)) for fn in closures]
        for fn, shell in shells:
            _fill(fn, shell, memo)
        adapter = copy.deepcopy(old.adapter, memo)
        if isinstance(getattr(adapter, "runtime", None), Runtime):
            adapter.runtime.prompt_end = None  # the copy is outside the original's prompt block
        for h in old.adapter.handles:  # hook dicts already copied before the guard (unusual): rebind in place
            if isinstance(h, RemovableHandle) and (d := h.hooks_dict_ref()) is not None and id(d) in memo:
                fn, twin_dict = d.get(h.id), memo[id(d)]
                if id(fn) in memo and h.id in twin_dict:
                    twin_dict[h.id] = memo[id(fn)]
        handle = Patch(twin, adapter, old.note)
        handle._guard = copy.deepcopy(old._guard, memo)
        new.patch = handle
        _ACTIVE[twin] = weakref.ref(handle)
        return new


def _adapter_closures(adapter: Adapter) -> list[types.FunctionType]:
    """Plain functions with captured state among the adapter's hooks and removal handles."""
    found: list[Any] = []
    for h in adapter.handles:
        if isinstance(h, RemovableHandle):
            d = h.hooks_dict_ref()
            found.append(None if d is None else d.get(h.id))
        elif hasattr(h, "__dict__"):
            found += list(vars(h).values())
    out: dict[int, types.FunctionType] = {}
    for fn in found:
        if isinstance(fn, types.FunctionType) and (fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__):
            out[id(fn)] = fn
    return list(out.values())


def _shell(fn: types.FunctionType, memo: dict[int, Any]) -> types.FunctionType:
    """A copy of `fn` with empty closure cells, registered in the deepcopy memo (filled by `_fill`)."""
    if id(fn) in memo:
        return memo[id(fn)]
    cells = tuple(types.CellType() for _ in fn.__closure__ or ())
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, None, cells or None)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    memo[id(fn)] = new
    memo.setdefault(id(memo), []).append(fn)  # keep the original alive while copying, as deepcopy does
    return new


def _fill(fn: types.FunctionType, new: types.FunctionType, memo: dict[int, Any]) -> None:
    """Deep-copy `fn`'s captured variables, defaults and attributes into its shell `new`."""
    new.__defaults__ = copy.deepcopy(fn.__defaults__, memo)
    new.__kwdefaults__ = copy.deepcopy(fn.__kwdefaults__, memo)
    new.__dict__.update(copy.deepcopy(fn.__dict__, memo))  # e.g. functools.wraps' __wrapped__
    for old_cell, cell in zip(fn.__closure__ or (), new.__closure__ or ()):
        try:
            value = old_cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, types.FunctionType) and value.__closure__ and id(value) not in memo:
            inner = _shell(value, memo)
            _fill(value, inner, memo)
            cell.cell_contents = inner
        else:
            cell.cell_contents = copy.deepcopy(value, memo)
