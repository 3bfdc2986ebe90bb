"""Regression tests of issue 12 (B6, B7, B10, C): ordinary uses that crashed."""

from __future__ import annotations

import pytest
import torch
from conftest import CACHE, cache_of, family_setup

import vtoken
from vtoken.eval.tiny import (
    IMAGE_TOKEN,
    QWEN_END,
    QWEN_IMAGE,
    QWEN_START,
    next_inputs,
    pad_batch,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
)


def _llava_inputs():
    return family_setup("llava")[1]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_visionzip_keeps_its_vision_capture_for_uncached_generate(family):
    """B6: VisionZip's projection of its contextual tokens is vtoken's own call; it must not overwrite
    the captured tower output, which later steps of generate(use_cache=False) match against."""
    if family == "llava":
        model, inp = tiny_llava(seed=0), _llava_inputs()
    else:
        model = tiny_llava_next(seed=0)
        inp = next_inputs(model, [[(56, 112)], [(112, 112)]], seed=1)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN],
              output_logits=True, return_dict_in_generate=True)
    with vtoken.patch(model, "visionzip", keep=6) as p, torch.no_grad():
        cached = model.generate(**inp, **kw)
        with p.prompt(inp["input_ids"].shape[1]):
            uncached = model.generate(**inp, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name", ["random", "hiprune"])
def test_qwen_generate_with_an_image_and_a_video(kind, name):
    """B7: generate() encodes the image and the video in separate tower runs before the prefill; the
    prompt's image is matched across both. The video is reduced too (its budget of 4 split over its two
    frames); the result equals a recompute."""
    model = tiny_qwen(kind)
    g = torch.Generator().manual_seed(0)
    video = model.config.video_token_id
    ids = [1, 20, QWEN_START, *[QWEN_IMAGE] * 16, QWEN_END, 21, QWEN_START, *[video] * 32, QWEN_END, 30, 31, 32]
    inp = pad_batch([ids])
    inp["pixel_values"] = torch.randn(64, 3 * 2 * 14 * 14, generator=g)
    inp["image_grid_thw"] = torch.tensor([[1, 8, 8]])
    inp["pixel_values_videos"] = torch.randn(128, 3 * 2 * 14 * 14, generator=g)
    inp["video_grid_thw"] = torch.tensor([[2, 8, 8]])
    types = lambda x: (x == QWEN_IMAGE).int() + 2 * (x == video).int()  # noqa: E731
    inp["mm_token_type_ids"] = types(inp["input_ids"])
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, name, keep=4) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, suppress_tokens=[QWEN_IMAGE, QWEN_START, QWEN_END, video])
        assert p.stats.visual_tokens == [4 + 4]
        assert [len(k) for k in p.kept_positions()] == [4, 2, 2]
        seq = out.sequences[:, :-1]
        full = dict(inp, input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=types(seq))
        with p.prompt(n):
            logits = model(**full, use_cache=False).logits
    torch.testing.assert_close(logits[:, n - 1:], torch.stack(out.logits, 1), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", [("transprune", {}), ("fastv", {"keep": 8}), ("hiprune", {"keep": 8})])
def test_gradient_checkpointing_backward_equals_plain_backward(name, params):
    """B10: with gradient checkpointing, sub-block hooks fire again in backward (recomputation); the
    TTV accumulation must not see that recomputation, and gradients equal those without checkpointing."""
    inp = _llava_inputs()
    labels = inp["input_ids"].clone()
    labels[:, :-3] = -100
    grads = []
    for checkpointing in (False, True):
        model = tiny_llava(seed=0).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        with vtoken.patch(model, name, **params) as p:
            model(**inp, labels=labels, use_cache=False).loss.backward()
            assert max(p.stats.visual_tokens) <= 36
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_llava_next_stats_report_the_pinned_newlines():
    """C: LLaVA-NeXT keeps every row-end newline token outside the budget; the statistics say how many."""
    model = tiny_llava_next(seed=0)
    inp = next_inputs(model, [[(56, 112)], [(112, 112)]], seed=1)
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
    newlines = [int((f == model.model.image_newline).all(-1).sum()) for f in feats]
    assert min(newlines) > 0
    with vtoken.patch(model, "random", keep=4) as p, torch.no_grad():
        model(**inp)
        st = p.stats
    assert st.pinned_tokens == newlines
    assert [v - n for v, n in zip(st.visual_tokens, newlines)] == [4, 4]  # the budget itself is met
    assert "pinned" in st.summary()


def test_a_generated_placeholder_token_is_not_a_new_image():
    """A random model may generate the image placeholder id: with no pixels it is only a token."""
    model, inp = tiny_llava(seed=0), _llava_inputs()
    with vtoken.patch(model, "random", keep=5), torch.no_grad():
        out = model(**inp, use_cache=True)
        mask = torch.cat([inp["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(input_ids=torch.full((2, 1), IMAGE_TOKEN), attention_mask=mask, use_cache=True,
                     **{CACHE: cache_of(out)})
    assert step.logits.shape[:2] == (2, 1)
