"""Encoder-stage merging: ops against brute force, exactness, LLaVA / timm / open_clip, VTU, calibration."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import N_IMG, make_batch, make_prompt, pixels, positions

import vtoken
from vtoken.eval.calibrate import calibrate, shapes_images
from vtoken.eval.tiny import IMAGE_TOKEN, tiny_llava
from vtoken.ops.merge import (
    bipartite_plan,
    energy,
    energy_plan,
    expand,
    merge,
    merge_sizes,
    solve_schedule,
    tome_schedule,
)

# --- ops ---------------------------------------------------------------------------------------------


def test_bipartite_matching_picks_the_best_pairs():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 11, 5, generator=g)
    counts = [11, 8]
    plan, _ = bipartite_plan(metric, counts, [3, 2], protect=1)
    for b, (n, r) in enumerate(zip(counts, [3, 2])):
        m = F.normalize(metric[b, :n], dim=-1)
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        best = {a: max(b_idx, key=lambda j: float(m[a] @ m[j])) for a in a_idx if a != 0}
        score = {a: float(m[a] @ m[best[a]]) for a in best}
        merged = sorted(score, key=score.get, reverse=True)[:r]
        dest = plan.dest[b]
        for a in merged:  # a merged token shares its best partner's slot
            assert dest[a] == dest[best[a]]
        survivors = [t for t in range(n) if t not in merged]
        assert len({int(dest[t]) for t in survivors}) == len(survivors) == plan.counts[b] == n - r
        assert dest[0] == 0  # CLS keeps slot 0
        assert (dest[n:] == plan.length).all()  # padding goes to the dump slot


def test_merging_identical_tokens_changes_nothing_and_sizes_sum():
    x = torch.randn(1, 1, 4).expand(1, 9, 4).contiguous()
    plan, _ = bipartite_plan(torch.randn(1, 9, 3), [9], [4], protect=1)
    size = torch.ones(1, 9)
    out = merge(x, plan, size)
    torch.testing.assert_close(out, x[:, :5])
    new_size = merge_sizes(size, plan)
    assert new_size.sum() == 9 and new_size.shape[1] == 5
    torch.testing.assert_close(expand(out, plan), x)


def test_pitome_energy_protects_isolated_tokens():
    # tokens 1-4 near-duplicates (high energy), 5-6 isolated; token 0 is CLS
    base = torch.tensor([1.0, 0.0, 0.0])
    metric = torch.stack([torch.tensor([0.0, 0, 1]), base, base * 1.01, base + 0.01, base - 0.01,
                          torch.tensor([0.0, 1, 0]), torch.tensor([0.0, -1, 0.2])])[None]
    e = energy(metric, [7], margin=0.5)
    assert torch.isinf(e[0, 0]) and e[0, 1:5].min() > e[0, 5:].max()
    plan = energy_plan(metric, [7], [2], margin=0.5)
    d = plan.dest[0]
    assert d[0] == 0 and plan.counts == [5]
    assert len({int(d[5]), int(d[6])}) == 2 and not ({int(d[5]), int(d[6])} & {int(x) for x in d[1:5]})
    assert len({int(x) for x in d[1:5]}) == 2  # the four duplicates merged pairwise
    paper = energy(metric, [7], margin=0.5, variant="paper")
    assert not torch.allclose(paper[0, 1:], e[0, 1:])


def test_schedules():
    assert tome_schedule(8, 3) == [8, 8, 8]
    assert tome_schedule((8, 0.5), 3) == [4, 8, 12]  # ToMe parse_r: lo=int(8*0.5), hi=2*8-lo
    assert tome_schedule([3, 1], 4) == [3, 1, 0, 0]
    r = solve_schedule(576, 64, 23)
    assert sum(r) == 512 and max(r) - min(r) <= 1
    r = solve_schedule(576, 72, 3)
    t = 577
    for x in r:
        assert x <= (t - 1) // 2
        t -= x
    assert t - 1 == 72
    with pytest.raises(ValueError):
        solve_schedule(576, 10, 2)


# --- exactness ----------------------------------------------------------------------------------------


def tiny_clip(image_size: int = 64, layers: int = 3) -> torch.nn.Module:
    text = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    vision = {"image_size": image_size, "layers": layers, "width": 64, "patch_size": 16, "head_width": 16}
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def test_r0_and_infinite_thresholds_are_bit_identical_on_all_three_families():
    batch = make_batch([make_prompt(1, seed=1), make_prompt(2, seed=2)])
    llava, px = tiny_llava(), pixels(3)
    with torch.no_grad():
        ref = llava(**batch, pixel_values=px).logits
        for name, kw in [("tome", {"r": 0}), ("dymu", {"thresholds": [float("inf")] * 3}), ("pitome", {"ratio": 1.0})]:
            with vtoken.patch(llava, name, **kw):
                assert torch.equal(llava(**batch, pixel_values=px).logits, ref), name
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=64).eval()
        x = torch.randn(2, 3, 64, 64)
        ref = vit(x)
        with vtoken.patch(vit, "tome", r=0):
            assert torch.equal(vit(x), ref)
        clip = tiny_clip()
        ref = clip.encode_image(x)
        with vtoken.patch(clip, "dymu", thresholds=[float("inf")] * 3):
            assert torch.equal(clip.encode_image(x), ref)


def reference_tome_block(blk, x, size, r):
    """ToMe's block computed directly (not through hooks): attention with log-size bias, merge, MLP."""
    b, t, d = x.shape
    h = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    att = (q @ k.transpose(-1, -2)) * blk.attn.scale + size.log()[:, None, None, :]
    y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    x = x + blk.attn.proj(y)
    plan, _ = bipartite_plan(k.mean(1), [t] * b, [r] * b, protect=1)
    xm = merge(x, plan, size)
    return xm + blk.mlp(blk.norm2(xm)), merge_sizes(size, plan)


def test_hook_merging_equals_merging_before_the_mlp():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        size = torch.ones(2, tokens.shape[1])
        ref = tokens
        for blk in vit.blocks:
            ref, size = reference_tome_block(blk, ref, size, 2)
        ref_logits = vit.forward_head(vit.norm(ref))
        with vtoken.patch(vit, "tome", r=2) as p:
            got = vit(x)
            assert p.stats.vision_tokens[:3] == [17.0, 15.0, 13.0]
    torch.testing.assert_close(got, ref_logits, atol=1e-5, rtol=1e-4)


def test_timm_and_open_clip_outputs_keep_their_shape():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=96).eval()
    clip = tiny_clip(image_size=96, layers=4)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        with vtoken.patch(vit, "tome", r=16) as p:
            assert vit(x).shape == (3, 7)
            assert p.stats.vision_tokens[0] == 37 and p.stats.vision_tokens[-1] < 10
        with vtoken.patch(clip, "pitome", ratio=0.8) as p:
            assert clip.encode_image(x).shape == (3, 32)
            assert p.stats.vision_tokens[-1] < 37 and p.stats.flops["vision"] > 0
        with pytest.raises(vtoken.UnsupportedModelError, match="timm adapter does not support"):
            vtoken.patch(vit, "random", keep=4)


# --- LLaVA --------------------------------------------------------------------------------------------


def test_source_maps_cover_every_token_once(llava):
    batch = make_batch([make_prompt(1, seed=1), make_prompt(2, seed=2)])
    with vtoken.patch(llava, "tome", r=5) as p, torch.no_grad():
        llava(**batch, pixel_values=pixels(3))
        groups = p.adapter.vision_capture["groups"]  # (images, N): merged token of each patch
        kept = p.kept_positions()
    n_left = N_IMG - 2 * 5  # two merge layers (feature layer -2 of 3)
    for g, k in zip(groups, kept):
        assert sorted(set(g.tolist())) == list(range(n_left))  # every patch in exactly one survivor
        assert len(k) == n_left
        firsts = [int((g == s).nonzero()[0]) for s in range(n_left)]
        assert sorted(firsts) == k.tolist()  # each survivor sits at its group's first position
    with vtoken.patch(llava, "tome", r=5) as p, torch.no_grad():
        llava(**batch, pixel_values=pixels(3))
        assert p.stats.visual_tokens == [n_left, 2 * n_left]


@pytest.mark.parametrize("name,params", [("tome", {"r": 6}), ("pitome", {"keep": 12}), ("tome", {"keep": 9}),
                                         ("tome", {"r": 6, "vtu": "expand"}), ("tome", {"r": 6, "vtu": "exact"}),
                                         ("dymu", {"thresholds": [0.5, 0.5, 0.5]})])
def test_llava_cached_decode_equals_recompute_with_merging(llava, name, params):
    prompts = [make_prompt(1, text=4, seed=1), make_prompt(2, text=6, seed=2), make_prompt(0, text=9, seed=3)]
    batch = make_batch(prompts)
    px = pixels(3, seed=5)
    n = batch["input_ids"].shape[1]
    with vtoken.patch(llava, name, **params), torch.no_grad():
        out = llava.generate(**batch, pixel_values=px, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])
        seq = out.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones(3, seq.shape[1] - n, dtype=torch.long)], 1)
        full = llava(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=px,
                     position_ids=positions(mask[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", [("tome", {"r": 6}), ("dymu", {"thresholds": [0.3, 0.3, 0.3]}),
                                         ("tome", {"r": 6, "vtu": "expand"})])
def test_llava_batch_equals_alone_with_merging(llava, name, params):
    prompts = [make_prompt(1, text=4, seed=1), make_prompt(2, text=6, seed=2), make_prompt(0, text=9, seed=3)]
    px = pixels(3, seed=5)
    img_of = [[0], [1, 2], []]
    with vtoken.patch(llava, name, **params) as p, torch.no_grad():
        together = llava(**make_batch(prompts), pixel_values=px).logits
        counts = p.stats.visual_tokens
        for b, prompt in enumerate(prompts):
            kw = {"pixel_values": px[img_of[b]]} if img_of[b] else {}
            alone = llava(input_ids=torch.tensor([prompt]), **kw).logits
            torch.testing.assert_close(together[b, -len(prompt):][-3:], alone[0][-3:], atol=5e-5, rtol=1e-4)
            assert p.stats.visual_tokens[0] == counts[b]
    if name == "dymu":  # content-dependent: the two images of sample 1 need not match sample 0's count
        assert counts[2] == 0 and counts[0] < N_IMG


def test_vtu_exact_equals_expand_equals_full_length_reference(llava):
    batch = make_batch([make_prompt(1, text=5, seed=1), make_prompt(2, text=3, seed=2)])
    px = pixels(3, seed=2)
    with torch.no_grad():
        logits = {}
        for mode in ("expand", "exact"):
            with vtoken.patch(llava, "tome", r=6, vtu=mode) as p:
                logits[mode] = llava(**batch, pixel_values=px).logits
                assert p.stats.visual_tokens == [24, 48]
        assert llava.model.language_model.config._attn_implementation == "sdpa"
        # reference: the unpatched LLM over all original rows (each patch carrying its merged token),
        # with every attention output averaged over the copies of a merged token
        with vtoken.patch(llava, "tome", r=6) as p:
            feats = llava.get_image_features(pixel_values=px).pooler_output  # expanded: one row per patch
            groups = p.adapter.vision_capture["groups"]
        ids = batch["input_ids"]
        emb = llava.get_input_embeddings()(ids)
        is_img = ids == IMAGE_TOKEN
        emb = emb.masked_scatter(is_img[..., None], torch.cat(list(feats)).to(emb.dtype))
        label = torch.arange(ids.numel()).view(ids.shape)  # group label per row: itself, or its merged token
        starts = [(b, int(torch.nonzero(is_img[b])[k * N_IMG])) for b in range(2)
                  for k in range(int(is_img[b].sum()) // N_IMG)]
        for (b, s), g in zip(starts, groups):
            label[b, s:s + N_IMG] = 10_000 + 1000 * len([1 for x in starts if x < (b, s)]) + g

        def tie(module, args, out):
            y = out[0].clone()
            for b in range(2):
                for lab in label[b].unique():
                    rows = label[b] == lab
                    y[b, rows] = y[b, rows].mean(0)
            return (y, *out[1:])

        lm = llava.model.language_model
        hooks = [layer.self_attn.register_forward_hook(tie) for layer in lm.layers]
        try:
            hidden = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                        position_ids=positions(batch["attention_mask"])).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        ref = llava.lm_head(hidden)
        with vtoken.patch(llava, "tome", r=6, vtu="expand"):
            got = llava(**batch, pixel_values=px, position_ids=positions(batch["attention_mask"])).logits
    text = batch["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(logits["expand"][text], logits["exact"][text], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[text], ref[text], atol=2e-5, rtol=1e-4)


def test_dymu_calibration_hits_its_target():
    model = tiny_llava(image_size=112, vision_layers=4)  # 8x8 = 64 patches, 3 merge layers
    images = shapes_images(24)
    result = calibrate(model, images, {"mid": 24}, batch_size=8, image_size=112)
    entry = result["mid"]
    assert len(entry["thresholds"]) == 3 and sum(entry["r"]) == 40 and max(entry["r"]) - min(entry["r"]) <= 1
    assert abs(entry["mean_tokens"] - 24) / 24 <= 0.05
    with vtoken.patch(model, "dymu", thresholds=entry["thresholds"]) as p, torch.no_grad():
        model.get_image_features(pixel_values=torch.randn(2, 3, 112, 112))
        assert p.adapter.merger.state.entering[-1] != [65, 65]


def test_dymu_needs_thresholds(llava, tmp_path):
    with pytest.raises(vtoken.ParameterError, match="vtoken calibrate"):
        vtoken.patch(llava, "dymu")
    with pytest.raises(vtoken.UnsupportedModelError, match="cannot be combined"):
        vtoken.patch(llava, ["tome", "random"], tome={"r": 2, "vtu": "expand"}, random={"keep": 4})
