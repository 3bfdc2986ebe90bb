"""LLaVA-OneVision: AnyRes images (crops only for a sample's only image, the bilinear shrink of large crop
grids, pinned row-end newlines) and videos (pooled frames as spans, the video's int budget split over
them); batches equal each sample alone, cached decoding equals a recompute; the tower's attention resampled
as the tokens are (HoliTom); other tower reducers refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import vtoken
from vtoken.eval.tiny import OV_IMAGE, OV_VIDEO, onevision_inputs, tiny_llava_onevision
from vtoken.reducers.base import Reducer, Selection, SignalRequest

# sample 0: a cropped image and a 3-frame video; 1: two images (no crops); 2: a video; 3: text only
SAMPLES = [[(60, 100), 3], [(90, 90), (56, 56)], [3], []]
REDUCERS = [("random", {"keep": 8}), ("pool", {"keep": 8}), ("fastv", {"keep": 8}), ("divprune", {"keep": 8}),
            ("aim", {"keep": 8, "schedule": ((2, 0.5),)}), ("todre", {"keep": 8}), ("transprune", {}),
            ("holitom", {"keep": 0.5, "layer_k": 2})]
SUPPRESS = [OV_IMAGE, OV_VIDEO]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


@pytest.fixture(scope="module")
def shrinking():
    """The same model, with crop grids shrunk to about one tile's tokens (anyres_max_1)."""
    return tiny_llava_onevision(vision_aspect_ratio="anyres_max_1")


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)


def positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def media_of(inp, samples, b):
    """Sample b's pixels (and its batch_num_images) cut out of the batch's."""
    out = {}
    before = [it for items in samples[:b] for it in items]
    n_img = sum(not isinstance(it, int) for it in before)
    n_vid = len(before) - n_img
    mine = samples[b]
    imgs = sum(not isinstance(it, int) for it in mine)
    if imgs:
        out["pixel_values"] = inp["pixel_values"][n_img:n_img + imgs]
        out["image_sizes"] = inp["image_sizes"][n_img:n_img + imgs]
        out["batch_num_images"] = torch.tensor([imgs])
    if len(mine) > imgs:
        out["pixel_values_videos"] = inp["pixel_values_videos"][n_vid:n_vid + len(mine) - imgs]
    return out


def newline_columns(model, inp):
    """(sample, column) of every image_newline feature the model scatters into the prompt."""
    cfg = model.config  # given explicitly: transformers < 5.2x does not fill a direct call from the config
    kw = dict(vision_feature_layer=cfg.vision_feature_layer,
              vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    with torch.no_grad():
        feats = []
        if "pixel_values" in inp:
            out = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"],
                                                 batch_num_images=inp["batch_num_images"],
                                                 vision_aspect_ratio=cfg.vision_aspect_ratio, **kw)
            feats += [("img", f) for f in out.pooler_output]
        if "pixel_values_videos" in inp:
            nl = model.model.image_newline
            for f in model.model.get_video_features(inp["pixel_values_videos"], **kw).pooler_output:
                if not (f[-1] == nl).all():  # transformers < 5.2x adds the video's newline in forward, not here
                    f = torch.cat([f, nl[None].to(f)])
                feats.append(("vid", f))
    nl = model.model.image_newline
    cols = []
    for kind, token in (("img", OV_IMAGE), ("vid", OV_VIDEO)):
        mine = [f for k, f in feats if k == kind]
        where = torch.nonzero(inp["input_ids"] == token).tolist()  # sample-major, in order
        flat = torch.cat(mine) if mine else torch.zeros(0, nl.shape[0])
        assert flat.shape[0] == len(where)
        cols += [tuple(where[i]) for i in torch.nonzero((flat == nl).all(-1)).flatten().tolist()]
    return set(cols)


def test_keep_all_bit_identical_and_remove_restores(model):
    inp = onevision_inputs(model, SAMPLES)
    ref = run(model, **inp).logits
    for name, params in [("none", {}), ("fastv", {"keep": 1.0})]:
        with vtoken.patch(model, name, **params):
            assert torch.equal(run(model, **inp).logits, ref)
    with vtoken.patch(model, "random", keep=8):
        assert not torch.allclose(run(model, **inp).logits[:, -1], ref[:, -1])
    assert torch.equal(run(model, **inp).logits, ref)
    assert "get_image_features" not in model.model.__dict__  # the instance wrap is gone


def test_spans_shares_and_the_video_budget_split_over_frames(model):
    inp = onevision_inputs(model, SAMPLES)
    with vtoken.patch(model, "random", keep=8) as p:
        run(model, **inp)
        spans = p.runtime.last_spans
        kept = [len(k) for k in p.kept_positions()]
        visual = p.stats.visual_tokens
    assert [(s.sample, s.grid, s.pinned, round(s.share, 3), s.base, s.part) for s in spans] == [
        (0, (4, 4), 0, 0.2, None, None), (0, (4, 8), 4, 0.8, 0, None),  # base tile, 2x2 crops unpadded to 4x8
        (0, (2, 2), 0, 1.0, None, (0, 3)), (0, (2, 2), 0, 1.0, None, (1, 3)), (0, (2, 2), 0, 1.0, None, (2, 3)),
        (1, (4, 4), 0, 1.0, None, None), (1, (4, 4), 0, 1.0, None, None),  # two images: no crops
        (2, (2, 2), 0, 1.0, None, (0, 3)), (2, (2, 2), 0, 1.0, None, (1, 3)), (2, (2, 2), 0, 1.0, None, (2, 3))]
    # 8 split 1/5 : 4/5 over the image (+ 4 pinned newlines); the video's 8 over its 3 frames: 3, 3, 2
    assert kept == [2, 6 + 4, 3, 3, 2, 8, 8, 3, 3, 2]
    assert visual == [2 + 10 + 8, 16, 8, 0]
    with vtoken.patch(model, "random", keep=0.5) as p:
        run(model, **inp)
        kept = [len(k) for k in p.kept_positions()]
    assert kept == [8, 16 + 4, 2, 2, 2, 8, 8, 2, 2, 2]  # a fraction applies to each frame


@pytest.mark.parametrize("name,params", REDUCERS)
def test_text_and_newlines_survive_and_positions_are_the_originals(model, name, params):
    inp = onevision_inputs(model, SAMPLES, seed=1)
    seen = {}
    last = model.model.language_model.layers[-1]
    with vtoken.patch(model, name, **params) as p:
        hook = last.register_forward_pre_hook(lambda m, a, k: seen.update(pos=k["position_ids"]), with_kwargs=True)
        try:
            run(model, **inp, position_ids=positions(inp["attention_mask"]))
        finally:
            hook.remove()
        lay, spans = p.layout, p.runtime.last_spans
        kept = p.kept_positions()
    b = inp["input_ids"].shape[0]
    cols = {(s, int(c)) for s in range(b) for c in lay.index[s][lay.valid[s]]}
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    text = {(s, int(c)) for s in range(b) for c in torch.nonzero(mask[s] & (ids[s] != OV_IMAGE) & (ids[s] != OV_VIDEO))
            .flatten()}
    newlines = newline_columns(model, inp)
    selectable = {(s.sample, s.start + q) for s in spans for q in range(s.n) if s.inner is None or s.inner[q] >= 0}
    assert len(newlines) == 4 + 4 and not newlines & selectable  # the crop rows' 4, 2 lone images' and 2 videos'
    assert text | newlines <= cols
    assert any(k.numel() != s.grid[0] * s.grid[1] + s.pinned for k, s in zip(kept, spans))  # it reduced
    for k in kept:
        assert torch.all(k[1:] > k[:-1])
    orig = positions(inp["attention_mask"]).gather(1, lay.index.clamp_max(ids.shape[1] - 1))
    assert seen["pos"].shape[-1] == lay.shape[1]
    torch.testing.assert_close(seen["pos"].expand_as(orig)[lay.valid], orig[lay.valid])


@pytest.mark.parametrize("name,params", REDUCERS[:5])
def test_batch_equals_each_sample_alone(model, name, params):
    inp = onevision_inputs(model, SAMPLES, seed=3)
    with vtoken.patch(model, name, **params), torch.no_grad():
        together = model(**inp).logits
        for b in range(len(SAMPLES)):
            length = int(inp["attention_mask"][b].sum())
            alone = {"input_ids": inp["input_ids"][b:b + 1, -length:], **media_of(inp, SAMPLES, b)}
            out = model(**alone).logits
            torch.testing.assert_close(together[b, -3:], out[0, -3:], atol=5e-5, rtol=1e-4)


def recompute_equals_cached_generate(model, inp, name, params, steps=4):
    n = inp["input_ids"].shape[1]
    b = inp["input_ids"].shape[0]
    with vtoken.patch(model, name, **params) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=SUPPRESS)
        seq = out.sequences
        mask = torch.cat([inp["attention_mask"], torch.ones(b, seq.shape[1] - n, dtype=torch.long)], 1)
        media = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
        with p.prompt(n):
            full = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], position_ids=positions(mask[:, :-1]),
                         use_cache=False, **media).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_cached_decode_equals_recompute(model, name, params):
    recompute_equals_cached_generate(model, onevision_inputs(model, SAMPLES, seed=2), name, params)


@pytest.mark.parametrize("ratio", ["anyres_max_1", "anyres_max_2", "anyres_max_9"])
def test_layout_predicts_transformers_packing(model, ratio):
    """Token counts and row-end newlines of every image as transformers packs them, shrink included."""
    sizes = [(60, 100), (90, 90), (100, 60), (56, 56), (150, 100), (170, 110), (112, 60)]
    g = torch.Generator().manual_seed(0)
    px = torch.randn(len(sizes), 7, 3, 56, 56, generator=g)
    with vtoken.patch(model, "random", keep=4) as p, torch.no_grad():
        feats = model.model.get_image_features(px, torch.tensor(sizes), vision_aspect_ratio=ratio,
                                               batch_num_images=torch.tensor([1] * 6 + [1])).pooler_output
        keys = p.adapter.vision_capture["keys"]
        lays = [p.adapter._layout(k) for k in keys]
    nl = model.model.image_newline
    shrunk = 0
    for f, lay in zip(feats, lays):
        assert lay["tokens"] == f.shape[0]
        rows, cols = lay["grid"]
        want = torch.zeros(16 + rows * (cols + 1), dtype=torch.bool)
        want[16 + cols::cols + 1] = True
        assert torch.equal((f == nl).all(-1), want)
        shrunk += rows * cols < (lay["crops"] - 1) * 16 * 0.5
    assert (shrunk > 0) == (ratio != "anyres_max_9")


def test_bilinear_shrink_spans_budgets_and_generate(shrinking):
    samples = [[(60, 100)], [(150, 100), 3]]
    inp = onevision_inputs(shrinking, samples, seed=5)
    with vtoken.patch(shrinking, "random", keep=8) as p:
        run(shrinking, **inp)
        spans = p.runtime.last_spans
        kept = [len(k) for k in p.kept_positions()]
    # 4x8 crop grid / sqrt(2) -> 2x5; 12x8 / sqrt(6) -> 4x3
    assert [(s.grid, s.pinned) for s in spans] == [((4, 4), 0), ((2, 5), 2), ((4, 4), 0), ((4, 3), 4),
                                                   ((2, 2), 0), ((2, 2), 0), ((2, 2), 0)]
    assert kept == [2, 6 + 2, 1, 7 + 4, 3, 3, 2]
    for name, params in (("random", {"keep": 8}), ("pool", {"keep": 6}), ("fastv", {"keep": 0.5})):
        recompute_equals_cached_generate(shrinking, inp, name, params, steps=3)


@pytest.mark.parametrize("name,params", [("hiprune", {"keep": 8}), ("visionzip", {"keep": 8}), ("tome", {"r": 2}),
                                         ("pitome", {"ratio": 0.8}), ("dymu", {"thresholds": [0.2] * 8})])
def test_tower_reducers_are_refused(model, name, params):
    with pytest.raises(vtoken.UnsupportedModelError, match=f"{name}: .*bilinear resamples.*random, pool, fastv"):
        vtoken.patch(model, name, **params)
    assert vtoken.patched(model) is None and "get_image_features" not in model.model.__dict__
    with pytest.raises(vtoken.UnsupportedModelError, match="no CLS"):
        vtoken.patch(model, "todre", keep=8, pivot="cls")


def test_model_info_and_vision_flops_match_the_counter():
    """SigLIP has no CLS: every tile and frame is counted through the tower (checked on eager attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llava_onevision(attn="eager")
    inp = onevision_inputs(model, SAMPLES, seed=7)
    with vtoken.patch(model, "random", keep=8) as p:
        info = p.adapter.model_info()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.model.get_image_features(inp["pixel_values"], inp["image_sizes"],
                                           batch_num_images=inp["batch_num_images"])
            model.model.get_video_features(inp["pixel_values_videos"])
        run(model, **inp)
        st = p.stats
    assert (info.has_cls, info.prefix_tokens, info.vision_tokens, info.llm) == (False, 0, 16, "qwen2")
    analytic = st.flops["vision"] + st.flops["projector"]
    counted = counter.get_total_flops()
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)


def test_bf16_runs():
    model = tiny_llava_onevision(dtype=torch.bfloat16)
    inp = onevision_inputs(model, SAMPLES, seed=4)
    inp = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inp.items()}
    with vtoken.patch(model, "divprune", keep=8) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, pad_token_id=0, suppress_tokens=SUPPRESS)
        assert out.shape[1] == inp["input_ids"].shape[1] + 3
        assert p.stats.visual_tokens == [20, 16, 8, 0]


@dataclass
class AttentionProbe(Reducer):
    """Keeps every token and records the tower attention it is given (read as HoliTom reads it)."""

    stage: ClassVar[str] = "boundary"
    resampled_attention: ClassVar[bool] = True
    keep: float = 1.0
    layer: int = -1
    seen: dict = field(default_factory=dict)

    def signals(self):
        return (SignalRequest("vision_attention", self.layer, "all"),)

    def select(self, x):
        self.seen["attention"] = x.signal(self.signals()[0])
        self.seen["parts"] = x.parts
        return Selection(keep=x.valid.clone())


@pytest.mark.parametrize("layer", [-1, 0])
def test_tower_attention_is_resampled_as_transformers_resamples_the_tokens(layer):
    """Per span, the attention its tokens receive in the tower (eager attentions, mean over heads and
    queries), put through transformers' own packing: a tile as is, a crop grid unpadded and shrunk
    (`pack_image_features`), a frame pooled 2x2 (`apply_pooling`)."""
    model = tiny_llava_onevision(attn="eager", vision_aspect_ratio="anyres_max_1")
    samples = [[(150, 100), 3], [(56, 56), (90, 90)], [3]]
    inp = onevision_inputs(model, samples, seed=8)
    probe = AttentionProbe(layer=layer)
    with vtoken.patch(model, probe) as p, torch.no_grad():
        base = model(**inp).logits
        spans = p.runtime.last_spans
    with torch.no_grad():
        ref = model(**inp).logits
        tower = model.model.vision_tower
        n_crops = [len(t) for t in inp["pixel_values"]]
        px = inp["pixel_values"]
        tiles = [px[0], px[1, :1], px[2, :1]]  # crops only for a sample's lone image

        def received(t):  # (tiles, patches, 1): mean over heads and query rows
            return tower(t, output_attentions=True).attentions[layer].mean(1).mean(1)[..., None]

        att = [received(t) for t in tiles]
        packed, _ = model.model.pack_image_features(att[:1], inp["image_sizes"][:1], image_newline=None,
                                                    vision_aspect_ratio="anyres_max_1")
        video = inp["pixel_values_videos"].flatten(0, 1)
        frames = model.model.apply_pooling(received(video))
    assert n_crops[0] > 1
    torch.testing.assert_close(base, ref)  # keeping everything changes nothing
    image0 = packed[0][:, 0]
    want = [image0[:16], image0[16:], *frames[:3, :, 0], att[1][0, :, 0], att[2][0, :, 0], *frames[3:, :, 0]]
    got = probe.seen["attention"]
    assert got.shape[0] == len(want) == len(spans)
    for g, w, span in zip(got, want, spans):  # a crop grid's row-end newlines (inner -1) have no attention
        grid = [q for q in range(span.n) if span.inner is None or span.inner[q] >= 0]
        torch.testing.assert_close(g[grid], w, atol=1e-6, rtol=1e-5)


def test_holitom_merges_each_video_with_the_pooled_tower_attention(model):
    """HoliTom on OneVision videos: frames merged per video (the count follows the content), images
    unchanged by the outer merge, a keep-all budget with nothing similar keeps every token."""
    inp = onevision_inputs(model, SAMPLES, seed=1)
    with vtoken.patch(model, "holitom", keep=1.0, tau=1.0, inner=False), torch.no_grad():
        same = model(**inp).logits
    with torch.no_grad():
        ref = model(**inp).logits
    torch.testing.assert_close(same, ref)  # tau = 1: no token is similar across frames; r' = 1: all kept
    with vtoken.patch(model, "holitom", keep=0.5, tau=-1.0, inner=False) as p, torch.no_grad():
        model(**inp)
        kept = [len(k) for k in p.kept_positions()]
        spans = p.runtime.last_spans
    # tau = -1: every token is static through each whole 3-frame video; r' = min(0.5 * 12 / 4, 1) = 1, so
    # the 4 positions are kept once, in the first frame, and the other frames keep nothing
    frames = [k for k, s in zip(kept, spans) if s.part is not None]
    assert frames == [4, 0, 0, 4, 0, 0]
    images = [k for k, s in zip(kept, spans) if s.part is None]
    assert images == [s.n for s in spans if s.part is None] and len(images) == 4  # every image token, newlines too


def test_holitom_on_frames_pooled_to_one_token_and_images_only():
    """Videos are matched by their frames' tokens whatever transformers appends after them (a frame
    pooled to a single token included); on images alone HoliTom's outer merge reads (and pays) nothing."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from vtoken.eval.tiny import _instantiate

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=14, vision_use_head=False)  # 2x2 patches -> 1 per frame
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=OV_IMAGE,
                                  video_token_id=OV_VIDEO, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full",
                                  image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    tiny = _instantiate(LlavaOnevisionForConditionalGeneration, config, "sdpa", 0, torch.float32)
    inp = onevision_inputs(tiny, [[3], [3]], seed=1)
    with vtoken.patch(tiny, "holitom", keep=0.5, tau=-1.0, inner=False) as p, torch.no_grad():
        tiny(**inp)
        assert p.stats.visual_tokens == [1, 1]  # each video's one token per frame, static through all 3 frames
    model_ = tiny_llava_onevision()
    inp = onevision_inputs(model_, [[(60, 100)], [(56, 56), (90, 90)]], seed=2)
    with vtoken.patch(model_, "holitom", keep=0.5, inner=False) as p, torch.no_grad():
        out = model_(**inp).logits
        assert p.stats.flops.get("reducer", 0) == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model_(**inp).logits)
