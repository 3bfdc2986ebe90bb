"""Continuing from a reduced KV cache (issue 12, A1-A2): multi-turn generate over the conversation so
far, and plain cached steps, equal a full recompute under `p.prompt(first prompt length)`."""

from __future__ import annotations

import pytest
import torch
from conftest import CACHE, cache_of, family_setup, recompute_inputs

import vtoken
from vtoken.eval.tiny import IMAGE_TOKEN, QWEN_IMAGE

BOUNDARY = [("random", {"keep": 5}), ("pool", {"keep": 4}), ("hiprune", {"keep": 5}), ("visionzip", {"keep": 5}),
            ("divprune", {"keep": 5}), ("todre", {"keep": 5})]
ENCODER = [("tome", {"r": 4}), ("pitome", {"keep": 12}), ("dymu", {"thresholds": [0.5] * 3})]
CASES = ([("llava", n, p) for n, p in BOUNDARY + ENCODER]
         + [("llava_next", n, p) for n, p in BOUNDARY[:3] + ENCODER[:1]]
         + [(k, n, p) for k in ("qwen2_vl", "qwen2_5_vl") for n, p in BOUNDARY[:4]])


_MODELS: dict[str, tuple] = {}


def setup(family: str):
    if family not in _MODELS:
        _MODELS[family] = family_setup(family)
    return _MODELS[family]


def gen(model, suppress, **kw):
    return model.generate(**kw, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0, suppress_tokens=suppress)


@pytest.mark.parametrize("family,name,params", CASES, ids=[f"{f}-{n}" for f, n, _ in CASES])
def test_multi_turn_generate_continues_a_reduced_cache(family, name, params):
    """generate(prev sequences + follow-up, cache=out's cache) feeds only the new tokens, at their
    original positions, and equals a full recompute of the whole conversation."""
    model, inp, suppress = setup(family)
    n = inp["input_ids"].shape[1]
    follow = torch.tensor([[21, 22, 23], [24, 25, 26]])
    with vtoken.patch(model, name, **params) as p, torch.no_grad():
        first = gen(model, suppress, **inp)
        cache = cache_of(first)
        held = cache.get_seq_length()
        assert held < n  # the cache holds the reduced prompt
        turn2 = torch.cat([first.sequences, follow], 1)
        second = gen(model, suppress, **recompute_inputs(family, inp, turn2), **{CACHE: cache})
        # the cache grew by the truly new tokens only (the last answer token, the follow-up, 2 generated)
        assert cache.get_seq_length() == held + 1 + 3 + 2
        whole = second.sequences[:, :-1]
        with p.prompt(n):
            full = model(**recompute_inputs(family, inp, whole), use_cache=False).logits
    torch.testing.assert_close(full[:, turn2.shape[1] - 1:], torch.stack(second.logits, 1), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_plain_cached_step_is_numbered_after_the_original_prompt(family):
    """model(input_ids=next, cache=...) with no mask and no position ids (issue 12, A2)."""
    model, inp, _ = setup(family)
    inp = {k: (v[1:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in inp.items()}
    if family == "llava":
        inp["pixel_values"] = inp["pixel_values"][1:]
    else:  # the second sample alone (its image is the second of image_grid_thw)
        sizes = [int(t * h * w) for t, h, w in inp["image_grid_thw"].tolist()]
        inp["pixel_values"] = inp["pixel_values"][sizes[0]:]
        inp["image_grid_thw"] = inp["image_grid_thw"][1:]
    inp.pop("attention_mask")
    with vtoken.patch(model, "random", keep=4, seed=0) as p, torch.no_grad():
        out = model(**inp, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, use_cache=True, **{CACHE: cache_of(out)}).logits[:, -1]
        seq = torch.cat([inp["input_ids"], nxt], 1)
        again = dict(inp, input_ids=seq)
        if family != "llava":
            again["mm_token_type_ids"] = (seq == QWEN_IMAGE).int()
        with p.prompt(inp["input_ids"].shape[1]):
            full = model(**again, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, atol=3e-5, rtol=1e-4)


def test_new_images_in_a_continued_reduced_cache_are_refused():
    model, inp, suppress = setup("llava")
    with vtoken.patch(model, "random", keep=5), torch.no_grad():
        first = gen(model, suppress, **inp)
        extra = torch.tensor([[IMAGE_TOKEN] * 36] * 2)
        turn2 = torch.cat([first.sequences, extra], 1)
        with pytest.raises(vtoken.LayoutError, match="multi-turn"):
            gen(model, suppress, **recompute_inputs("llava", inp, turn2), **{CACHE: cache_of(first)})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_copied_prompt_cache_continues_like_the_original(family):
    """transformers' prompt-reuse pattern: prefill once, then continue from copy.deepcopy(cache) twice.
    The reduction's decode state travels with the copy, so both continuations equal a recompute."""
    import copy

    model, inp, suppress = setup(family)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, "random", keep=4, seed=0) as p, torch.no_grad():
        first = gen(model, suppress, **inp)
        prompt_cache = cache_of(first)
        turn2 = torch.cat([first.sequences, torch.tensor([[21, 22], [24, 25]])], 1)
        runs = [gen(model, suppress, **recompute_inputs(family, inp, turn2), **{CACHE: copy.deepcopy(prompt_cache)})
                for _ in range(2)]
        with p.prompt(n):
            full = model(**recompute_inputs(family, inp, runs[0].sequences[:, :-1]), use_cache=False).logits
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(full[:, turn2.shape[1] - 1:], torch.stack(runs[1].logits, 1), atol=5e-5, rtol=1e-4)
