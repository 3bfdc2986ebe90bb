"""DyMU virtual token unmerging (VTU) in a 1-D-RoPE LLM (Wang et al., 2025, §3.2).

After encoder merging, each merged group reaches the LLM as one *unique* token, but attention is
computed as if every original token (each at its own position) were present: the *virtual*
sequence is the unreduced one, row v being a copy of unique row `to_unique[v]`. Per-token work
(norms, projections, MLP) runs on unique rows; attention runs over the virtual rows; each unique
row's attention output is the mean over its copies.

- "expand" (the official code's default; hooks only, the attention kernel is kept): a pre-hook on
  each `self_attn` hands it the virtual row count, the virtual rotary embeddings and mask; hooks on
  q/k/v_proj project the unique rows and expand the results to the virtual rows; a pre-hook on
  `o_proj` averages the copies. The KV cache holds the virtual rows, so decoding needs nothing more.
- "exact" (the paper's decomposition): a registered attention function computes, per rotary
  frequency f, from *unrotated* unique q/k,
      A = C M(Q.K)M^T C + S M(Q.K)M^T S + S M(QxK)M^T C - C M(QxK)M^T S
  (Q.K = q1 k1 + q2 k2, QxK = q1 k2 - q2 k1 over the frequency's two components; C, S the diagonal
  cos / sin of each virtual position; M the copy matrix), then softmax over virtual keys, M V, and the
  mean over each query's copies. The cache holds unique (unrotated) rows; rotary embeddings given to
  the layers are the identity so that the function applies them itself.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtoken.adapters.hf import compat
from vtoken.ledger import Layout, image_rows
from vtoken.ops.merge import representatives
from vtoken.reducers.base import SignalRequest

if TYPE_CHECKING:
    from vtoken.adapters.hf_vlm import HFVisionLanguageAdapter

EXACT = "vtoken_vtu_exact"
# attention module -> its adapter, both held weakly (the adapter refers to the model: a strong value
# would keep every exact-VTU model alive)
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[HFVisionLanguageAdapter]] = weakref.WeakKeyDictionary()


@dataclass
class VirtualMap:
    """The virtual (unreduced) sequence of a prefill over its unique rows."""

    to_unique: torch.Tensor  # (B, Lv) unique row of each virtual row; Lu on padding
    valid: torch.Tensor  # (B, Lv)
    pos: torch.Tensor  # (B, Lv) position ids of the virtual rows
    copies: torch.Tensor  # (B, Lu) virtual copies of each unique row
    unique: int  # Lu
    next_pos: torch.Tensor  # (B,) position id of the first token after the prompt


def build_map(to_unique: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, unique: int) -> VirtualMap:
    b = to_unique.shape[0]
    idx = torch.where(valid, to_unique, unique)
    copies = torch.zeros(b, unique + 1, device=idx.device).scatter_add_(1, idx, valid.float())[:, :unique]
    next_pos = torch.where(valid, pos, -1).amax(1) + 1
    return VirtualMap(idx, valid, pos, copies, unique, next_pos)



def virtual_map(adapter: HFVisionLanguageAdapter, original: Layout, src: torch.Tensor, reduced: Layout,
                pos: torch.Tensor) -> VirtualMap:
    """The virtual sequence of a boundary reduction after encoder merging: each original row -> the
    reduced (unique) row holding its merged group's representative."""

    b, length = original.shape
    device = original.valid.device
    unique = reduced.shape[1]
    to_row = torch.full((b, length + 1), unique, dtype=torch.long, device=device)
    to_row.scatter_(1, src, torch.arange(unique, device=device).expand(b, unique).contiguous())
    rep_row = torch.arange(length, device=device).expand(b, length).contiguous()
    groups = adapter.vision_signal(SignalRequest("encoder_groups", -1))
    n = groups.shape[1]
    ones = torch.ones_like(groups, dtype=torch.bool)
    rep, _ = representatives(groups, ones, torch.arange(n, device=device).expand_as(groups))
    flat, valid = image_rows(original)
    starts = torch.tensor([s.start for s in adapter.call.spans], device=device)
    rep_row.view(-1)[flat[valid]] = (starts[:, None] + rep)[valid]
    to_unique = to_row.gather(1, rep_row)
    return build_map(to_unique, original.valid, pos.expand(b, length), unique)

class VirtualUnmerge:
    """Installs VTU on the decoder layers of an HF LLM (see module docstring)."""

    def __init__(self, adapter: HFVisionLanguageAdapter, mode: str) -> None:
        self.adapter = adapter
        self.mode = mode
        self._saved_impl: str | None = None

    # --- installation ------------------------------------------------------------------------------
    def install(self, handles: list[Any]) -> None:
        layers = self.adapter.layers
        for layer in layers:
            attn = layer.self_attn
            handles.append(attn.register_forward_pre_hook(self._attn_pre, with_kwargs=True))
            if self.mode == "expand":
                for name in ("q_proj", "k_proj", "v_proj"):
                    proj = getattr(attn, name)
                    handles.append(proj.register_forward_pre_hook(self._proj_in))
                    handles.append(proj.register_forward_hook(self._proj_out))
                handles.append(attn.o_proj.register_forward_pre_hook(self._o_in))
            else:
                _OWNERS[attn] = weakref.ref(self.adapter)
        if self.mode == "exact":
            compat.register_attention(EXACT, exact_attention)
            cfg = self.adapter.text_config()
            self._saved_impl = cfg._attn_implementation
            cfg._attn_implementation = EXACT
            handles.append(_Restore(cfg, self._saved_impl, [layer.self_attn for layer in layers]))

    # --- expand mode -------------------------------------------------------------------------------
    def _attn_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self.adapter.call
        vmap: VirtualMap | None = call.vtu
        if self.mode == "exact":
            if call.mode not in ("prefill", "decode") or (call.mode == "prefill" and vmap is None):
                return None
            if call.mode == "decode" and call.decode.vtu is None:
                return None
            cos, sin = kwargs["position_embeddings"]
            return args, dict(kwargs, position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))
        if call.mode != "prefill" or vmap is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        call.vtu_hidden = hidden
        b, lv = vmap.to_unique.shape
        placeholder = hidden[:, :1].expand(b, lv, hidden.shape[-1])  # shape only: projections read `hidden`
        if call.vtu_rope is None:
            call.vtu_rope = self.adapter.rotary(hidden, vmap.pos)
            names = self.adapter.names
            call.vtu_mask = names.causal_mask(
                self.adapter.text_config(), placeholder, vmap.valid, names.cache(kwargs, "layer"),
                position_ids=vmap.pos, layer_idx=module.layer_idx,
            )
        kwargs = dict(kwargs, position_embeddings=call.vtu_rope, attention_mask=call.vtu_mask)
        if args:
            return (placeholder, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=placeholder)

    def _active(self) -> VirtualMap | None:
        call = self.adapter.call
        return call.vtu if call.mode == "prefill" else None

    def _proj_in(self, module: nn.Module, args: tuple) -> Any:
        if self._active() is None:
            return None
        return (self.adapter.call.vtu_hidden, *args[1:])

    def _proj_out(self, module: nn.Module, args: tuple, out: torch.Tensor) -> Any:
        vmap = self._active()
        if vmap is None:
            return None
        pad = torch.cat([out, out.new_zeros(out.shape[0], 1, out.shape[2])], 1)
        return pad.gather(1, vmap.to_unique[..., None].expand(-1, -1, out.shape[2]))

    def _o_in(self, module: nn.Module, args: tuple) -> Any:
        vmap = self._active()
        if vmap is None:
            return None
        x = args[0]
        b, _, d = x.shape
        idx = vmap.to_unique[..., None].expand(-1, -1, d)
        acc = torch.zeros(b, vmap.unique + 1, d, device=x.device, dtype=torch.float32)
        acc.scatter_add_(1, idx, x.float() * vmap.valid[..., None])
        mean = acc[:, :-1] / vmap.copies.clamp_min(1)[..., None]
        return (mean.to(x.dtype), *args[1:])


class _Restore:
    """Removal handle: puts the LLM's attention implementation back (exact mode)."""

    def __init__(self, cfg: Any, impl: str, modules: list[nn.Module]) -> None:
        self.cfg, self.impl, self.modules = cfg, impl, modules

    def remove(self) -> None:
        if self.cfg._attn_implementation == EXACT:
            self.cfg._attn_implementation = self.impl
        for m in self.modules:
            _OWNERS.pop(m, None)
        if not _OWNERS:  # the last patch using it is gone: take the global registration back
            compat.unregister_attention(EXACT)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Restore:
        """A deep copy of the patched model: its attention modules are managed by the copied adapter."""
        new = _Restore(copy.deepcopy(self.cfg, memo), self.impl, copy.deepcopy(self.modules, memo))
        memo[id(self)] = new
        for old, twin in zip(self.modules, new.modules):
            ref = _OWNERS.get(old)
            owner = None if ref is None else ref()
            if owner is not None:
                _OWNERS[twin] = weakref.ref(copy.deepcopy(owner, memo))
        return new


def _rope_cs(adapter: HFVisionLanguageAdapter, like: torch.Tensor,
             pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin per frequency, (B, L, hd/2) in float32, as the model's rotary module defines them."""
    cos, sin = adapter.rotary(like, pos)
    half = cos.shape[-1] // 2
    return cos[..., :half].float(), sin[..., :half].float()


def exact_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over the virtual sequence from unique, unrotated q/k (the VTU decomposition)."""
    ref = _OWNERS.get(module)
    adapter = None if ref is None else ref()
    if adapter is None:
        raise RuntimeError("vtoken's exact VTU attention was called for a module it does not manage")
    call = adapter.call
    b, h, lq, hd = query.shape
    lk = key.shape[2]
    device = query.device
    if call.mode == "prefill":
        vm: VirtualMap = call.vtu
        q_rows, qpos, qvalid = vm.to_unique, vm.pos, vm.valid
        k_rows, kpos, kvalid = vm.to_unique, vm.pos, vm.valid
    else:  # decode: prefix (unique rows, virtually expanded) + the tokens appended since
        vm = call.decode.vtu
        t = lk - vm.unique
        appended = torch.arange(t, device=device)
        k_rows = torch.cat([vm.to_unique, (vm.unique + appended)[None].expand(b, t)], 1)
        kpos = torch.cat([vm.pos, vm.next_pos[:, None] + appended[None]], 1)
        kvalid = torch.cat([vm.valid, adapter.decode_tail(b, t, device)], 1)
        q_rows = torch.arange(lq, device=device)[None].expand(b, lq)
        qpos = call.orig_pos.to(device).expand(b, lq)
        qvalid = torch.ones(b, lq, dtype=torch.bool, device=device)
    groups = h // key.shape[1]
    k = key.repeat_interleave(groups, 1).float()
    v = value.repeat_interleave(groups, 1).float()
    q = query.float()
    half = hd // 2
    cq, sq = _rope_cs(adapter, query, qpos)  # (B, Qv, F)
    ck, sk = _rope_cs(adapter, query, kpos)  # (B, Kv, F)
    q_pad = torch.cat([q, q.new_zeros(b, h, 1, hd)], 2)  # last row: padding
    k_pad = torch.cat([k, k.new_zeros(b, h, 1, hd)], 2)
    v_pad = torch.cat([v, v.new_zeros(b, h, 1, hd)], 2)
    q_rows = q_rows.clamp(0, lq)
    k_rows = k_rows.clamp(0, lk)
    logits = torch.zeros(b, h, q_rows.shape[1], k_rows.shape[1], device=device)
    bi = torch.arange(b, device=device)[:, None, None]
    for f0 in range(0, half, 16):  # frequencies in chunks; products over unique rows, then M (.) M^T
        fs = slice(f0, min(half, f0 + 16))
        q1, q2 = q_pad[..., fs], q_pad[..., half:][..., fs]
        k1, k2 = k_pad[..., fs], k_pad[..., half:][..., fs]
        dot = q1[:, :, :, None] * k1[:, :, None] + q2[:, :, :, None] * k2[:, :, None]  # Q.K per frequency
        crs = q1[:, :, :, None] * k2[:, :, None] - q2[:, :, :, None] * k1[:, :, None]  # QxK per frequency
        dot = dot[bi, :, q_rows[:, :, None], k_rows[:, None, :]].permute(0, 3, 1, 2, 4)
        crs = crs[bi, :, q_rows[:, :, None], k_rows[:, None, :]].permute(0, 3, 1, 2, 4)
        cq_, sq_ = cq[:, None, :, None, fs], sq[:, None, :, None, fs]
        ck_, sk_ = ck[:, None, None, :, fs], sk[:, None, None, :, fs]
        logits += (dot * (cq_ * ck_ + sq_ * sk_) + crs * (sq_ * ck_ - cq_ * sk_)).sum(-1)
    scale = scaling if scaling is not None else hd**-0.5
    allowed = kvalid[:, None, None, :] & (kpos[:, None, None, :] <= qpos[:, None, :, None])
    allowed &= qvalid[:, None, :, None]
    probs = (logits * scale).masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    v_virtual = v_pad.gather(2, k_rows[:, None, :, None].expand(-1, h, -1, hd))  # M V
    out_v = probs @ v_virtual  # (B, H, Qv, hd)
    if call.mode == "prefill":  # mean over each unique row's copies
        idx = torch.where(qvalid, q_rows, vm.unique)
        acc = torch.zeros(b, h, vm.unique + 1, hd, device=device)
        acc.scatter_add_(2, idx[:, None, :, None].expand(-1, h, -1, hd), out_v)
        out = acc[:, :, :-1] / vm.copies.clamp_min(1)[:, None, :, None]
    else:
        out = out_v
    return out.transpose(1, 2).to(query.dtype).contiguous(), None
