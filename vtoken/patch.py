"""`vtoken.patch(model, reducer, **params) -> Patch`, `vtoken.unpatch(model)`."""

from __future__ import annotations

import copy
import numbers
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vtoken.adapter import Adapter, find_adapter
from vtoken.copying import Guard
from vtoken.errors import AlreadyPatchedError, ParameterError, UnsupportedModelError
from vtoken.ledger import Layout, image_rows
from vtoken.reducers.base import Reducer, build
from vtoken.registry import get
from vtoken.runtime import Runtime, check_stages
from vtoken.stats import Stats

# model -> its handle, held weakly: the handle lives as long as the model (its copying.Guard hook holds it), so
# a patched model that the user drops is freed.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Patch]] = weakref.WeakKeyDictionary()

ReducerSpec = str | Reducer


class Patch:
    """Handle of an installed patch. A context manager: leaving the `with` block removes it.

    `copy.deepcopy(model)` of a patched model gives a patched copy that vtoken manages like any other:
    `vtoken.patched(copy)` is its own handle (same reducers, its own statistics), `unpatch(copy)` /
    `.remove()` restore it bit for bit, patching it again raises AlreadyPatchedError, and the original
    is untouched. (Chosen over an unpatched copy because a deep copy is expected to behave like the
    original; the copy's hooks are rebound to a copy of the adapter, see `vtoken.copying.Guard`.)
    """

    def __init__(self, model: nn.Module, adapter: Adapter, note: str = "") -> None:
        self._model = weakref.ref(model)
        self.adapter = adapter
        self.note = note
        self.active = True
        self._guard: RemovableHandle | None = None

    @property
    def runtime(self) -> Runtime:
        """Reducers, signals and state of the last call (shared with the adapter)."""
        return self.adapter.runtime

    @property
    def reducers(self) -> list[Reducer]:
        return [r for r in self.runtime.reducers if not r.internal]

    @property
    def stats(self) -> Stats:
        """Statistics of the last forward / generate (see `vtoken.stats.Stats`)."""
        self.adapter.resolve_stats()
        stats = self.runtime.stats
        stats.overhead_s = self.runtime.timer.seconds
        return stats

    @property
    def static_layout(self) -> bool | None:
        """Graph-safe prefill layouts (no host read or sync, fixed shapes; every sample of a batch must
        then hold the same number of images): True, False, or None (default) = while torch.compile
        traces the model. See docs/api.md."""
        return self.runtime.static_layout

    @static_layout.setter
    def static_layout(self, value: bool | None) -> None:
        if value not in (True, False, None):
            raise ParameterError(f"static_layout must be True, False or None (automatic), got {value!r}")
        self.runtime.static_layout = value

    @property
    def static_grid(self) -> tuple[int, int] | None:
        """The (rows, columns) of LLM tokens every image of a static prefill has, declared by the user
        for families whose image sizes vary (Qwen2-VL / 2.5-VL: the grid lives in `image_grid_thw`'s
        values, which only a host read gives). Reducers that need the grid (pool, HiPrune, VisionZip)
        or vision-tower signals then compile whole too; a batch whose images differ from it fails a
        device-side assertion. None (default): not declared. See docs/api.md."""
        return self.runtime.static_grid

    @static_grid.setter
    def static_grid(self, value: tuple[int, int] | None) -> None:
        if value is not None:
            ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            if not ok:
                raise ParameterError(f"static_grid must be (rows, columns) of positive ints (LLM tokens per image) "
                                     f"or None, got {value!r}")
            value = (int(value[0]), int(value[1]))
        self.adapter.declare_static_grid(value)
        self.runtime.static_grid = value

    @contextmanager
    def prompt(self, length: int | Sequence[int]) -> Iterator[Patch]:
        """Within this block, only the first `length` tokens (original columns; an int >= 1, or one per
        sample) count as the prompt for text-conditioned reducers (FastV, TransPrune IGA, ToDRE stage 2).

        Use it when scoring a continuation in one forward (log-likelihood), or to recompute a
        generation without cache: the reduction then depends on the prompt alone, as it does in a
        cached generate. A list whose length is not the batch size of a call raises LayoutError there.
        """
        value = _prompt_lengths(length)  # a list is checked against the batch where the adapter reads it
        prev = self.runtime.prompt_end
        self.runtime.prompt_end = value
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
        starts = lay.starts if lay.starts is not None else torch.tensor([s.start for s in spans], device=flat.device)
        pos = lay.index.reshape(-1)[flat] - starts[:, None]
        return [p[v].cpu() for p, v in zip(pos, valid)]

    def describe(self) -> str:
        """What was applied, to which model, and why (e.g. the family default)."""
        lines = [f"vtoken patch on {self.adapter.describe()}" + ("" if self.active else " (removed)")]
        lines += [f"  {r.describe()}" for r in self.reducers]
        if self.note:
            lines.append(f"  ({self.note})")
        return "\n".join(lines)

    def remove(self) -> None:
        """Remove every hook: the model computes exactly what it did before patching."""
        if not self.active:
            return
        self.adapter.remove()
        if self._guard is not None:
            self._guard.remove()
        self.active = False
        model = self._model()
        if model is not None and _active(model) is self:
            del _ACTIVE[model]

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return self.describe()

    def __deepcopy__(self, memo: dict[int, Any]) -> Patch:
        """The handle of the model's deep copy (copying a handle copies its model); a removed handle is
        returned as it is."""
        model = self._model()
        if not self.active or model is None:
            return self
        twin = patched(copy.deepcopy(model, memo))
        return self if twin is None else twin  # None only while the model itself is still being copied


def _guard_hooks() -> None:
    """Make torch.compile guard on module hooks. By default it does not
    (`torch._dynamo.config.skip_nnmodule_hook_guards`), so graphs traced for an unpatched model — one
    compiled before the patch, or another instance of the same class — would be replayed for the
    patched one without vtoken's hooks (silently unreduced), or with another patch's. With the guard, a
    changed set of hooks recompiles instead. Process-wide, and only stricter: never a different result.
    Graphs compiled before the guard was on lack it, so they are dropped (once: a recompilation)."""
    import torch._dynamo  # 1-2 s on first import: only once vtoken patches

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()


def _active(model: nn.Module) -> Patch | None:
    ref = _ACTIVE.get(model)
    handle = None if ref is None else ref()
    return handle if handle is not None and handle.active else None


def _prompt_lengths(length: Any) -> int | list[int]:
    """Validate `Patch.prompt`'s argument: an int >= 1 or a non-empty sequence of them."""
    what = ("p.prompt(length): the prompt length must be an int >= 1 (prompt tokens, in input columns) "
            "or a list with one per sample")

    def one(v: Any) -> int:
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ParameterError(f"{what}; got {v!r}")
        if v < 1:
            raise ParameterError(f"{what}; got {v} (a prompt has at least one token)")
        return int(v)

    if isinstance(length, torch.Tensor) and length.dim() == 1:
        length = length.tolist()
    if isinstance(length, Sequence) and not isinstance(length, (str, bytes)):
        if len(length) == 0:
            raise ParameterError(f"{what}; got an empty list")
        return [one(v) for v in length]
    return one(length)


def _resolve(reducer: ReducerSpec | Sequence[ReducerSpec] | None, params: dict[str, Any],
             default: tuple[str, dict[str, Any]]) -> tuple[list[Reducer], str]:
    if reducer is None:
        name, defaults = default
        return [build(get(name), {**defaults, **params})], f"family default: {name} {defaults}"
    if isinstance(reducer, (str, Reducer)):
        return [_one(reducer, params)], ""
    if isinstance(reducer, Sequence):
        items = list(reducer)
        if not items:
            raise ParameterError(
                "an empty list of reducers would patch nothing; pass at least one name or instance "
                "(vtoken.available() lists them), or 'none' for the unreduced reference with statistics"
            )
        for item in items:
            _check_spec(item)
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
    _check_spec(reducer)
    raise ParameterError(f"reducer must be a name, a Reducer instance or a list of them, got {reducer!r}")


def _check_spec(spec: Any) -> None:
    if isinstance(spec, (str, Reducer)):
        return
    if isinstance(spec, type) and issubclass(spec, Reducer):
        raise ParameterError(
            f"{spec.__name__} is a reducer class; pass an instance ({spec.__name__}(...)) or its name {spec.name!r}"
        )
    raise ParameterError(f"expected a reducer name or instance, got {spec!r}")


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


# signal kinds read from the rows of an LLM layer that ran earlier in the forward (see SignalRequest)
_CAPTURED = ("llm_attention", "llm_modality_mass")


def _check_composition(runtime: Runtime) -> None:
    """Refuse at patch time the combinations that could only fail at the first forward."""
    before: list[Reducer] = []
    for r in runtime.reducers:  # stage order
        if r.full_grid and before:
            first = before[0]
            how = "encoder merging" if first.stage == "encoder" else f"{first.name}"
            raise ParameterError(
                f"{r.name} reads each image's whole token grid, so it must be the first reducer to act, but "
                f"{how} ({first.stage} stage) reduces the tokens before it; use {r.name} alone, or list it "
                f"before the other {first.stage} reducers"
            )
        if not r.keeps_all:
            before.append(r)
    events = [(-1 if layer is None else layer, i, r) for layer, rs in runtime.points() for i, r in enumerate(rs)]
    for p, i, r in events:
        if p < 0:
            continue
        for s in r.signals():
            if s.kind in _CAPTURED:
                what, lo = f"LLM layer {s.layer}'s attention", s.layer
            elif s.kind == "llm_attention_pre":
                what, lo = f"the attention of the tokens entering layer {p}", p
            else:
                continue
            for p2, i2, r2 in events:
                if r2.keeps_all or (p2, i2) == (p, i) or not (lo < p2 < p or (p2 == p and i2 < i)):
                    continue
                where = "ahead of it at the same layer" if p2 == p else f"before layer {p2}, after that attention"
                raise ParameterError(
                    f"{r.name} (before LLM layer {p}) scores tokens by {what}, but {r2.name} removes tokens "
                    f"{where}, so the scores would not match the tokens. Use one of them, or place them so "
                    f"that no other reducer acts between layer {lo} and {r.name}'s layer {p} (e.g. another "
                    f"k, schedule or check_layer)"
                )


def _check_model(model: Any, fn: str) -> None:
    if isinstance(model, nn.Module):
        return
    hint = "; to remove a patch from its handle, call handle.remove()" if isinstance(model, Patch) else ""
    raise UnsupportedModelError(f"vtoken.{fn} expects a torch.nn.Module (the model), got {type(model).__name__}{hint}")


def patch(model: nn.Module, reducer: ReducerSpec | Sequence[ReducerSpec] | None = None, **params: Any) -> Patch:
    """Patch `model` in place so that its visual tokens are reduced; returns the handle.

    reducer: a registered name (see `vtoken.available()`), a Reducer instance, or a list of them
             (applied in stage order: encoder, boundary, decoder by layer). None applies the model
             family's default (see README).
    params:  the reducer's parameters (e.g. keep=64); with a list, name=dict(...) per reducer.
    Parameters, budgets and combinations are all checked here, before any hook is installed.
    """
    _check_model(model, "patch")
    existing = _active(model)
    if existing is not None:
        raise AlreadyPatchedError(
            f"this {type(model).__name__} is already patched ({existing.describe().splitlines()[1].strip()}); "
            "call .remove() on that patch or vtoken.unpatch(model) first"
        )
    _check_nested(model)
    adapter_cls = find_adapter(model)
    reducers, note = _resolve(reducer, params, adapter_cls.default_reducer)
    adapter = adapter_cls(model)
    check_stages(reducers, adapter_cls.stages, adapter.family)  # before per-model configuration
    info = adapter.model_info()
    parts: list[Reducer] = []
    for r in reducers:
        parts.extend(r.configured(info))  # new, frozen reducers: instances may be shared between patches
    runtime = Runtime(parts)
    check_stages(runtime.reducers, adapter_cls.stages, adapter.family)
    _check_composition(runtime)
    try:
        _guard_hooks()
        adapter.install(runtime)
    except BaseException:
        adapter.remove()
        raise
    handle = Patch(model, adapter, note)
    handle._guard = model.register_forward_hook(Guard(handle), prepend=True)
    _ACTIVE[model] = weakref.ref(handle)
    return handle


def _check_nested(model: nn.Module) -> None:
    """Refuse to patch a module inside a patched model, or a model that holds a patched module."""
    for other in list(_ACTIVE.keys()):
        if _active(other) is None or other is model:
            continue
        if any(m is model for m in other.modules()):
            inside = f"part of a patched {type(other).__name__}"
        elif any(m is other for m in model.modules()):
            inside = f"holds a patched {type(other).__name__}"
        else:
            continue
        raise AlreadyPatchedError(
            f"this {type(model).__name__} is {inside}; two patches on one model would stack their hooks. "
            "Remove the other patch first (vtoken.unpatch(that model))"
        )


def unpatch(model: nn.Module) -> bool:
    """Remove vtoken's patch from `model`; returns False if it was not patched."""
    _check_model(model, "unpatch")
    handle = _active(model)
    if handle is None:
        return False
    handle.remove()
    return True


def patched(model: nn.Module) -> Patch | None:
    """The active patch of `model`, if any."""
    _check_model(model, "patched")
    return _active(model)
