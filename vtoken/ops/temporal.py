"""HoliTom's global redundancy-aware temporal segmentation (Shao et al., 2025, §3.1), as the authors'
code computes it: a token is static over a segment when its cosine similarity to the same position in
the next frame stays above tau throughout; a dynamic program splits the frames into segments that
maximise the tokens merged away."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_similarity(x: torch.Tensor) -> torch.Tensor:
    """(F-1, N) cosine similarity of each token (F, N, d) to the same position in the next frame."""
    n = F.normalize(x.float(), dim=-1)
    return (n[:-1] * n[1:]).sum(-1)


def static_table(similar: torch.Tensor) -> torch.Tensor:
    """(F, F, N) bool: static[a, e, p] is True when position p stays similar over frames a..e
    (`similar` (F-1, N): transition t -> t+1 above the threshold); a single frame is all static."""
    f = similar.shape[0] + 1
    n = similar.shape[1]
    out = torch.zeros(f, f, n, dtype=torch.bool, device=similar.device)
    for a in range(f):
        out[a, a] = True
        if a < f - 1:
            out[a, a + 1:] = similar[a:].long().cumprod(0).bool()
    return out


def segment(static: torch.Tensor, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """Split F frames into segments [a, e] maximising sum (e - a) * |static(a, e)| (the tokens merged
    away), each at most `max_window` frames; ties keep the earlier candidate (a single frame first,
    then shorter windows), as the authors' strict `>` does. Returns the segments and the total."""
    f = static.shape[0]
    gain = (static.sum(-1) * (torch.arange(f)[None, :] - torch.arange(f)[:, None]).clamp_min(0).to(static.device))
    gain = gain.tolist()  # host: a handful of frames, a Python recurrence
    best: list[int] = []
    start: list[int] = []
    for i in range(f):
        value, first = (best[i - 1] if i else 0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            v = (best[j] if j >= 0 else 0) + gain[j + 1][i]
            if v > value:
                value, first = v, j + 1
        best.append(value)
        start.append(first)
    out = []
    i = f - 1
    while i >= 0:
        out.append((start[i], i))
        i = start[i] - 1
    return out[::-1], (best[-1] if best else 0)
