"""Video inputs on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: each frame is reduced like an image, with the
video's int budget split evenly over its frames; images and videos in one prompt; ragged frame counts."""

from __future__ import annotations

import pytest
import torch
from conftest import qwen_media_of

import vtoken
from vtoken.eval.tiny import QWEN_IMAGE, QWEN_SPECIAL, QWEN_VIDEO, qwen_continued, qwen_media_inputs, tiny_qwen

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# sample 0: an image and a 2-frame video; sample 1: a 3-frame video of another size; sample 2: text only
SAMPLES = [[(8, 8), (2, 8, 12)], [(3, 8, 8)], []]
REDUCERS = [("random", {"keep": 5}), ("pool", {"keep": 4}), ("hiprune", {"keep": 5}), ("visionzip", {"keep": 5}),
            ("fastv", {"keep": 0.5}), ("divprune", {"keep": 5}), ("aim", {"keep": 5, "schedule": ((2, 0.5),)})]


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    return request.param, tiny_qwen(request.param, vision_layers=3)


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)


def test_keep_all_bit_identical_and_remove_restores(qwen):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind)
    ref = run(model, **inp).logits
    for name, params in [("none", {}), ("fastv", {"keep": 1.0})]:
        with vtoken.patch(model, name, **params):
            assert torch.equal(run(model, **inp).logits, ref)
    with vtoken.patch(model, "random", keep=5):
        assert not torch.allclose(run(model, **inp).logits[:, -1], ref[:, -1])
    assert torch.equal(run(model, **inp).logits, ref)


def test_video_budget_is_split_over_its_frames(qwen):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind)
    with vtoken.patch(model, "random", keep=5) as p:
        run(model, **inp)
        kept = [len(k) for k in p.kept_positions()]
    # spans in order: sample 0's image, its 2 frames; sample 1's 3 frames
    assert kept == [5, 3, 2, 2, 2, 1]
    with vtoken.patch(model, "random", keep=0.25) as p:
        run(model, **inp)
        kept = [len(k) for k in p.kept_positions()]
    assert kept == [4, 6, 6, 4, 4, 4]  # a fraction applies to each frame's tokens (16, 24, 24, 16, 16, 16)


def test_text_and_timestamps_are_never_dropped(qwen):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind)
    with vtoken.patch(model, "pool", keep=4) as p:
        run(model, **inp)
        lay = p.layout
    ids = inp["input_ids"]
    for s in range(ids.shape[0]):
        cols = set(lay.index[s][lay.valid[s]].tolist())
        real = inp["attention_mask"][s].bool()
        text = torch.nonzero(real & (ids[s] != QWEN_IMAGE) & (ids[s] != QWEN_VIDEO)).flatten().tolist()
        assert set(text) <= cols
    assert lay.shape[1] < ids.shape[1]


@pytest.mark.parametrize("name,params", REDUCERS)
def test_batch_with_ragged_frames_equals_alone(qwen, name, params):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind, seed=4)
    with vtoken.patch(model, name, **params), torch.no_grad():
        together = model(**inp).logits
        for b, items in enumerate(SAMPLES):
            alone = qwen_media_inputs([items], kind, seed=4)
            length = int(inp["attention_mask"][b].sum())
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):  # the batch's own tokens
                alone[key] = inp[key][b:b + 1, -length:]
            alone.update(qwen_media_of(inp, SAMPLES, b))
            out = model(**alone).logits
            torch.testing.assert_close(together[b, -3:], out[0, -3:], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_cached_decode_equals_recompute(qwen, name, params):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind, seed=3)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, name, **params) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=QWEN_SPECIAL)
        with p.prompt(n):
            full = model(**qwen_continued(inp, out.sequences[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=5e-5, rtol=1e-4)


def test_video_without_frame_grids_is_refused(qwen):
    kind, model = qwen
    inp = qwen_media_inputs([[(2, 8, 8)]], kind)
    inp.pop("video_grid_thw")
    inp.pop("pixel_values_videos")
    with vtoken.patch(model, "random", keep=4), pytest.raises(vtoken.errors.LayoutError, match="video_grid_thw"):
        run(model, **inp)


@pytest.mark.parametrize("name", ["hiprune", "visionzip", "pool"])
def test_frames_are_reduced_as_the_same_pixels_as_images(qwen, name):
    """A 2-frame video and two images of the same pixels: the tower sees the same patches per frame
    (it attends within a frame), so vision-signal reducers keep the same tokens per frame."""
    kind, model = qwen
    video = qwen_media_inputs([[(2, 8, 12)]], kind, seed=7)
    images = qwen_media_inputs([[(8, 12), (8, 12)]], kind, seed=8)
    images["pixel_values"] = video["pixel_values_videos"]
    kept = []
    for inp, keep in ((video, 6), (images, 3)):  # the video's 6 split over 2 frames = 3 per image
        with vtoken.patch(model, name, keep=keep) as p:
            run(model, **inp)
            kept.append([k.tolist() for k in p.kept_positions()])
    assert kept[0] == kept[1]


@pytest.mark.parametrize("kind", KINDS)
def test_vision_flops_of_images_and_videos_match_the_counter(kind):
    """Frames attend within themselves, so the analytic count is per frame (and Qwen3-VL's deepstack
    mergers are counted); checked against torch's counter on eager attention."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_qwen(kind, attn="eager", vision_layers=3)
    inp = qwen_media_inputs(SAMPLES, kind, seed=7)
    with vtoken.patch(model, "none") as p:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
            model.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"])
        run(model, **inp)
        st = p.stats
    analytic = st.flops["vision"] + st.flops["projector"]
    counted = counter.get_total_flops()
    assert abs(analytic - counted) / counted < 0.02, (kind, analytic, counted)
