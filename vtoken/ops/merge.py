"""Token merging inside a ViT layer, batched over images with per-image token counts.

A layer's merge is a `MergePlan`: `dest[b, t]` is the output slot of input token t (several tokens
sharing a slot are merged). Tokens are always packed to the front of each row (`valid` is a prefix),
so ragged batches (DyMU merges a content-dependent number per image) are padded at the end.

Matching (which tokens merge) follows the papers:
- `bipartite_plan`: ToMe's bipartite soft matching (Bolya et al., ICLR 2023, §3): tokens alternate
  into sets A (even index) and B (odd); each a in A proposes its most similar b (cosine of the
  metric); the r best proposals merge. With `threshold`, every proposal scoring above it merges
  (DyMU's DToMe, Wang et al. 2025, §3.1). Output order: unmerged A (index order), then B.
- `energy_plan`: PiToMe (Tran et al., NeurIPS 2024, §3): energy E_i = mean_j f(cos_ij - m); the 2k
  highest-energy tokens are mergeable, split by energy rank into A (even ranks) / B (odd ranks),
  every a merges into its most similar b; the rest are protected. Output order: prefix tokens,
  protected (descending energy), then B (rank order).
- `energy_bipartite_plan`: PiToMe's energy-sorted bipartite matching (the authors' `pitome_bsm`, run
  in the first half of the blocks by their timm / DeiT patch): all tokens, sorted by energy, alternate
  into A (even ranks) and B (odd ranks); each a proposes its most similar b and the k best proposals
  merge (ToMe's rule). Output order: prefix, unmerged A (rank order), then B (rank order).

`merge()` is the size-weighted average x_s = sum(size_i x_i) / sum(size_i) (ToMe eq. in §3 "Merging").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MergePlan:
    """dest: (B, T) output slot of each input token (`length` on padding); length: output slots."""

    dest: torch.Tensor
    counts: list[int]  # output tokens per image (host ints)
    length: int

    @property
    def valid(self) -> torch.Tensor:
        return prefix_mask(self.counts, self.length, self.dest.device)


def prefix_mask(counts: list[int], length: int, device: torch.device) -> torch.Tensor:
    """(B, length) bool: the first counts[b] slots of each row (tokens are packed to the front)."""
    return torch.arange(length, device=device)[None] < torch.tensor(counts, device=device)[:, None]


def merge(x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None = None, weighted: bool = True) -> torch.Tensor:
    """Average the tokens of x (B, T, d) that share a slot: size-weighted, or plain if not `weighted`."""
    b, _, d = x.shape
    work = torch.promote_types(x.dtype, torch.float32)  # float32 accumulation, float64 kept
    w = size if (weighted and size is not None) else torch.ones(x.shape[:2], device=x.device, dtype=x.dtype)
    w = w.to(work)
    idx = plan.dest[..., None].expand(-1, -1, d)
    num = torch.zeros(b, plan.length + 1, d, device=x.device, dtype=work)
    num.scatter_add_(1, idx, x.to(work) * w[..., None])
    den = torch.zeros(b, plan.length + 1, device=x.device, dtype=work)
    den.scatter_add_(1, plan.dest, w)
    return (num[:, :-1] / den[:, :-1, None].clamp_min(1e-12)).to(x.dtype)


def merge_sizes(size: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Sizes of the output slots (sum of the merged tokens' sizes); 0 on padding."""
    out = torch.zeros(size.shape[0], plan.length + 1, device=size.device, dtype=size.dtype)
    return out.scatter_add_(1, plan.dest, size)[:, :-1]


def expand(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Give every input token its slot's value: y (B, T', d) -> (B, T, d)."""
    pad = torch.cat([y, y.new_zeros(y.shape[0], 1, y.shape[2])], 1)
    return pad.gather(1, plan.dest[..., None].expand(-1, -1, y.shape[2]))


def identity_plan(valid: torch.Tensor, counts: list[int]) -> MergePlan:
    t = valid.shape[1]
    dest = torch.where(valid, torch.arange(t, device=valid.device)[None], t)
    return MergePlan(dest, list(counts), t)


def _finish(dest: torch.Tensor, counts: list[int], t: int) -> MergePlan:
    length = max(counts, default=0)
    return MergePlan(torch.where(dest >= length, length, dest), counts, length)


def bipartite_plan(
    metric: torch.Tensor,
    counts: list[int],
    r: list[int] | None = None,
    protect: int = 1,
    threshold: float | None = None,
    max_r: list[int] | None = None,
    min_r: list[int] | None = None,
    unmerged: str = "index",
) -> tuple[MergePlan, torch.Tensor]:
    """ToMe bipartite soft matching (or DyMU threshold matching) for a batch.

    metric: (B, T, c) per-token features (keys, mean over heads); counts: real tokens per image
    (a prefix of each row). r: merges per image (clamped to (count - protect) // 2). protect: the
    number of prefix tokens (CLS, distillation / register tokens) that are never merged: they are
    neither sources (A) nor destinations (B) and keep their slots at the front. threshold: merge
    every proposal with similarity > threshold instead of the r best (capped by max_r, default
    (count - protect) // 2); min_r: with a threshold, merge at least this many per image (the best
    proposals; vtoken's `keep` ceiling for DyMU). Returns the plan and each A token's best score
    (B, ceil(T/2)), -inf where it cannot merge (for calibration). Output: prefix, unmerged A (index
    order; `unmerged="score"`: by descending best score, as AIM's code leaves them), then B. Rows with
    fewer than two mergeable tokens are left as they are.
    """
    b, t, _ = metric.shape
    device = metric.device
    if t - protect < 2:  # nothing can merge (e.g. one token left in a no-CLS tower)
        valid = prefix_mask(counts, t, device)
        return identity_plan(valid, counts), metric.new_full((b, (t + 1) // 2), float("-inf"), dtype=torch.float32)
    m = F.normalize(metric.float(), dim=-1)
    a, bb = m[:, ::2], m[:, 1::2]
    ta, tb = a.shape[1], bb.shape[1]
    n = torch.tensor(counts, device=device)
    ia = torch.arange(ta, device=device)
    ib = torch.arange(tb, device=device)
    pos_a, pos_b = 2 * ia, 2 * ib + 1
    real_a = pos_a[None] < n[:, None]
    real_b = pos_b[None] < n[:, None]
    free_a = real_a & (pos_a >= protect)[None]  # may be merged away
    free_b = real_b & (pos_b >= protect)[None]  # may receive merges
    scores = (a @ bb.transpose(1, 2)).masked_fill(~free_b[:, None, :], float("-inf"))
    node_max, node_idx = scores.max(-1)
    node_max = node_max.masked_fill(~free_a, float("-inf"))
    cap = [max(0, (c - protect) // 2) for c in counts]
    if threshold is None:
        r_eff = [min(x, c) for x, c in zip(r or [0] * b, cap)]
    else:
        limit = [min(c, x) for c, x in zip(cap, max_r)] if max_r is not None else cap
        above = (node_max > threshold).sum(1).tolist()
        if min_r is not None:
            above = [max(x, m) for x, m in zip(above, min_r)]
        r_eff = [min(x, c) for x, c in zip(above, limit)]
    order = node_max.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, ia.expand(b, ta).contiguous())
    merged = free_a & (rank < torch.tensor(r_eff, device=device)[:, None])
    keep_a = free_a & ~merged
    n_unm = keep_a.sum(1, keepdim=True)
    if unmerged == "score":  # rank among the unmerged proposals (merged ones rank first)
        unm_slot = protect + rank - torch.tensor(r_eff, device=device)[:, None]
    elif unmerged == "index":
        unm_slot = protect + keep_a.long().cumsum(1) - 1
    else:
        raise ValueError(f"unmerged must be 'index' or 'score', got {unmerged!r}")
    b_slot = protect + n_unm + free_b.long().cumsum(1) - 1
    dest_a = torch.where(merged, b_slot.gather(1, node_idx), unm_slot)
    dest_a = torch.where(free_a, dest_a, torch.where(real_a, pos_a[None].expand(b, ta), t))
    dest_b = torch.where(free_b, b_slot, torch.where(real_b, pos_b[None].expand(b, tb), t))
    dest = torch.empty(b, t, dtype=torch.long, device=device)
    dest[:, ::2] = dest_a
    dest[:, 1::2] = dest_b
    new_counts = [c - x for c, x in zip(counts, r_eff)]
    return _finish(dest, new_counts, t), node_max


def energy(metric: torch.Tensor, counts: list[int], margin: float, alpha: float = 1.0, prefix: int = 1,
           variant: str = "code") -> torch.Tensor:
    """PiToMe energy (§3.1) of each non-prefix token: E_i = mean_j f(cos(v_i, v_j)) over real tokens
    j (i included). variant "code": f(x) = ELU(x - m, alpha) (the official code); "paper":
    f(x) = x if x >= m else alpha (exp(x - m) - 1). Prefix tokens get -inf."""
    t = metric.shape[1]
    m = F.normalize(metric.float(), dim=-1)
    sim = m @ m.transpose(1, 2)
    n = torch.tensor(counts, device=metric.device)
    idx = torch.arange(t, device=metric.device)
    real = (idx[None] < n[:, None]) & (idx[None] >= prefix)
    f = F.elu(sim - margin, alpha)
    if variant == "paper":
        f = torch.where(sim >= margin, sim, f)
    elif variant != "code":
        raise ValueError(f"energy variant must be 'code' or 'paper', got {variant!r}")
    e = (f * real[:, None, :]).sum(-1) / real.sum(1, keepdim=True).clamp_min(1)
    return e.masked_fill(~real, float("-inf"))


def energy_plan(metric: torch.Tensor, counts: list[int], k: list[int], margin: float, alpha: float = 1.0,
                prefix: int = 1, variant: str = "code") -> MergePlan:
    """PiToMe merge of k[i] tokens per image (requires 2k <= count - prefix).

    Sorted by energy (descending), the top 2k are mergeable: A = even ranks, B = odd ranks; each a
    merges into its most similar b. Output: prefix, protected (energy order), B (rank order).
    """
    b, t, _ = metric.shape
    device = metric.device
    e = energy(metric, counts, margin, alpha, prefix, variant)
    order = e.argsort(dim=1, descending=True, stable=True)  # real non-prefix tokens first
    if any(2 * x > c - prefix for x, c in zip(k, counts)):
        raise ValueError(f"pitome: cannot merge {k} tokens of {counts} (at most half of the non-prefix tokens)")
    kk = torch.tensor(k, device=device)
    n_real = torch.tensor(counts, device=device) - prefix
    rank = torch.arange(t, device=device)[None].expand(b, t)
    mergeable = rank < 2 * kk[:, None]
    is_a = mergeable & (rank % 2 == 0)
    is_b = mergeable & (rank % 2 == 1)
    protected = (rank >= 2 * kk[:, None]) & (rank < n_real[:, None])
    m = F.normalize(metric.float(), dim=-1)
    ms = m.gather(1, order[..., None].expand(-1, -1, m.shape[2]))  # rows in energy order
    sim = ms @ ms.transpose(1, 2)
    sim = sim.masked_fill(~is_b[:, None, :], float("-inf"))
    target = sim.argmax(-1)  # for A rows: the best B (by sorted position)
    # slots: prefix 0..p-1, protected p.., then B in rank order
    n_prot = (n_real - 2 * kk)[:, None]
    prot_slot = prefix + rank - 2 * kk[:, None]
    b_slot = prefix + n_prot + rank // 2
    slot_sorted = torch.where(protected, prot_slot, torch.where(is_b, b_slot, t))
    a_slot = slot_sorted.gather(1, target)
    slot_sorted = torch.where(is_a, a_slot, slot_sorted)
    return _plan_from_slots(order, slot_sorted, prefix, counts, k)


def _plan_from_slots(order: torch.Tensor, slot_sorted: torch.Tensor, prefix: int, counts: list[int],
                     k: list[int]) -> MergePlan:
    """The plan from each token's output slot, given in `order` (sorted) positions; prefix tokens stay."""
    b, t = order.shape
    dest = torch.full((b, t), t, dtype=torch.long, device=order.device)
    dest.scatter_(1, order, slot_sorted)
    if prefix:
        dest[:, :prefix] = torch.arange(prefix, device=order.device)
    return _finish(dest, [c - x for c, x in zip(counts, k)], t)


def energy_bipartite_plan(metric: torch.Tensor, counts: list[int], k: list[int], margin: float, alpha: float = 1.0,
                          prefix: int = 1, variant: str = "code") -> MergePlan:
    """PiToMe's energy-sorted bipartite soft matching (the authors' `pitome_bsm`, which their timm / DeiT
    patch runs in the first ceil(L/2) blocks): every non-prefix token, sorted by energy (descending,
    §3.1), goes to A (even ranks) or B (odd ranks); each a proposes its most similar b (cosine) and the
    k[i] best proposals merge (ToMe §3). Nothing is protected. Output: prefix, unmerged A (rank order),
    B (rank order)."""
    b, t, _ = metric.shape
    device = metric.device
    e = energy(metric, counts, margin, alpha, prefix, variant)
    order = e.argsort(dim=1, descending=True, stable=True)  # real non-prefix tokens first
    n_real = torch.tensor(counts, device=device) - prefix
    rank = torch.arange(t, device=device)[None].expand(b, t)
    real = rank < n_real[:, None]
    is_a = real & (rank % 2 == 0)
    is_b = real & (rank % 2 == 1)
    m = F.normalize(metric.float(), dim=-1)
    ms = m.gather(1, order[..., None].expand(-1, -1, m.shape[2]))  # rows in energy order
    sim = (ms @ ms.transpose(1, 2)).masked_fill(~is_b[:, None, :], float("-inf"))
    best, target = sim.max(-1)
    best = best.masked_fill(~is_a, float("-inf"))
    k = [min(x, max(c - prefix, 0) // 2) for x, c in zip(k, counts)]  # at most |B| (none without a B)
    kk = torch.tensor(k, device=device)
    a_rank = torch.empty_like(rank)
    a_rank.scatter_(1, best.argsort(dim=1, descending=True, stable=True), rank.contiguous())
    merged = is_a & (a_rank < kk[:, None])
    unm = is_a & ~merged
    unm_slot = prefix + unm.long().cumsum(1) - 1
    b_slot = prefix + unm.sum(1, keepdim=True) + is_b.long().cumsum(1) - 1
    slot_sorted = torch.where(unm, unm_slot, torch.where(is_b, b_slot, t))
    slot_sorted = torch.where(merged, slot_sorted.gather(1, target), slot_sorted)
    return _plan_from_slots(order, slot_sorted, prefix, counts, k)


def dymu_schedule(r_total: int, layers: int) -> list[int]:
    """DyMU's constant schedule (its open_clip `tome_cfg`, `r_schedule="constant"`): `r_total` merges
    spread evenly over all `layers` blocks, the remainder on the first ones (21 / 16 / 8 per layer for
    r_total = 504 / 384 / 192 over CLIP-L's 24 layers)."""
    if layers <= 0:
        return []
    base, rem = divmod(int(r_total), layers)
    return [base + (1 if i < rem else 0) for i in range(layers)]


def tome_schedule(r: int | tuple[int, float] | list[int], layers: int) -> list[int]:
    """ToMe's r per layer: an int (constant), (r, inflection) (linear from r(1-inflection) to
    2r - r(1-inflection), ToMe `parse_r`), or an explicit list (zero-padded)."""
    if isinstance(r, list):
        return (list(r) + [0] * layers)[:layers]
    if isinstance(r, tuple):
        r0, inflect = r
        lo = int(r0 * (1.0 - inflect))
        hi = 2 * r0 - lo
        step = (hi - lo) / max(layers - 1, 1)
        return [int(lo + step * i) for i in range(layers)]
    return [int(r)] * layers


def solve_schedule(n: int, keep: int, layers: int, protect: int = 1) -> list[int]:
    """Merges per layer that take `n` tokens (+ `protect` prefix) to exactly `keep` (+ prefix): as even
    as possible, under ToMe's cap r <= (tokens - protect) // 2 at every layer.

    Works on the token counts t_i entering each layer: U_i, the most tokens layer i may hold and still
    reach `keep` under the caps, is found backwards; then t_{i+1} follows the even decrease, clamped
    to [t_i - cap_i, U_{i+1}].
    """
    if keep > n:
        raise ValueError(f"keep={keep} exceeds the {n} tokens")
    if layers <= 0:
        if keep != n:
            raise ValueError("no layer to merge in")
        return []
    upper = [0] * (layers + 1)
    upper[layers] = keep + protect
    for i in range(layers - 1, -1, -1):  # largest t with t - (t - protect) // 2 <= upper[i + 1]
        t = 2 * upper[i + 1] - protect
        while t - (t - protect) // 2 > upper[i + 1]:
            t -= 1
        upper[i] = t
    start = n + protect
    if start > upper[0]:
        raise ValueError(f"cannot merge {n} tokens down to {keep} in {layers} layers (at most half per layer)")
    t, out = start, []
    for i in range(layers):
        even = start - round((i + 1) * (n - keep) / layers)
        nxt = min(max(even, t - (t - protect) // 2), upper[i + 1])
        out.append(t - nxt)
        t = nxt
    return out


def representatives(group: torch.Tensor, valid: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For tokens labelled by merged group (n, N): each token's group representative (the group's
    smallest position) and the group's size, both (n, N)."""
    n_img, n = group.shape
    idx = torch.where(valid, group, n)
    big = torch.full((n_img, n + 1), n, dtype=torch.long, device=group.device)
    first = big.scatter_reduce(1, idx, positions.long(), reduce="amin")
    size = torch.zeros(n_img, n + 1, device=group.device).scatter_add_(1, idx, valid.float())
    return first.gather(1, idx), size.gather(1, idx)
