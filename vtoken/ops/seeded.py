"""Seeded uniform scores as a fixed function of (seed, raster position), safe to read while torch.compile
traces: the random baseline's scores and ToDRE's random pivot."""

from __future__ import annotations

import torch

TABLE = 8192  # scores drawn per seed: enough for any image grid of the supported families
_tables: dict[tuple[int, str], torch.Tensor] = {}  # (seed, device) -> the seed's first scores


def prepare(seed: int, n: int = TABLE) -> torch.Tensor:
    """Draw the seed's first >= n uniform scores on the CPU. torch.rand(n) is a prefix of torch.rand(N)
    for one seed, so one long table serves every grid. Call it outside any forward (a reducer's
    construction): a torch.Generator made while torch.compile traces breaks the graph."""
    key = (seed, "cpu")
    if key not in _tables or _tables[key].numel() < n:
        g = torch.Generator().manual_seed(seed)
        _tables[key] = torch.rand(max(n, TABLE), generator=g)
    return _tables[key]


def seeded_uniform(seed: int, n: int, device: torch.device) -> torch.Tensor:
    """(n,) the seed's first n uniform scores on `device` (cached per device outside tracing)."""
    key = (seed, str(device))
    table = _tables.get(key)
    if table is None or table.numel() < n:
        table = prepare(seed, n).to(device)
        if not torch.compiler.is_compiling():
            _tables[key] = table
    return table[:n]
