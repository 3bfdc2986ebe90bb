"""Qwen2-VL and Qwen2.5-VL: the same battery as LLaVA, with M-RoPE and dynamic resolution."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.eval.tiny import QWEN_IMAGE, QWEN_SPECIAL, qwen_continued, qwen_inputs, tiny_qwen

KINDS = ["qwen2_vl", "qwen2_5_vl"]
REDUCERS = [("random", {"keep": 8}), ("pool", {"keep": 6}), ("fastv", {"keep": 0.5}), ("hiprune", {"keep": 8}),
            ("visionzip", {"keep": 8}), ("divprune", {"keep": 8}), ("todre", {"keep": 8}), ("transprune", {}),
            ("aim", {"keep": 8, "schedule": ((2, 0.5),)})]
SAMPLES = [[(8, 12)], [(8, 8), (12, 8)], []]  # dynamic resolution: three image sizes, one sample without image
IMAGES_OF = [[0], [1, 2], []]


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    return tiny_qwen(request.param)


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)


def test_keep_all_bit_identical_and_remove_restores(qwen):
    inp = qwen_inputs(SAMPLES)
    ref = run(qwen, **inp).logits
    with vtoken.patch(qwen, "none"):
        assert torch.equal(run(qwen, **inp).logits, ref)
    with vtoken.patch(qwen, "fastv", keep=1.0):
        assert torch.equal(run(qwen, **inp).logits, ref)
    with vtoken.patch(qwen, "random", keep=4):
        assert not torch.allclose(run(qwen, **inp).logits[:, -1], ref[:, -1])
    assert torch.equal(run(qwen, **inp).logits, ref)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_cached_decode_equals_recompute(qwen, name, params):
    inp = qwen_inputs(SAMPLES, seed=3)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(qwen, name, **params) as p, torch.no_grad():
        out = qwen.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0, suppress_tokens=QWEN_SPECIAL)
        with p.prompt(n):
            full = qwen(**qwen_continued(inp, out.sequences[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_batch_with_different_image_sizes_equals_alone(qwen, name, params):
    inp = qwen_inputs(SAMPLES, seed=4)
    with vtoken.patch(qwen, name, **params), torch.no_grad():
        together = qwen(**inp).logits
        for b, imgs in enumerate(SAMPLES):
            alone_inp = qwen_inputs([imgs], seed=4)
            # the same tokens and pixels as sample b of the batch
            length = int(inp["attention_mask"][b].sum())
            alone_inp["input_ids"] = inp["input_ids"][b:b + 1, -length:]
            alone_inp["attention_mask"] = inp["attention_mask"][b:b + 1, -length:]
            alone_inp["mm_token_type_ids"] = inp["mm_token_type_ids"][b:b + 1, -length:]
            if imgs:
                sizes = [h * w for _, h, w in inp["image_grid_thw"].tolist()]
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                alone_inp["pixel_values"] = torch.cat([inp["pixel_values"][starts[i]:starts[i] + sizes[i]]
                                                       for i in IMAGES_OF[b]])
                alone_inp["image_grid_thw"] = inp["image_grid_thw"][IMAGES_OF[b]]
            alone = qwen(**alone_inp).logits
            torch.testing.assert_close(together[b, -3:], alone[0, -3:], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", REDUCERS[:4])
def test_text_kept_and_3d_positions_of_kept_tokens_are_the_originals(qwen, name, params):
    inp = qwen_inputs(SAMPLES, seed=5)
    seen = {}
    with vtoken.patch(qwen, name, **params) as p, torch.no_grad():
        last = qwen.model.language_model.layers[-1]
        h = last.register_forward_pre_hook(
            lambda m, a, k: seen.update(pe=k["position_embeddings"], hid=a[0] if a else k["hidden_states"]),
            with_kwargs=True)
        try:
            qwen(**inp)
        finally:
            h.remove()
        lay = p.layout
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    for b in range(3):
        cols = lay.index[b][lay.valid[b]]
        text = torch.nonzero(mask[b] & (ids[b] != QWEN_IMAGE)).flatten()
        assert set(text.tolist()) <= set(cols.tolist())
        assert torch.all(cols[1:] > cols[:-1])
    pos, _ = qwen.model.get_rope_index(ids, image_grid_thw=inp["image_grid_thw"], attention_mask=inp["attention_mask"],
                                       mm_token_type_ids=inp["mm_token_type_ids"])
    kept = pos.gather(2, lay.index.clamp_max(ids.shape[1] - 1)[None].expand(3, -1, -1))  # all three rows
    cos, _ = qwen.model.language_model.rotary_emb(seen["hid"], kept)
    torch.testing.assert_close(seen["pe"][0][lay.valid], cos[lay.valid])


def test_vision_features_follow_the_window_permutation(qwen):
    """Raster-ordered merge-unit features, passed through the merger's MLP, give the tower's tokens."""
    inp = qwen_inputs(SAMPLES, seed=6)
    req = vtoken.SignalRequest("vision_features", -1)
    from test_reducers import Probe

    probe = Probe(requests=(req,))
    with vtoken.patch(qwen, probe), torch.no_grad():
        qwen(**inp)
        tokens = qwen.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
        merger = qwen.model.visual.merger.mlp
        feats = probe.seen[req]
        for i, t in enumerate(tokens):
            torch.testing.assert_close(merger(feats[i, : t.shape[0]]), t, atol=1e-5, rtol=1e-4)


def test_errors(qwen):
    with pytest.raises(vtoken.UnsupportedModelError, match="M-RoPE"):
        vtoken.patch(qwen, "random", keep=4, renumber=True)
    with pytest.raises(vtoken.UnsupportedModelError, match="encoder stage"):
        vtoken.patch(qwen, "tome", r=2)


def test_vision_flops_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for kind in KINDS:
        model = tiny_qwen(kind, attn="eager")
        inp = qwen_inputs([[(8, 12)], [(8, 8)]], seed=7)
        with vtoken.patch(model, "none") as p:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
            vision_counted = counter.get_total_flops()
            with torch.no_grad():
                model(**inp)
            st = p.stats
        analytic = st.flops["vision"] + st.flops["projector"]
        assert abs(analytic - vision_counted) / vision_counted < 0.02, (kind, analytic, vision_counted)
