"""The token ledger: which original token each row of the (reduced) LLM sequence holds.

Every reduction point (boundary, each decoder layer that prunes) produces a new `Layout` from the
previous one. A layout is a padded batch: row `r` of sample `b` holds original column
`index[b, r]`; rows added as padding (samples that kept fewer tokens than the longest one) have
`valid == False`. Padding goes to the start of a row (left padding, so the last column stays the
last prompt token, as generation needs) unless the batch was right-padded to begin with.

Everything is vectorised over the batch; the only host-side numbers are the per-image token
counts, known from the budgets without reading device memory, and the per-sample lengths, which
a *static* (graph-safe) layout leaves on the device: there each reduction shortens the padded
rows by the smallest per-sample drop (host, from the budgets), and shorter samples get more
padding rows instead of a host read of their lengths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image's (or sub-image's) run of placeholder tokens in the original sequence.

    grid:   (rows, cols) of the tokens a reducer may select, in raster order.
    length: placeholder tokens in the run (default rows * cols). Extra tokens are *pinned*: visual
            tokens that are always kept and never offered to reducers (LLaVA-NeXT's row-end
            `image_newline` tokens).
    inner:  with pinned tokens, the grid index of each run position (-1 for a pinned one).
    share:  the share of an int budget this span gets (LLaVA-NeXT: base image vs crops).
    base:   for a sub-image that is a detail view of another span (LLaVA-NeXT's crops), the index of
            the span holding the image's base view in the call's span list; else None.
    part:   for one frame of a video, (frame, frames): an int budget is the video's, split evenly
            over its frames (`reducers.base.scaled`); else None.
    """

    sample: int
    start: int
    grid: tuple[int, int]
    length: int | None = None
    inner: tuple[int, ...] | None = None
    share: float = 1.0
    base: int | None = None
    part: tuple[int, int] | None = None

    @property
    def n(self) -> int:
        """Placeholder tokens in the run."""
        return self.length if self.length is not None else self.grid[0] * self.grid[1]

    @property
    def pinned(self) -> int:
        return self.n - self.grid[0] * self.grid[1]


@dataclass
class Layout:
    """Row layout of the LLM sequence (see module docstring). Shapes are (B, L) unless noted."""

    index: torch.Tensor  # long: original column of each row; `orig_len` on added padding rows
    valid: torch.Tensor  # bool: the row holds a real (attended) token
    image: torch.Tensor  # long: global image id of visual rows, -1 elsewhere
    size: torch.Tensor  # float: original tokens the row stands for (1 unless merged)
    lengths: list[int] | None  # host: valid rows per sample (None in a static layout: see `len_t`)
    counts: list[int]  # host: visual rows per image (pinned ones included)
    orig_len: int
    right_align: bool | torch.Tensor  # padding rows at the start of each row (a 0-d bool tensor if static)
    entry: list[int] | None = None  # host: selectable visual rows per image entering the LLM (after boundary)
    len_t: torch.Tensor | None = None  # (B,) long, device: valid rows per sample
    starts: torch.Tensor | None = None  # (n_img,) long, device: first original column of each image
    # (n_img,) long, device: visual rows per image where the content decided them in a static layout
    # (ToDRE's stage 2); `counts` then holds host upper bounds, and rows past count_t are padding
    count_t: torch.Tensor | None = None

    @property
    def static(self) -> bool:
        """True when the per-sample lengths live on the device only (graph-safe prefill)."""
        return self.lengths is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]

    @staticmethod
    def initial(valid: torch.Tensor, spans: list[ImageSpan], lengths: list[int] | None,
                right_align: bool | torch.Tensor, starts: torch.Tensor | None = None) -> Layout:
        """The layout of an unreduced batch: row r holds column r.

        right_align: the batch is left-padded (its last column is real everywhere), so padding that
        reductions add goes to the start of each row too.
        lengths / starts: host lengths per sample and the spans' host starts, or (static layout)
        None and the images' first columns as a device tensor.
        """
        b, length = valid.shape
        device = valid.device
        if starts is None:
            starts = torch.tensor([s.start for s in spans], dtype=torch.long)
        starts = starts.to(device)
        n = torch.tensor([s.n for s in spans], dtype=torch.long, device=device)
        sample = torch.tensor([s.sample for s in spans], dtype=torch.long, device=device)
        j = torch.arange(max((s.n for s in spans), default=0), device=device)
        cell = torch.where(j < n[:, None], sample[:, None] * length + starts[:, None] + j, b * length)
        ids = torch.arange(len(spans), device=device)[:, None].expand_as(cell)
        image = torch.full((b * length + 1,), -1, dtype=torch.long, device=device)
        image = image.scatter(0, cell.reshape(-1), ids.reshape(-1))[:-1].view(b, length)
        return Layout(
            index=torch.arange(length, device=device).expand(b, length),
            valid=valid,
            image=image,
            size=torch.ones(b, length, device=device),
            lengths=None if lengths is None else list(lengths),
            counts=[s.n for s in spans],
            orig_len=length,
            right_align=right_align,
            entry=[s.n - s.pinned for s in spans],
            len_t=valid.sum(1),
            starts=starts,
        )


def gather_rows(x: torch.Tensor, src: torch.Tensor, fill: float | int | bool = 0, dim: int = 1) -> torch.Tensor:
    """Rows `src` (B, L') of `x` along `dim` (the sequence dim, batch at dim-1); src == L means padding."""
    dim = dim % x.dim()
    if x.shape[dim - 1] == 1 and src.shape[0] > 1:  # e.g. position ids / embeddings shared by the batch
        shape = list(x.shape)
        shape[dim - 1] = src.shape[0]
        x = x.expand(shape)
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    padded = torch.cat([x, torch.full(pad_shape, fill, dtype=x.dtype, device=x.device)], dim=dim)
    idx = src.to(x.device)
    # idx is (B, L'); broadcast it to x's shape around the batch and sequence dims.
    view = [1] * x.dim()
    view[dim - 1], view[dim] = idx.shape
    idx = idx.view(view)
    expand = list(x.shape)
    expand[dim] = idx.shape[dim]
    return padded.gather(dim, idx.expand(expand))


def image_rows(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices (into B*L) of each image's tokens, (n_img, N), and their validity mask.

    An image's rows are contiguous in every layout (reductions only drop rows), so each image is
    a start row plus its count.
    """
    b, length = layout.shape
    device = layout.valid.device
    n_img = len(layout.counts)
    flat_pos = torch.arange(b * length, device=device)
    img = layout.image.reshape(-1)
    bucket = torch.where(img >= 0, img, n_img)
    start = torch.full((n_img + 1,), b * length, dtype=torch.long, device=device)
    start = start.scatter_reduce(0, bucket, flat_pos, reduce="amin")[:n_img]
    n_max = max(layout.counts, default=0)
    j = torch.arange(n_max, device=device)
    counts = layout.count_t if layout.count_t is not None else torch.tensor(layout.counts, device=device,
                                                                            dtype=torch.long)
    valid = j < counts[:, None]
    flat = (start[:, None] + j).clamp_max(b * length - 1)
    return flat, valid


@dataclass
class Compaction:
    """Result of dropping rows: the new layout and, per new row, the old row it came from."""

    layout: Layout
    src: torch.Tensor  # (B, L') old row of each new row; old L on padding rows
    dropped: torch.Tensor  # (B, L_old) bool: valid rows that were removed
    changed: bool  # False when nothing was dropped (the old layout is returned as is)


def compact(layout: Layout, keep_rows: torch.Tensor, drops: list[int], drops_t: torch.Tensor | None = None
            ) -> Compaction:
    """Drop the rows where `keep_rows` is False (B, L), re-padding to the longest sample.

    `drops` are the valid rows each sample loses (known on the host from the budgets). With host
    lengths the new row count is the longest sample's; in a static layout it is the old count minus
    the smallest drop, an upper bound that needs no device read (shorter samples get more padding).
    drops_t: (B,) device drops where the content decides them (static layouts only); `drops` are then
    their host lower bounds, and the rows are always re-laid (nothing on the host says none dropped).
    """
    b, length = layout.shape
    device = keep_rows.device
    keep_rows = keep_rows & layout.valid
    dropped = layout.valid & ~keep_rows
    if not any(drops) and drops_t is None:
        src = torch.arange(length, device=device).expand(b, length)
        return Compaction(layout, src, dropped, changed=False)
    if drops_t is not None and layout.lengths is not None:
        raise ValueError("device-side drops need a static layout (host lengths would need a read)")
    lengths = None if layout.lengths is None else [n - d for n, d in zip(layout.lengths, drops)]
    new_len = max(lengths, default=0) if lengths is not None else length - min(drops, default=0)
    len_t = layout.len_t - (drops_t if drops_t is not None else torch.tensor(drops, dtype=torch.long, device=device))
    dest = keep_rows.long().cumsum(1) - 1
    ra = layout.right_align
    if isinstance(ra, torch.Tensor):
        dest = dest + ((new_len - len_t) * ra.long())[:, None]
    elif ra:
        dest = dest + (new_len - len_t)[:, None]
    dest = torch.where(keep_rows, dest, new_len)
    src = torch.full((b, new_len + 1), length, dtype=torch.long, device=device)
    src.scatter_(1, dest, torch.arange(length, device=device).expand(b, length).contiguous())
    src = src[:, :new_len]
    new = Layout(
        index=gather_rows(layout.index, src, fill=layout.orig_len),
        valid=gather_rows(layout.valid, src, fill=False),
        image=gather_rows(layout.image, src, fill=-1),
        size=gather_rows(layout.size, src, fill=0.0),
        lengths=lengths,
        counts=list(layout.counts),
        orig_len=layout.orig_len,
        right_align=layout.right_align,
        entry=layout.entry,
        len_t=len_t,
        starts=layout.starts,
        count_t=layout.count_t,
    )
    return Compaction(new, src, dropped, changed=True)


def expand_to_original(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Re-expand per-row outputs (B, L', ...) to the original length (B, L, ...).

    A dropped column takes the output of the closest kept row before it: for logits that is the
    model's next-token prediction after the reduced prefix, which is what a caller reading
    `logits[:, t]` to score token t+1 needs. Columns with no kept row before them get zeros.
    """
    b, rows = layout.shape
    length = layout.orig_len
    device = x.device
    col = torch.where(layout.valid, layout.index, length).to(device)
    row_of_col = torch.full((b, length + 1), -1, dtype=torch.long, device=device)
    row_of_col.scatter_(1, col, torch.arange(rows, device=device).expand(b, rows).contiguous())
    row_of_col = row_of_col[:, :length].cummax(dim=1).values
    src = torch.where(row_of_col < 0, rows, row_of_col)
    return gather_rows(x, src, fill=0)


def per_sample(spans: list[ImageSpan], counts: list[int], batch: int) -> list[int]:
    """Per-sample totals of per-image (per-span) host counts."""
    out = [0] * batch
    for span, n in zip(spans, counts):
        out[span.sample] += n
    return out


def host_lengths(layout: Layout) -> list[int]:
    """Valid rows per sample on the host: a static layout's are read from the device (statistics
    only, never in the forward)."""
    if layout.lengths is not None:
        return list(layout.lengths)
    return layout.len_t.tolist()  # type: ignore[union-attr]


def host_counts(layout: Layout) -> list[int]:
    """Visual rows per image on the host: read from the device where the content decided them in a
    static layout (`Layout.count_t`; statistics only, never in the forward)."""
    return list(layout.counts) if layout.count_t is None else layout.count_t.tolist()


def layer_counts(starts: dict[int, Layout], layers: int, lengths: list[int], spans: list[ImageSpan]
                 ) -> list[tuple[list[int], list[int]]]:
    """Per LLM layer, (rows per sample, visual rows per sample) of the layouts that start at each
    layer (`starts`: layer -> layout; layer 0 is the boundary). No device read but a static
    layout's lengths (`host_lengths`)."""
    batch = len(lengths)
    cur = (list(lengths), per_sample(spans, [s.n for s in spans], batch))
    out = []
    for i in range(layers):
        if i in starts:
            cur = (host_lengths(starts[i]), per_sample(spans, host_counts(starts[i]), batch))
        out.append(cur)
    return out


@dataclass
class Applied:
    """One selection written into the ledger: the new layout, each new row's old row, and the hidden
    states carried over (merged values written in)."""

    layout: Layout
    hidden: torch.Tensor  # (B, L', d)
    src: torch.Tensor  # (B, L') old row of each new row; old L on padding
    dropped: torch.Tensor  # (B, L_old) valid rows removed
    changed: bool
    merged: bool  # some kept row carries new values
    carried: torch.Tensor | None = None  # (B, L', C) the features carried beside the rows, if any


def apply(layout: Layout, hidden: torch.Tensor, rows: torch.Tensor, real: torch.Tensor, keep: torch.Tensor,
          counts: list[int], spans: list[ImageSpan], values: torch.Tensor | None = None,
          sizes: torch.Tensor | None = None, carried: torch.Tensor | None = None,
          mix: torch.Tensor | None = None, counts_t: torch.Tensor | None = None) -> Applied:
    """Write a per-image selection into the layout and drop the rows it does not keep.

    rows / real: the images' flat row indices and which are selectable (`image_rows`, pinned tokens
    excluded); keep: (n_img, N) kept slots; counts: kept tokens per image (host, from the budgets);
    values / sizes: new features and sizes of kept slots (merging), or None.
    carried: (B, L, C) per-row features that follow the rows (Qwen3-VL's deepstack), combined by the
    merge's weights `mix` ((n_img, N, N), `Selection.mix`) where `values` are given.
    counts_t: (n_img,) device counts of a reducer whose content decides them, in a static layout
    (`counts` are then host upper bounds): the rows it drops become padding, no host read.
    """
    b, length = layout.shape
    idx = torch.where(real, rows, b * length).reshape(-1)  # slot b*L: a dump for non-selectable slots

    def scatter(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([base.reshape(b * length, *base.shape[2:]), base.new_zeros(1, *base.shape[2:])])
        flat.index_copy_(0, idx, new.reshape(idx.shape[0], *base.shape[2:]).to(flat.dtype))
        return flat[:-1].view(base.shape)

    keep_rows = scatter(layout.valid, keep & real)
    if values is not None:
        hidden = scatter(hidden, values)
    size = layout.size if sizes is None else scatter(layout.size, sizes)
    drops = [0] * b
    for span, n, k in zip(spans, layout.counts, counts):
        drops[span.sample] += n - span.pinned - k
    if carried is not None and values is not None:
        if mix is None:
            raise ValueError("merged values without their weights (Selection.mix) cannot carry features")
        slots = carried.reshape(b * length, -1)[rows].masked_fill(~real[..., None], 0)
        carried = scatter(carried, torch.bmm(mix.float(), slots.float()).to(carried.dtype))
    drops_t = None
    if counts_t is not None:
        device = counts_t.device
        pinned = torch.tensor([s.pinned for s in spans], dtype=torch.long, device=device)
        before = layout.count_t if layout.count_t is not None else torch.tensor(layout.counts, dtype=torch.long,
                                                                                  device=device)
        owner = torch.tensor([s.sample for s in spans], dtype=torch.long, device=device)
        drops_t = torch.zeros(b, dtype=torch.long, device=device).index_add(0, owner, before - pinned - counts_t)
    comp = compact(dataclasses.replace(layout, size=size), keep_rows, drops, drops_t)
    comp.layout.counts = [k + s.pinned for k, s in zip(counts, spans)]
    if counts_t is not None:
        comp.layout.count_t = counts_t + pinned
    if comp.changed:
        hidden = gather_rows(hidden, comp.src, fill=0)
        carried = None if carried is None else gather_rows(carried, comp.src, fill=0)
    return Applied(comp.layout, hidden, comp.src, comp.dropped, comp.changed, values is not None, carried)


def renumbering(dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For `renumber=True`: per old row, how many rows before it were dropped (subtract from its
    position id), and per sample how many were dropped in all (subtract from later tokens')."""
    d = dropped.long()
    return d.cumsum(1) - d, d.sum(1)
