"""Finding a prefill's images among the vision-tower outputs recorded while patched.

generate() encodes the images before the language model runs (and from 5.23 only once), beam search
repeats them, and a call may carry several images: so each image's tower output is found by value,
never assumed by position. A recorded output is fingerprinted when the tower (or projector) returns;
each run of placeholder rows in `inputs_embeds` is fingerprinted the same way and matched.
"""

from __future__ import annotations

import torch

from vtoken.errors import SignalError


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(n, 2) float64 sum and sum of squares of each (…)-block of `x` (n, …): identifies identical tensors."""
    flat = x.reshape(x.shape[0], -1).double()
    return torch.stack([flat.sum(1), (flat * flat).sum(1)], 1)


def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fingerprints equal up to float rounding of the sums (..., 2) -> (...) bool."""
    return ((a - b).abs() <= 1e-6 * (b.abs() + 1)).all(-1)


def match_images(embeds: torch.Tensor, images: list[tuple[int, int, int]], recorded: list[tuple[int, torch.Tensor]],
                 error: str, latest: bool = False) -> list[int]:
    """For each image (sample, start, tokens) of this prefill, the index into `recorded` (tokens,
    fingerprint of the output) of the output it was filled from: the first match, or the last with
    `latest`. SignalError(`error`) when an image matches none."""
    length, d = embeds.shape[1], embeds.shape[-1]
    flat = embeds.reshape(-1, d)
    if not recorded:
        raise SignalError(error)
    counts = torch.tensor([n for n, _ in recorded], device=embeds.device)
    theirs = torch.stack([fp.reshape(2) for _, fp in recorded]).to(embeds.device)
    mine = torch.cat([fingerprint(flat[s * length + start: s * length + start + n][None]) for s, start, n in images])
    sizes = torch.tensor([n for _, _, n in images], device=embeds.device)
    hits = (same(mine[:, None], theirs[None]) & (counts[None] == sizes[:, None])).cpu()  # one host read
    if not bool(hits.any(1).all()):
        raise SignalError(error)
    order = torch.arange(len(recorded))
    picked = torch.where(hits, order, -1).amax(1) if latest else torch.where(hits, order, len(recorded)).amin(1)
    return picked.tolist()
