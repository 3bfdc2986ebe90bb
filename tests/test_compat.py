"""Contract with the installed transformers (runs in every CI cell): every probe of every tiny family
resolves to a name the installed release really uses, a cached decode equals a full recompute, a
failed probe is an UnsupportedModelError at patch time, and vtoken's own calls raise no deprecation."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
import transformers
from conftest import CACHE, FAMILIES, cache_of, family_setup, pixels, recompute_inputs

import vtoken
from vtoken.adapters.hf import compat
from vtoken.eval.tiny import IMAGE_TOKEN as LLAVA_IMAGE
from vtoken.eval.tiny import tiny_llava


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return (request.param, *family_setup(request.param))


def test_every_probe_resolves_to_a_real_name(family_model):
    _, model, _, _ = family_model
    with vtoken.patch(model, "random", keep=4) as p:
        names = p.adapter.names
        lm, layer = p.adapter.lm, p.adapter.layers[0]
        assert names.version == transformers.__version__
        assert names.top_cache == CACHE
        assert names.top_cache in inspect.signature(model.forward).parameters
        assert names.lm_cache in inspect.signature(lm.forward).parameters
        assert names.layer_cache in inspect.signature(layer.forward).parameters
        assert names.mask_cache in inspect.signature(compat._create_causal_mask).parameters
        assert names.rope is inspect.getmodule(type(layer.self_attn)).apply_rotary_pos_emb
        mm = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
        assert (names.mm_encoder_outputs is not None) == mm


def test_cached_decode_equals_recompute(family_model):
    family, model, inp, image = family_model
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, "random", keep=4, seed=1) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=image)
        with p.prompt(n):
            full = model(**recompute_inputs(family, inp, out.sequences[:, :-1]), use_cache=False).logits
        before = (inp["input_ids"] == image[0]).sum(1).tolist()
        assert all(a < b for a, b in zip(p.stats.visual_tokens, before))  # the reduction did something
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=3e-5, rtol=1e-4)


def test_vtoken_calls_raise_no_deprecation(family_model):
    """transformers warns on a deprecated argument name (FutureWarning, or its logger): vtoken's own
    calls must use the installed release's names."""
    _, model, inp, image = family_model
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()  # transformers logs each deprecation once per process
    try:
        with vtoken.patch(model, "random", keep=4), warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model.generate(**inp, max_new_tokens=2, do_sample=False, pad_token_id=0, suppress_tokens=image)
    finally:
        tlog.removeHandler(handler)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    deprecations += [m for m in records if "deprecat" in m.lower()]
    assert not [m for m in deprecations if "past_key_values" in m or "cache" in m], deprecations


def test_plain_cached_step_equals_recompute_llava():
    """model(input_ids=next, <cache>=cache) after a reducing prefill, with the cache passed under the
    probed name and no mask or positions: the step is numbered after the original prompt."""
    model, _, _ = family_setup("llava")
    ids = torch.tensor([[1, 5, 6, *([LLAVA_IMAGE] * 36), 7, 8, 9]] * 2)
    ids[1, 1] = 17
    px = pixels(2)
    with vtoken.patch(model, "random", keep=4, seed=0) as p, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, use_cache=True, **{CACHE: cache_of(out)}).logits[:, -1]
        with p.prompt(ids.shape[1]):
            full = model(input_ids=torch.cat([ids, nxt], 1), pixel_values=px, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, atol=3e-5, rtol=1e-4)


def test_failed_probe_is_refused_at_patch_time():
    """A language model whose forward takes no cache argument (a rename vtoken does not know)."""
    model = tiny_llava(seed=0)
    lm = model.model.language_model
    original = lm.forward

    def forward(inputs_embeds=None, attention_mask=None, position_ids=None, kv_state=None, **kwargs):
        return original(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        **kwargs)

    lm.forward = forward  # on this instance only
    try:
        with pytest.raises(vtoken.UnsupportedModelError, match=rf"transformers {transformers.__version__}.*KV cache"):
            vtoken.patch(model, "random", keep=4)
        assert vtoken.patched(model) is None
        assert not model._forward_pre_hooks and not lm._forward_pre_hooks  # nothing left installed
    finally:
        del lm.forward


def test_a_cache_under_an_unknown_name_is_an_error():
    cache = transformers.DynamicCache()
    with pytest.raises(vtoken.UnsupportedModelError, match="kv_state"):
        compat.find_cache({"kv_state": cache}, "cache")
    assert compat.find_cache({"input_ids": torch.ones(1)}, "cache") is None
    with pytest.raises(vtoken.UnsupportedModelError, match="twice"):
        compat.find_cache({"cache": cache, "past_key_values": cache}, "cache")
