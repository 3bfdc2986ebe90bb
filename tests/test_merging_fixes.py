"""Encoder merging, issue 12: ragged-batch pooling (A3), DyMU budgets and thresholds (A4, C), ViT edge
cases (B8), nested open_clip patches (B9), PiToMe (D11) and DyMU (D12) as the authors' code runs them.

The PiToMe / DyMU references below are written from the papers and the authors' code (hchautran/PiToMe,
MikeWangWZHL/dymu) as plain per-image Python loops, independent of vtoken's batched implementation."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import timm
import torch

import vtoken
from vtoken.eval.calibrate import PRESETS, RTotal, targets_for
from vtoken.eval.tiny import tiny_llava
from vtoken.ops.merge import bipartite_plan, energy_bipartite_plan, energy_plan
from vtoken.reducers.base import ModelInfo
from vtoken.reducers.dymu import DyMU, DyMUCalibration
from vtoken.reducers.pitome import PiToMe


def tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"num_classes": 7, "img_size": 64, **kw}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()


def tiny_clip(image_size: int = 64, layers: int = 3, **vision) -> torch.nn.Module:
    torch.manual_seed(0)
    text = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    cfg = {"image_size": image_size, "layers": layers, "width": 64, "patch_size": 16, "head_width": 16, **vision}
    return open_clip.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=text).eval()


def two_images(size: int = 64) -> torch.Tensor:
    """A textured image and a nearly flat one: DyMU thresholds merge very different numbers of tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    x[1] = x[1].mean() + 0.01 * x[1]
    return x


# --- A3: ragged DyMU batches do not leak padding into pooling ----------------------------------------------


@pytest.mark.parametrize("kind", ["timm-avg", "timm-map", "timm-registers", "open_clip-avg"])
def test_dymu_ragged_batch_pooled_output_equals_each_image_alone(kind):
    if kind.startswith("timm"):
        kw = {"timm-avg": {"global_pool": "avg"}, "timm-map": {"global_pool": "map"},
              "timm-registers": {"reg_tokens": 4, "class_token": False, "no_embed_class": True,
                                 "global_pool": "avg"}}[kind]
        model = run = tiny_vit(**kw)
        tau = 0.5
    else:
        model = tiny_clip(pool_type="avg")
        run, tau = model.encode_image, 0.6
    x = two_images()
    with vtoken.patch(model, "dymu", thresholds=[tau] * 12) as p, torch.no_grad():
        both = run(x)
        counts = list(p.adapter.merger.state.counts)
        alone = torch.cat([run(x[i:i + 1]) for i in range(2)])
    assert counts[0] != counts[1]  # the batch really is ragged
    torch.testing.assert_close(both, alone, atol=2e-6, rtol=1e-5)


# --- A4 / C: DyMU budgets and thresholds -----------------------------------------------------------------------


def test_dymu_keep_is_a_ceiling_on_the_tokens_leaving_the_tower():
    vit = tiny_vit()  # 16 patches + CLS, 12 layers
    x = two_images()
    with torch.no_grad():
        with vtoken.patch(vit, "dymu", thresholds=[math.inf] * 12, keep=4) as p:  # thresholds merge nothing
            vit(x)
            assert p.adapter.merger.state.counts == [5, 5]
        with vtoken.patch(vit, "dymu", thresholds=[0.5] * 12) as p:
            vit(x)
            free = list(p.adapter.merger.state.counts)
        with vtoken.patch(vit, "dymu", thresholds=[0.5] * 12, keep=8) as p:
            vit(x)
            capped = p.adapter.merger.state.counts
    assert max(free) > 9 and all(c <= 9 for c in capped)  # at most keep patches (+ CLS)
    with pytest.raises(vtoken.BudgetError):
        vtoken.patch(vit, "dymu", thresholds=[0.5] * 12, keep=40)


@pytest.mark.parametrize("thresholds", [[float("nan")] * 12, [], ["a"] * 12, [True] * 12, "abc", [0.5] * 3])
def test_dymu_bad_thresholds_are_refused_at_patch_time(thresholds):
    vit = tiny_vit()
    with pytest.raises(vtoken.ParameterError, match="dymu"):
        vtoken.patch(vit, "dymu", thresholds=thresholds)
    assert vtoken.patched(vit) is None


def test_dymu_threshold_files_are_checked_at_patch_time(tmp_path):
    vit = tiny_vit()
    with pytest.raises(vtoken.ParameterError, match=r"does not exist.*vtoken calibrate"):
        vtoken.patch(vit, "dymu", thresholds=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(vtoken.ParameterError, match="cannot read"):
        vtoken.patch(vit, "dymu", thresholds=str(bad))
    skipped = tmp_path / "skipped.json"
    skipped.write_text(json.dumps({"presets": {"mid": {"target": 5, "error": "cannot merge"},
                                               "high": {"thresholds": [0.5] * 12}}}))
    with pytest.raises(vtoken.ParameterError, match="not calibrated: cannot merge"):
        vtoken.patch(vit, "dymu", thresholds=str(skipped))
    with pytest.raises(vtoken.ParameterError, match="no preset 'low'"):
        vtoken.patch(vit, "dymu", thresholds=str(skipped), preset="low")
    vtoken.patch(vit, "dymu", thresholds=str(skipped), preset="high").remove()


# --- B8: float64, dynamic image size, one token left -------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("tome", {"r": 3}), ("pitome", {"ratio": 0.8}),
                                         ("dymu", {"thresholds": [0.5] * 12})])
def test_float64_towers_merge(name, params):
    x = two_images()
    for model, run in ((tiny_vit(), None), (tiny_clip(), "encode_image")):
        f = getattr(model, run) if run else model
        with vtoken.patch(model, name, **params), torch.no_grad():
            ref = f(x)
            model.double()
            got = f(x.double())
            model.float()
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        if name != "dymu":  # same merges: the float32 result up to float32 rounding
            torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=1e-3)


def test_timm_dynamic_img_size_merges_at_other_resolutions():
    vit = tiny_vit(dynamic_img_size=True)  # configured for 64 px (16 patches)
    x = torch.randn(2, 3, 96, 96)  # 36 patches
    with torch.no_grad():
        with vtoken.patch(vit, "tome", keep=6) as p:
            out = vit(x)
            assert p.stats.vision_tokens[0] == 37 and p.adapter.merger.state.counts == [7, 7]
        assert out.shape == (2, 7)
        with vtoken.patch(vit, "pitome", ratio=0.8) as p:
            vit(x)
            assert p.stats.vision_tokens[0] == 37 and p.adapter.merger.state.counts[0] < 37


def test_no_cls_vit_merges_down_to_one_token():
    vit = tiny_vit(class_token=False, global_pool="avg")
    x = two_images()
    with torch.no_grad():
        with vtoken.patch(vit, "tome", r=1000) as p:
            assert vit(x).shape == (2, 7) and p.adapter.merger.state.counts == [1, 1]
        with vtoken.patch(vit, "dymu", thresholds=[-1.0] * 12) as p:
            assert vit(torch.zeros(2, 3, 64, 64)).shape == (2, 7) and p.adapter.merger.state.counts == [1, 1]


# --- B9: a CLIP model and its visual tower are one patch target ---------------------------------------------------


def test_open_clip_model_and_its_visual_tower_cannot_both_be_patched():
    clip = tiny_clip()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = clip.encode_image(x)
        with vtoken.patch(clip, "tome", r=2):
            with pytest.raises(vtoken.AlreadyPatchedError):
                vtoken.patch(clip.visual, "tome", r=2)
            merged = clip.encode_image(x)
        with vtoken.patch(clip.visual, "tome", r=2):
            with pytest.raises(vtoken.AlreadyPatchedError):
                vtoken.patch(clip, "tome", r=2)
            torch.testing.assert_close(clip.encode_image(x), merged)
        assert torch.equal(clip.encode_image(x), ref)


# --- D11: PiToMe as the authors' code runs it -----------------------------------------------------------------------


def _cos(v: torch.Tensor) -> list[list[float]]:
    v = v.double() / v.double().norm(dim=-1, keepdim=True)
    return (v @ v.T).tolist()


def ref_energy(v: torch.Tensor, margin: float, alpha: float = 1.0) -> list[float]:
    """PiToMe eq. 4 as the authors' code computes it: mean_j ELU(cos_ij - m, alpha)."""
    sim = _cos(v)
    f = [[(x - margin) if x > margin else alpha * (math.exp(x - margin) - 1) for x in row] for row in sim]
    return [sum(row) / len(row) for row in f]


def ref_pitome(v: torch.Tensor, k: int, margin: float) -> list[list[int]]:
    """Energy merging: the 2k most energetic tokens alternate A/B by energy rank, each a joins its
    most similar b; the rest stay. Groups of token indices of v."""
    e, sim = ref_energy(v, margin), _cos(v)
    order = sorted(range(len(e)), key=lambda i: -e[i])
    a_set, b_set = order[:2 * k:2], order[1:2 * k:2]
    groups = {b: [b] for b in b_set}
    for a in a_set:
        groups[max(b_set, key=lambda b: sim[a][b])].append(a)
    return [[i] for i in order[2 * k:]] + list(groups.values())


def ref_pitome_bsm(v: torch.Tensor, k: int, margin: float) -> list[list[int]]:
    """The authors' `pitome_bsm`: all tokens alternate A/B by energy rank; the k best a->b matches merge."""
    e, sim = ref_energy(v, margin), _cos(v)
    order = sorted(range(len(e)), key=lambda i: -e[i])
    a_set, b_set = order[0::2], order[1::2]
    best = {a: max(b_set, key=lambda b: sim[a][b]) for a in a_set}
    merged = sorted(a_set, key=lambda a: -sim[a][best[a]])[:k]
    groups = {b: [b] for b in b_set}
    for a in merged:
        groups[best[a]].append(a)
    return [[a] for a in a_set if a not in merged] + list(groups.values())


def ref_tome(v: torch.Tensor, k: int) -> list[list[int]]:
    """ToMe bipartite matching by position (A even, B odd, token 0 = CLS never merges). Groups in the
    authors' output order: CLS, unmerged A (index order), B (index order)."""
    sim = _cos(v)
    a_set, b_set = list(range(2, len(sim), 2)), list(range(1, len(sim), 2))
    best = {a: max(b_set, key=lambda b: sim[a][b]) for a in a_set}
    merged = sorted(a_set, key=lambda a: -sim[a][best[a]])[:k]
    groups = {b: [b] for b in b_set}
    for a in merged:
        groups[best[a]].append(a)
    return [[0]] + [[a] for a in a_set if a not in merged] + list(groups.values())


def partition(dest: torch.Tensor, count: int) -> set[frozenset[int]]:
    slots: dict[int, set[int]] = {}
    for t in range(count):
        slots.setdefault(int(dest[t]), set()).add(t)
    return {frozenset(s) for s in slots.values()}


def shifted(groups: list[list[int]], by: int = 1) -> list[list[int]]:
    return [[i + by for i in g] for g in groups]


def test_pitome_selections_equal_the_reference_algorithms():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(3, 21, 8, generator=g)
    counts, k, m = [21] * 3, 5, 0.3
    plans = {"energy": energy_plan(metric, counts, [k] * 3, m),
             "bsm": energy_bipartite_plan(metric, counts, [k] * 3, m),
             "tome": bipartite_plan(metric, counts, [k] * 3, protect=1)[0]}
    for b in range(3):
        refs = {"energy": [[0], *shifted(ref_pitome(metric[b, 1:], k, m))],
                "bsm": [[0], *shifted(ref_pitome_bsm(metric[b, 1:], k, m))], "tome": ref_tome(metric[b], k)}
        for kind, plan in plans.items():
            assert plan.counts[b] == 21 - k
            assert partition(plan.dest[b], 21) == {frozenset(gr) for gr in refs[kind]}, kind


def test_pitome_presets_are_the_authors_per_backbone():
    timm_info = ModelInfo(family="timm", llm_layers=0, vision_layers=12, vision_tokens=196)
    clip_info = ModelInfo(family="open_clip", llm_layers=0, vision_layers=12, vision_tokens=196)
    llava_info = ModelInfo(family="llava", llm_layers=32, vision_layers=24, feature_layer=22, vision_tokens=576)
    expect = {"timm": (timm_info, 0.75, "keys", True, [*["bsm"] * 6, *["energy"] * 6]),
              "lavis": (clip_info, 0.95, "states", True, ["energy"] * 12),
              "hf": (llava_info, 0.9, "output", False, [*["tome"] * 13, *["energy"] * 10])}
    for preset, (info, m0, metric, weighted, kinds) in expect.items():
        r = PiToMe(ratio=0.9)
        r.configure(info)
        assert r.preset == preset and r.proportional is False
        assert r.metric_kind == metric and r.weighted is weighted
        depth = info.vision_layers
        assert [r.margin_at(i) for i in range(r._layers)] == [m0 - m0 * (i / depth) for i in range(r._layers)]
        assert [r.layer_kind(i) for i in range(r._layers)] == kinds
        t, ks = info.vision_tokens, []  # the authors' counts: floor(T - T ratio), T with CLS in ToMe layers
        for kind in kinds:
            n = t + 1 if kind == "tome" else t
            ks.append(math.floor(n - n * 0.9))
            t -= ks[-1]
        assert r.schedule == ks
    r = PiToMe(ratio=0.9, preset="timm", margin=0.5, proportional=True)
    r.configure(llava_info)
    assert (r.margin, r.proportional, r.metric_kind) == (0.5, True, "keys")


def _merge_groups(h: torch.Tensor, size: torch.Tensor, groups: list[list[int]], weighted: bool):
    rows, sizes = [], []
    for gr in groups:
        w = size[gr] if weighted else torch.ones(len(gr))
        rows.append((h[0, gr] * w[:, None]).sum(0) / w.sum())
        sizes.append(size[gr].sum())
    return torch.stack(rows)[None], torch.stack(sizes)


def test_pitome_on_timm_equals_the_authors_timm_patch():
    """deit.py / timm.py: margin 0.75 (1 - l/L), pitome_bsm in the first ceil(L/2) blocks, keys as metric,
    size-weighted merges between attention and MLP, attention without sizes."""
    vit = tiny_vit(depth=4)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ratio, depth = 0.8, 4
    with torch.no_grad():
        outs = []
        for img in x:
            h = vit.norm_pre(vit._pos_embed(vit.patch_embed(img[None])))
            size = torch.ones(h.shape[1])
            for i, blk in enumerate(vit.blocks):
                a_in = blk.norm1(h)
                heads, d = blk.attn.num_heads, h.shape[-1]
                keys = blk.attn.qkv(a_in).reshape(1, h.shape[1], 3, heads, d // heads)[:, :, 1].mean(2)[0]
                h = h + blk.attn(a_in)
                n = h.shape[1] - 1
                k = math.floor(n - n * ratio)
                m = 0.75 - 0.75 * (i / depth)
                ref = ref_pitome_bsm if i < math.ceil(depth / 2) else ref_pitome
                h, size = _merge_groups(h, size, [[0], *shifted(ref(keys[1:], k, m))], weighted=True)
                h = h + blk.mlp(blk.norm2(h))
            outs.append(vit.forward_head(vit.norm(h)))
        want = torch.cat(outs)
        with vtoken.patch(vit, "pitome", ratio=ratio):
            got = vit(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_pitome_on_open_clip_equals_the_authors_lavis_patch():
    """clip.py (LAVIS CLIP = open_clip's tower): margin 0.95 (1 - l/L), energy merging in every block on the
    token states after the attention residual, size-weighted, plain attention."""
    clip = tiny_clip(layers=3)
    vis = clip.visual
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ratio, depth = 0.75, 3
    with torch.no_grad():
        outs = []
        for img in x:
            h = vis._embeds(img[None])
            size = torch.ones(h.shape[1])
            for i, blk in enumerate(vis.transformer.resblocks):
                h = h + blk.ls_1(blk.attention(blk.ln_1(h)))
                n = h.shape[1] - 1
                k = math.floor(n - n * ratio)
                groups = [[0], *shifted(ref_pitome(h[0, 1:], k, 0.95 - 0.95 * (i / depth)))]
                h, size = _merge_groups(h, size, groups, weighted=True)
                h = h + blk.ls_2(blk.mlp(blk.ln_2(h)))
            pooled, _ = vis._pool(h)
            outs.append(pooled @ vis.proj)
        want = torch.cat(outs)
        with vtoken.patch(clip, "pitome", ratio=ratio):
            got = clip.encode_image(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_pitome_on_llava_equals_the_authors_hf_patch():
    """clip_hf.py: after each whole encoder layer, on its output states: layers 0..L/2 ToMe matching with the
    count over all tokens (CLS included), energy merging after, margin 0.9 (1 - l/L) over all L layers,
    plain means."""
    llava = tiny_llava(vision_layers=6)  # feature layer -2 = 4: layers 0..4 merge; 0..3 ToMe, 4 energy
    tower = getattr(llava.model.vision_tower, "vision_model", llava.model.vision_tower)
    px = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(4))
    ratio, depth = 0.8, 6
    with torch.no_grad():
        want = []
        for img in px:
            h = tower.pre_layrnorm(tower.embeddings(img[None]))
            members = [[p] for p in range(h.shape[1])]  # original tokens held by each current token
            size = torch.ones(h.shape[1])
            for i in range(5):
                h = tower.encoder.layers[i](h, None)
                h = h[0] if isinstance(h, tuple) else h
                if i <= depth // 2:
                    k = math.floor(h.shape[1] - h.shape[1] * ratio)
                    groups = ref_tome(h[0], k)
                else:
                    n = h.shape[1] - 1
                    k = math.floor(n - n * ratio)
                    groups = [[0], *shifted(ref_pitome(h[0, 1:], k, 0.9 - 0.9 * (i / depth)))]
                h, size = _merge_groups(h, size, groups, weighted=False)
                members = [[p for j in gr for p in members[j]] for gr in groups]
            feats = llava.model.multi_modal_projector(h[0, 1:])
            rows = torch.empty(36, feats.shape[-1])
            for j, mem in enumerate(members[1:]):
                rows[[p - 1 for p in mem]] = feats[j]
            want.append(rows)
        with vtoken.patch(llava, "pitome", ratio=ratio):
            got = torch.stack(list(llava.get_image_features(pixel_values=px).pooler_output))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-4)


# --- D12: DyMU threshold finding and presets as the authors' ------------------------------------------------------


def test_dymu_calibration_merges_the_top_edges_even_when_their_scores_are_negative():
    info = ModelInfo(family="timm", llm_layers=0, vision_layers=2, vision_tokens=8)
    cal = DyMUCalibration(target=4)  # r = 2 per layer
    cal.configure(info)
    assert cal.schedule == [2, 2]
    g = torch.Generator().manual_seed(0)
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(9)])  # A tokens ~ +e, B tokens ~ -e
    metric = sign[None, :, None] * torch.tensor([1.0, 0, 0]) + 0.1 * torch.randn(3, 9, 3, generator=g)
    _, scores = bipartite_plan(metric, [9] * 3, [0] * 3, protect=1)
    assert scores[torch.isfinite(scores)].max() < 0  # every candidate edge scores below zero
    plan = cal.plan(0, metric, [9] * 3)
    assert plan is not None and sum(9 - c for c in plan.counts) == 2 * 3  # exactly r * B edges merged
    assert cal.thresholds[0] == 0.0  # only the recorded threshold is clamped


def test_dymu_presets_are_the_authors_configs():
    assert targets_for(576, None, None) == {"low": RTotal(504), "mid": RTotal(384), "high": RTotal(192)}
    assert set(PRESETS) == {"low", "mid", "high"}
    llava_info = ModelInfo(family="llava", llm_layers=32, vision_layers=24, feature_layer=22, vision_tokens=576)
    for merges, r, left in ((504, 21, 93), (384, 16, 208), (192, 8, 392)):
        cal = DyMUCalibration(r_total=merges)
        cal.configure(llava_info)
        assert cal.schedule == [r] * 23 and 576 - sum(cal.schedule) == left
    assert targets_for(576, 100, "mine") == {"mine": 100}


def test_dymu_keep_and_thresholds_are_validated_when_built():
    with pytest.raises(vtoken.ParameterError):
        DyMU(thresholds=[float("nan")])
    with pytest.raises(vtoken.ParameterError):
        DyMU(thresholds=[])
    with pytest.raises(vtoken.ParameterError):
        DyMUCalibration()
