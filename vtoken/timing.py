"""Accumulates the time spent inside reducers (CUDA events on GPU, so timing adds no host sync)."""

from __future__ import annotations

import contextlib
import time

import torch


class Timer:
    """Context manager summing elapsed time over many `with timer:` blocks; read `seconds`."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.reset()

    def at(self, device: torch.device | str) -> Timer | contextlib.nullcontext:
        """Time the next block on `device`: CUDA events there (no host sync; read once in `seconds`),
        `time.perf_counter` elsewhere. Use as `with timer.at(tensor.device): ...`. While torch.compile
        traces, nothing is timed: the block becomes part of a compiled graph, where host clocks and
        events would only break the graph."""
        if torch.compiler.is_compiling():
            return contextlib.nullcontext()
        self.cuda = torch.device(device).type == "cuda"
        return self

    def reset(self) -> None:
        self._host = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0
        self._ev: torch.cuda.Event | None = None

    def __enter__(self) -> Timer:
        if self.cuda:
            self._ev = torch.cuda.Event(enable_timing=True)
            self._ev.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._ev, end))  # type: ignore[arg-type]
        else:
            self._host += time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        """Total seconds (synchronises the recorded CUDA events, once, when read)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._host += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        return self._host
