"""Per-patch runtime state shared by the Patch handle and its adapter: reducers grouped by
reduction point, the signals they need, the reducer timer and the statistics of the last call."""

from __future__ import annotations

import torch

from vtoken.errors import UnsupportedModelError
from vtoken.reducers.base import STAGE_ORDER, Reducer, SignalRequest
from vtoken.stage import resolve_tested
from vtoken.stats import Stats
from vtoken.timing import Timer


class Runtime:
    """Reducers of one patch, ordered by stage (and by layer inside the decoder stage)."""

    def __init__(self, reducers: list[Reducer]) -> None:
        self.reducers = sorted(reducers, key=lambda r: (STAGE_ORDER[r.stage], r.layer or 0, r.order))
        self.encoder = [r for r in self.reducers if r.stage == "encoder"]
        self.boundary = [r for r in self.reducers if r.stage == "boundary"]
        self.decoder: dict[int, list[Reducer]] = {}
        for r in self.reducers:
            if r.stage == "decoder":
                for layer in r.layers:
                    self.decoder.setdefault(layer, []).append(r)
        self.decoder = dict(sorted(self.decoder.items()))
        self.signals: set[SignalRequest] = {s for r in self.reducers for s in r.signals()}
        resolve_tested(self.reducers)
        self.timer = Timer()
        self.stats = Stats()
        # End (exclusive, original columns) of the prompt: text-conditioned signals read only rows
        # before it, so tokens appended after the prompt (a scored continuation, or generated tokens
        # in a recompute without cache) never change the reduction. None: the whole input.
        self.prompt_end: int | list[int] | None = None
        # The ledger of the last prefill: final layout and the image spans, for inspection.
        self.last_layout = None
        self.last_spans: list = []
        # Graph-safe (static) prefill layouts: True / False, or None = while torch.compile traces.
        self.static_layout: bool | None = None
        self.static_grid: tuple[int, int] | None = None  # declared (rows, cols) per image (Patch.static_grid)

    def static_wanted(self) -> bool:
        """Lay the prefill out without host reads (see `adapters/hf/static.py`)?"""
        if self.static_layout is None:
            return torch.compiler.is_compiling()
        return self.static_layout

    def points(self) -> list[tuple[int | None, list[Reducer]]]:
        """Reduction points in the order tokens meet them: (None, boundary), then (layer, decoder)."""
        out: list[tuple[int | None, list[Reducer]]] = [(None, self.boundary)] if self.boundary else []
        return out + list(self.decoder.items())

    def new_stats(self) -> Stats:
        self.stats = Stats()
        self.timer.reset()
        return self.stats


def check_stages(reducers: list[Reducer], supported: frozenset[str], family: str) -> None:
    """UnsupportedModelError for a reducer acting in a stage the model's adapter does not provide."""
    for r in reducers:
        if r.stage not in supported:
            raise UnsupportedModelError(
                f"reducer {r.name!r} acts in the {r.stage} stage, which the {family} adapter does "
                f"not support (it supports: {', '.join(sorted(supported))})"
            )
