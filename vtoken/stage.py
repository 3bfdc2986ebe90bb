"""Run the reducers of one reduction point over a batch and apply their selections to the ledger."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vtoken.errors import LayoutError
from vtoken.ledger import ImageSpan, Layout, apply, gather_rows, image_rows, renumbering
from vtoken.reducers.base import Reducer, Signal, SignalRequest, StageInput
from vtoken.timing import Timer

SignalSource = Callable[[SignalRequest, Layout], Signal]
Projector = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PointResult:
    """The outcome of one reduction point.

    hidden:    (B, L', d) the rows that survive, with merged values written in.
    layout:    the new layout.
    src:       (B, L') row of the point's *input* layout each new row came from (input L on padding).
    pos_shift: (B, L') amount to subtract from each new row's position id (None: positions unchanged).
    dec_shift: (B,) amount to subtract from the position ids of tokens decoded later (None: 0).
    changed:   False when nothing was dropped anywhere (every tensor can be left as it was).
    """

    hidden: torch.Tensor
    layout: Layout
    src: torch.Tensor
    pos_shift: torch.Tensor | None
    dec_shift: torch.Tensor | None
    changed: bool
    merged: bool = False  # some kept row carries new values (merging), not only a gather of the input
    carried: torch.Tensor | None = None  # (B, L', C) features carried beside the rows (see `run_point`)


def run_point(
    reducers: Sequence[Reducer],
    layout: Layout,
    hidden: torch.Tensor,
    spans: list[ImageSpan],
    signal: SignalSource | None,
    timer: Timer,
    layer: int | None = None,
    project: Projector | None = None,
    carried: torch.Tensor | None = None,
) -> PointResult:
    """Apply `reducers` in order at one point (all see the same model state, each the previous' output).

    carried: (B, L, C) per-row features that must follow the rows (Qwen3-VL's deepstack features,
    added to the visual rows of the first LLM layers): kept rows keep theirs, a merged row gets the
    same combination of its inputs' (`Selection.mix`, which merging reducers give when asked)."""
    b, length = layout.shape
    device = hidden.device
    src_total = torch.arange(length, device=device).expand(b, length)
    pos_shift: torch.Tensor | None = None
    dec_shift: torch.Tensor | None = None
    changed = merged = False
    starts = layout.starts.to(device)  # type: ignore[union-attr]
    pinned = [s.pinned for s in spans]
    inner = _inner_table(spans, device)
    for reducer in reducers:
        if not layout.counts or max(layout.counts) == 0:
            break
        with timer.at(device):  # a no-op while torch.compile traces (see Timer.at)
            selectable = [c - p for c, p in zip(layout.counts, pinned)]
            entry = layout.entry or selectable
            keep = [reducer.budget(n, layer, e, s.share if s.part is None else s.part) if n > 0 else 0
                    for n, e, s in zip(selectable, entry, spans)]
            flat, valid = image_rows(layout)
            d = hidden.shape[-1]
            flat_hidden = hidden.reshape(b * length, d)
            positions = layout.index.reshape(-1)[flat] - starts[:, None]
            if inner is not None:  # pinned tokens: not selectable, grid positions of the others
                positions = inner.gather(1, positions.clamp(0, inner.shape[1] - 1))
                valid = valid & (positions >= 0)
                positions = positions.clamp_min(0)
            aligned = _aligner(signal, layout, flat, positions, valid, reducer.name)
            x = StageInput(
                features=flat_hidden[flat],
                valid=valid,
                positions=positions,
                sizes=layout.size.reshape(-1)[flat],
                grids=[s.grid for s in spans],
                bases=[s.base for s in spans] if any(s.base is not None for s in spans) else None,
                parts=[s.part for s in spans] if any(s.part is not None for s in spans) else None,
                keep=keep,
                layer=layer,
                project=project,
                counts=selectable,
                want_mix=carried is not None,
                _signal=aligned,
            )
            sel = reducer.select(x)
            if carried is not None and sel.values is not None and sel.mix is None:
                raise LayoutError(
                    f"{reducer.name} merges tokens without giving its merge weights (Selection.mix), so the "
                    "features this model adds to its visual rows inside the LLM (Qwen3-VL's deepstack) cannot "
                    "follow the merged tokens; use a pruning reducer, or give Selection.mix when "
                    "StageInput.want_mix is set")
            counts_t = None
            if layout.count_t is not None:
                raise LayoutError(f"{reducer.name} acts after a reducer whose kept counts the content decides "
                                  "on the device (a static layout); vtoken takes the static layout only when "
                                  "such a reducer acts last")
            if reducer.adaptive:
                if sel.counts is None:
                    raise LayoutError(f"adaptive reducer {reducer.name!r} must report Selection.counts")
                if not isinstance(sel.counts, torch.Tensor):
                    keep = list(sel.counts)
                elif layout.static and reducer.device_counts:  # graph-safe: dropped rows become padding
                    counts_t = sel.counts.to(device=device, dtype=torch.long)
                else:
                    keep = sel.counts.tolist()
            if reducer.adaptive or not _counts_tested(reducer):
                _check_counts(reducer, sel.keep & valid, keep if counts_t is None else counts_t,
                              on_device=layout.static)
            res = apply(layout, hidden, flat, valid, sel.keep, keep, spans, sel.values, sel.sizes,
                        carried, sel.mix, counts_t)
            merged = merged or res.merged
            hidden, carried = res.hidden, res.carried
            if not res.changed:
                layout = res.layout
                continue
            changed = True
            if reducer.renumber:
                before, total = renumbering(res.dropped)
                pos_shift = before if pos_shift is None else pos_shift + before
                dec_shift = total if dec_shift is None else dec_shift + total
            if pos_shift is not None:
                pos_shift = gather_rows(pos_shift, res.src, fill=0)
            src_total = gather_rows(src_total, res.src, fill=length)
            length = res.layout.shape[1]
            layout = res.layout
    return PointResult(hidden, layout, src_total, pos_shift, dec_shift, changed, merged, carried)


def _inner_table(spans: list[ImageSpan], device: torch.device) -> torch.Tensor | None:
    """(n_img, max length) grid index of each run position (-1 pinned), or None if nothing is pinned."""
    if not any(s.inner is not None for s in spans):
        return None
    width = max(s.n for s in spans)
    table = torch.full((len(spans), width), -1, dtype=torch.long)
    for i, s in enumerate(spans):
        table[i, : s.n] = torch.tensor(s.inner) if s.inner is not None else torch.arange(s.n)
    return table.to(device)


def _aligner(signal: SignalSource | None, layout: Layout, flat: torch.Tensor, positions: torch.Tensor,
             valid: torch.Tensor, name: str) -> Callable[[SignalRequest], torch.Tensor]:
    """Signal lookup for one StageInput: rows- or raster-aligned values gathered to (n_img, N, ...)."""

    def aligned(req: SignalRequest) -> torch.Tensor:
        if signal is None:
            raise LayoutError(f"{name}: no signal source for {req}")
        sig = signal(req, layout)
        v = sig.value
        if sig.aligned == "rows":
            return v.reshape(-1, *v.shape[2:])[flat]
        idx = positions.clamp(0, v.shape[1] - 1).masked_fill(~valid, 0)
        return v[torch.arange(v.shape[0], device=v.device)[:, None], idx.to(v.device)]

    return aligned


_TESTED: dict[type, bool] = {}


def _counts_tested(reducer: Reducer) -> bool:
    """The class that defines the reducer's `select` declares it tested (`Reducer.counts_tested`).
    Resolved once per class, outside torch.compile's tracing (which cannot walk a class's __dict__)."""
    cls = type(reducer)
    if cls not in _TESTED:
        owner = next(c for c in cls.__mro__ if "select" in c.__dict__)
        _TESTED[cls] = bool(owner.__dict__.get("counts_tested", False))
    return _TESTED[cls]


def resolve_tested(reducers: Sequence[Reducer]) -> None:
    """Resolve `_counts_tested` for a patch's reducers (at patch time)."""
    for r in reducers:
        _counts_tested(r)


def _check_counts(reducer: Reducer, keep: torch.Tensor, expected: list[int] | torch.Tensor,
                  on_device: bool = False) -> None:
    """Reducers whose selection is not declared tested are checked to keep exactly their budget (an
    adaptive one: the counts it reports). The check reads device memory, which stalls the GPU pipeline;
    in a static (graph-safe) layout it is an asynchronous device assertion instead."""
    if on_device:
        want = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=torch.long,
                                                                                   device=keep.device)
        torch._assert_async((keep.sum(1) == want).all(), f"vtoken: reducer {reducer.name!r} did not keep "
                            "exactly its budget per image; Selection.keep must have exactly the budget set")
        return
    got = keep.sum(1).tolist()
    if got != expected:
        raise LayoutError(
            f"reducer {reducer.name!r} kept {got} tokens per image but its budget is {expected}; "
            "Selection.keep must have exactly the budget set per image"
        )
