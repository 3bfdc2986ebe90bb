"""Core behaviour on a tiny random LLaVA: exactness, invariants, caching, batching, FLOPs, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import BEAMS_SEE_OWN_IMAGES, CACHE, N_IMG, cache_of, make_batch, make_prompt, pixels, positions
from torch.utils.flop_counter import FlopCounterMode

import vtoken
from vtoken.eval.tiny import IMAGE_TOKEN, tiny_llava

REDUCERS = [
    ("random", {"keep": 9}),
    ("pool", {"keep": 9}),
    ("fastv", {"keep": 9}),
    ("fastv", {"keep": 0.5, "k": 1}),
    ("random", {"keep": 12, "renumber": True}),
    ("fastv", {"keep": 7, "renumber": True}),
    ("hiprune", {"keep": 10}),
    ("visionzip", {"keep": 10}),
    ("divprune", {"keep": 9}),
    ("todre", {"keep": 9}),
    ("todre", {"keep": 9, "selection": "maxsum", "tau": 1.0}),  # tau 1: stage 2 drops every image
    ("transprune", {}),
    ("transprune", {"keep": 3, "renumber": True, "abs_direction": True}),
    ("aim", {"keep": 9, "schedule": ((2, 0.5), (3, 0.25))}),
    ("aim", {"merge": False, "schedule": ((1, 0.5),), "renumber": True}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in REDUCERS]


def final_budget(p: vtoken.Patch, n: int) -> int:
    """Visual tokens per image after every reduction point (content-adaptive stages: all or none)."""
    entry = n
    for layer, reducers in p.runtime.points():
        for r in reducers:
            n = (0 if r.tau >= 1 else n) if r.adaptive else r.budget(n, layer, entry)
        entry = n if layer is None else entry
    return n


def ragged_batch() -> tuple[dict[str, torch.Tensor], list[list[int]], torch.Tensor]:
    """Three left-padded samples: one image, two images, no image (ragged visual counts)."""
    prompts = [make_prompt(1, text=4, seed=1), make_prompt(2, text=6, seed=2), make_prompt(0, text=9, seed=3)]
    return make_batch(prompts), prompts, pixels(3, seed=5)


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def gen(model, **inputs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, suppress_tokens=[IMAGE_TOKEN],  # random weights may emit the image token
        )


# --- exactness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("random", {"keep": N_IMG}), ("pool", {"keep": N_IMG}),
                                         ("fastv", {"keep": 1.0}), ("fastv", {"ratio": 0.0, "k": 3})])
def test_keep_all_is_bit_identical(llava, name, params):
    batch, _, px = ragged_batch()
    ref = run(llava, **batch, pixel_values=px).logits
    ref_gen = gen(llava, **batch, pixel_values=px).sequences
    with vtoken.patch(llava, name, **params):
        out = run(llava, **batch, pixel_values=px).logits
        out_gen = gen(llava, **batch, pixel_values=px).sequences
    assert torch.equal(out, ref)
    assert torch.equal(out_gen, ref_gen)


def test_remove_and_unpatch_restore_bit_identical(llava):
    ids = torch.tensor([make_prompt(1)])
    px = pixels(1)
    ref = run(llava, input_ids=ids, pixel_values=px).logits
    p = vtoken.patch(llava, "random", keep=5)
    reduced = run(llava, input_ids=ids, pixel_values=px).logits
    assert not torch.allclose(reduced[0, -1], ref[0, -1])  # the reduction does change the output
    p.remove()
    assert torch.equal(run(llava, input_ids=ids, pixel_values=px).logits, ref)
    vtoken.patch(llava, "fastv", keep=5)
    assert vtoken.unpatch(llava) is True
    assert vtoken.unpatch(llava) is False
    assert torch.equal(run(llava, input_ids=ids, pixel_values=px).logits, ref)
    assert vtoken.patched(llava) is None


def test_context_manager_removes(llava):
    ids = torch.tensor([make_prompt(1)])
    px = pixels(1)
    ref = run(llava, input_ids=ids, pixel_values=px).logits
    with vtoken.patch(llava, "pool", keep=4) as p:
        assert p.active
    assert not p.active and "removed" in p.describe()
    assert torch.equal(run(llava, input_ids=ids, pixel_values=px).logits, ref)


@pytest.mark.parametrize("name,params", REDUCERS, ids=IDS)
def test_model_stays_on_sdpa(llava, name, params):
    with vtoken.patch(llava, name, **params):
        run(llava, input_ids=torch.tensor([make_prompt(1)]), pixel_values=pixels(1))
        assert llava.config._attn_implementation == "sdpa"
        assert llava.model.language_model.config._attn_implementation == "sdpa"
        assert llava.model.vision_tower.config._attn_implementation == "sdpa"


# --- caching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", REDUCERS, ids=IDS)
def test_cached_greedy_equals_full_recompute(llava, name, params):
    batch, _, px = ragged_batch()
    prompt_len = batch["input_ids"].shape[1]
    with vtoken.patch(llava, name, **params) as p:
        out = gen(llava, **batch, pixel_values=px)
        seq = out.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones(3, seq.shape[1] - prompt_len, dtype=torch.long)], 1)
        with p.prompt(prompt_len):
            full = run(llava, input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=px,
                       position_ids=positions(mask[:, :-1]), use_cache=False).logits
    steps = torch.stack(out.logits, 1)  # (B, new, V)
    torch.testing.assert_close(full[:, prompt_len - 1:], steps, atol=2e-5, rtol=1e-5)
    # The reduction changed something, so the test is not vacuous.
    ref = gen(llava, **batch, pixel_values=px)
    assert not torch.allclose(torch.stack(ref.logits, 1), steps, atol=1e-3)


@pytest.mark.parametrize("name,params", [("random", {"keep": 9}), ("fastv", {"keep": 9}), ("hiprune", {"keep": 9}),
                                         ("transprune", {})])
def test_beam_search_cached_equals_uncached(llava, name, params):
    batch, prompts, px = ragged_batch()
    if not BEAMS_SEE_OWN_IMAGES:  # no multi-image sample: transformers itself mixes their beams' images
        prompts = [make_prompt(1, text=4, seed=1), make_prompt(1, text=6, seed=2), make_prompt(0, text=9, seed=3)]
        batch, px = make_batch(prompts), px[:2]
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True, suppress_tokens=[IMAGE_TOKEN])
    with vtoken.patch(llava, name, **params) as p, torch.no_grad():
        cached = llava.generate(**batch, pixel_values=px, **kw)
        with p.prompt(batch["input_ids"].shape[1]):
            uncached = llava.generate(**batch, pixel_values=px, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=1e-4)


def test_model_call_with_cache_continues_consistently(llava):
    """A manual prefill + decode loop (no generate, no position ids) equals one full forward."""
    ids = torch.tensor([make_prompt(2, seed=7)])
    px = pixels(2, seed=7)
    nxt = torch.tensor([[44], [55], [66]]).T  # three tokens appended one by one
    with vtoken.patch(llava, "random", keep=10, renumber=True) as p:
        out = run(llava, input_ids=ids, pixel_values=px, use_cache=True)
        cache, steps = cache_of(out), []
        for t in range(3):
            o = run(llava, input_ids=nxt[:, t:t + 1], use_cache=True, **{CACHE: cache})
            steps.append(o.logits[:, -1])
        full = run(llava, input_ids=torch.cat([ids, nxt], 1), pixel_values=px, use_cache=False).logits
        assert p.stats.decode_steps == 0  # the last call was a fresh prefill
    torch.testing.assert_close(full[:, -3:], torch.stack(steps, 1), atol=2e-5, rtol=1e-5)


# --- invariants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", REDUCERS, ids=IDS)
def test_invariants_text_kept_order_and_positions(llava, name, params):
    batch, _, px = ragged_batch()
    seen: dict[int, dict] = {}

    def probe(i):
        def hook(m, a, k):
            h = a[0] if a else k["hidden_states"]
            seen[i] = {"pos": k["position_ids"], "len": h.shape[1], "pe": k["position_embeddings"], "h": h}
        return hook

    with vtoken.patch(llava, name, **params) as p:
        # registered after vtoken's hooks, so these see what the layers really receive
        hooks = [layer.register_forward_pre_hook(probe(i), with_kwargs=True)
                 for i, layer in enumerate(llava.model.language_model.layers)]
        try:
            out = run(llava, **batch, pixel_values=px, position_ids=positions(batch["attention_mask"]), use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        lay = p.layout
        kept = p.kept_positions()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    is_text = mask & (ids != IMAGE_TOKEN)
    for b in range(3):
        cols = lay.index[b][lay.valid[b]]
        # 1. every text token survives, in order
        assert set(torch.nonzero(is_text[b]).flatten().tolist()) <= set(cols.tolist())
        # 2. rows stay in original order
        assert torch.all(cols[1:] > cols[:-1])
    # 3. kept visual tokens: subset of the image's positions, ascending, exactly the budget
    for k in kept:
        assert torch.all(k[1:] > k[:-1]) and (len(k) == 0 or (k.min() >= 0 and k.max() < N_IMG))
    assert [len(k) for k in kept] == [final_budget(p, N_IMG)] * 3
    # 4. position ids reaching the last layer equal the originals (or the compacted ones)
    last = seen[len(seen) - 1]
    orig = positions(batch["attention_mask"])
    expect = orig.gather(1, lay.index.clamp_max(orig.shape[1] - 1))
    if params.get("renumber"):
        # compact: consecutive within each sample's real tokens (left padding: they start at 0)
        expect = (lay.valid.long().cumsum(1) - 1).clamp_min(0)
    assert last["len"] == lay.valid.shape[1]
    torch.testing.assert_close(last["pos"][lay.valid], expect[lay.valid])
    # 5. at every layer, the rotary embeddings of the real rows are those of their position ids
    rotary = llava.model.language_model.rotary_emb
    segments = {s.layer: s.layout.valid for s in cache_of(out)._vtoken_decode.segments}
    valid = batch["attention_mask"].bool()
    for i in range(len(seen)):
        valid = segments.get(i, valid)
        got = seen[i]
        cos, _ = rotary(got["h"], got["pos"].expand(got["h"].shape[0], -1))
        torch.testing.assert_close(got["pe"][0].expand_as(cos)[valid], cos[valid], msg=f"layer {i}")


def test_two_images_in_one_prompt_each_get_the_budget(llava):
    ids = torch.tensor([make_prompt(2, seed=4)])
    with vtoken.patch(llava, "random", keep=6) as p:
        run(llava, input_ids=ids, pixel_values=pixels(2))
        assert [len(k) for k in p.kept_positions()] == [6, 6]
        assert p.stats.visual_tokens == [12]


# --- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("random", {"keep": 9}), ("pool", {"keep": 4}), ("fastv", {"keep": 0.25}),
                                         ("hiprune", {"keep": 10}), ("visionzip", {"keep": 8}),
                                         ("divprune", {"keep": 6}), ("todre", {"keep": 6}), ("transprune", {})])
def test_batch_with_padding_equals_each_sample_alone(llava, name, params):
    batch, prompts, px = ragged_batch()
    img_of = [[0], [1, 2], []]
    with vtoken.patch(llava, name, **params) as p:
        together = gen(llava, **batch, pixel_values=px)
        assert p.stats.visual_per_layer[-1] == [final_budget(p, N_IMG) * len(i) for i in img_of]
        for b, prompt in enumerate(prompts):
            single = {"input_ids": torch.tensor([prompt])}
            if img_of[b]:
                single["pixel_values"] = px[img_of[b]]
            alone = gen(llava, **single)
            n = len(prompt)
            got = together.sequences[b, -(n + 6):]
            assert torch.equal(got, alone.sequences[0])
            torch.testing.assert_close(
                torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0], atol=5e-5, rtol=1e-4
            )


def test_right_padding_scoring_matches_alone(llava):
    """Right-padded batches (scoring) keep working: logits at real positions match each sample alone."""
    prompts = [make_prompt(1, text=3, seed=11), make_prompt(1, text=8, seed=12)]
    batch = make_batch(prompts, side="right")
    px = pixels(2, seed=3)
    with vtoken.patch(llava, "fastv", keep=5) as p:
        with p.prompt([len(q) for q in prompts]):
            both = run(llava, **batch, pixel_values=px, use_cache=False).logits
        for b, q in enumerate(prompts):
            alone = run(llava, input_ids=torch.tensor([q]), pixel_values=px[b:b + 1], use_cache=False).logits
            text = torch.tensor(q) != IMAGE_TOKEN
            torch.testing.assert_close(both[b, : len(q)][text], alone[0][text], atol=5e-5, rtol=1e-4)


# --- outputs ------------------------------------------------------------------------------------


def test_logits_keep_original_length_and_loss(llava):
    ids = torch.tensor([make_prompt(1, text=6)])
    px = pixels(1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    with vtoken.patch(llava, "random", keep=4) as p:
        out = run(llava, input_ids=ids, pixel_values=px, labels=labels)
        lay = p.layout
    assert out.logits.shape[:2] == ids.shape
    # a dropped column carries the logits of the last kept row before it (forward fill)
    kept_cols = lay.index[0][lay.valid[0]]
    last_img = int(torch.nonzero(ids[0] == IMAGE_TOKEN).max())
    prev_kept = int(kept_cols[kept_cols <= last_img].max())
    assert torch.equal(out.logits[0, last_img], out.logits[0, prev_kept])
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    # logits_to_keep > 1 returns the last columns of the re-expanded logits
    with vtoken.patch(llava, "random", keep=4):
        last3 = run(llava, input_ids=ids, pixel_values=px, logits_to_keep=3).logits
        tup = llava(input_ids=ids, pixel_values=px, return_dict=False)
    assert torch.equal(last3, out.logits[:, -3:])
    assert isinstance(tup, tuple) and torch.allclose(tup[0], out.logits)


def test_fastv_side_path_matches_eager_attention(llava_eager):
    """The side-path attention used by FastV equals eager attention weights (mean over heads)."""
    captured = {}

    @vtoken.register("_probe_fastv")
    @dataclass
    class Probe(vtoken.get("fastv")):
        stage: ClassVar[str] = "decoder"

        def select(self, x):
            captured["scores"] = x.signal(self.signals()[0])
            return super().select(x)

    batch, _, px = ragged_batch()
    with torch.no_grad():
        ref = llava_eager(**batch, pixel_values=px, output_attentions=True)
    with vtoken.patch(llava_eager, "_probe_fastv", keep=1.0, k=2):
        run(llava_eager, **batch, pixel_values=px)
    att = ref.attentions[1].mean(1)[:, -1]  # layer k-1 = 1, last query row, mean over heads
    ids = batch["input_ids"]
    for b, img in enumerate([[0], [1, 2], []]):
        cols = torch.nonzero(ids[b] == IMAGE_TOKEN).flatten()
        want = att[b, cols].view(len(img), N_IMG) if img else att[b, :0].view(0, N_IMG)
        got = captured["scores"][img[0]: img[-1] + 1] if img else captured["scores"][:0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- statistics and FLOPs -----------------------------------------------------------------------


def test_stats_tokens_per_layer(llava):
    ids = torch.tensor([make_prompt(1, text=5)])
    total = ids.shape[1]
    with vtoken.patch(llava, "fastv", keep=9, k=2) as p:
        run(llava, input_ids=ids, pixel_values=pixels(1))
        st = p.stats
    assert st.visual_tokens == [N_IMG]
    assert st.visual_per_layer == [[N_IMG], [N_IMG], [9], [9]]
    assert st.tokens_per_layer == [[total], [total], [total - N_IMG + 9], [total - N_IMG + 9]]
    assert st.overhead_s > 0
    assert st.flops["total"] == sum(v for k, v in st.flops.items() if k != "total")


@pytest.mark.parametrize("name,params", [(None, {}), ("random", {"keep": 9}), ("fastv", {"keep": 9})])
def test_analytic_flops_match_flop_counter(name, params):
    # eager attention: on the CPU, FlopCounterMode does not see inside SDPA's fused kernel
    model = tiny_llava(seed=1, llm_layers=3, attn="eager")
    ids = torch.tensor([make_prompt(1, text=20)])
    px = pixels(1)
    p = vtoken.patch(model, name, **params) if name else vtoken.patch(model, "random", keep=N_IMG)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, pixel_values=px, use_cache=False)
    st = p.stats
    p.remove()
    counted = counter.get_total_flops()
    assert abs(st.flops["total"] - counted) / counted < 0.02, (st.flops, counted)


def test_decode_flops_accumulate_over_generate(llava):
    ids = torch.tensor([make_prompt(1)])
    with vtoken.patch(llava, "random", keep=9) as p:
        gen(llava, input_ids=ids, pixel_values=pixels(1))
        st = p.stats
    assert st.decode_steps == 5  # 6 new tokens: 1 from the prefill, 5 decoding forwards
    assert st.flops["decode"] > 0 and st.flops["vision"] > 0


# --- API and errors ------------------------------------------------------------------------------


def test_default_patch_is_fastv_half(llava):
    with vtoken.patch(llava) as p:
        assert [r.name for r in p.reducers] == ["fastv"]
        assert p.reducers[0].keep == 0.5
        assert "family default" in p.describe() and "fastv" in p.describe()


def test_registry():
    assert {"random", "pool", "fastv"} <= set(vtoken.available())
    assert vtoken.get("pool").name == "pool"
    with pytest.raises(vtoken.UnknownReducerError, match="fastv"):
        vtoken.get("fastvv")


def test_composition_in_stage_order(llava):
    ids = torch.tensor([make_prompt(1)])
    with vtoken.patch(llava, ["fastv", "random"], fastv={"keep": 0.5}, random={"keep": 16}) as p:
        assert [r.name for r in p.reducers] == ["random", "fastv"]
        run(llava, input_ids=ids, pixel_values=pixels(1))
        assert p.stats.visual_tokens == [16]
        assert p.stats.visual_per_layer[-1] == [8]
    with pytest.raises(vtoken.ParameterError, match="name=dict"):
        vtoken.patch(llava, ["fastv", "random"], keep=4)


def test_errors_are_clear(llava):
    with pytest.raises(vtoken.UnknownReducerError, match="Did you mean 'random'"):
        vtoken.patch(llava, "randon")
    with pytest.raises(vtoken.UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vtoken.patch(torch.nn.Linear(2, 2), "random")
    with pytest.raises(vtoken.BudgetError, match="at least one"):
        vtoken.patch(llava, "random", keep=0)
    with pytest.raises(vtoken.BudgetError, match="only 36 visual tokens"):
        vtoken.patch(llava, "random", keep=37)
    with pytest.raises(vtoken.BudgetError, match=r"\(0, 1\]"):
        vtoken.patch(llava, "fastv", keep=1.5)
    with pytest.raises(vtoken.ParameterError, match=r"Did you mean 'keep'.*Its parameters"):
        vtoken.patch(llava, "fastv", kepe=4)
    with pytest.raises(vtoken.BudgetError, match="layer 9 does not exist"):
        vtoken.patch(llava, "fastv", k=9)
    with pytest.raises(vtoken.ParameterError, match="k"):
        vtoken.patch(llava, "fastv", k=0)
    with pytest.raises(vtoken.ParameterError, match="none keeps every visual token"):
        vtoken.patch(llava, "none", keep=4)
    with pytest.raises(vtoken.ParameterError, match="none keeps every visual token"):
        vtoken.patch(llava, "none", keep=1)  # an int budget of one token, not "everything"
    p = vtoken.patch(llava, "random", keep=4)
    try:
        with pytest.raises(vtoken.AlreadyPatchedError, match="remove"):
            vtoken.patch(llava, "pool", keep=4)
    finally:
        p.remove()
    assert vtoken.patched(llava) is None  # failed patches leave nothing behind


def test_exception_inside_forward_leaves_no_stale_state(llava):
    ids = torch.tensor([make_prompt(1)])
    px = pixels(1)
    with vtoken.patch(llava, "fastv", keep=6) as p:
        good = run(llava, input_ids=ids, pixel_values=px).logits
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            run(llava, input_ids=ids, pixel_values=pixels(2))  # two images' pixels, one image's tokens
        with pytest.raises(ZeroDivisionError):  # a failure inside a decoder layer, mid-reduction
            h = llava.model.language_model.layers[3].register_forward_pre_hook(lambda *a: 1 / 0)
            try:
                run(llava, input_ids=ids, pixel_values=px)
            finally:
                h.remove()
        again = run(llava, input_ids=ids, pixel_values=px).logits
        assert p.stats.visual_per_layer[-1] == [6]
    assert torch.equal(again, good)


def test_images_in_continued_cache_are_refused(llava):
    ids = torch.tensor([make_prompt(1)])
    with vtoken.patch(llava, "random", keep=6):
        out = run(llava, input_ids=ids, pixel_values=pixels(1), use_cache=True)
        with pytest.raises(vtoken.LayoutError, match="multi-turn"):
            run(llava, input_ids=ids, pixel_values=pixels(1), **{CACHE: cache_of(out)})


@pytest.mark.parametrize(("name", "params", "last"), [("fastv", {"keep": 9}, [9, 18, 0]),
                                                    ("aim", {"keep": 9, "schedule": ((2, 0.5),)}, [4, 8, 0])])
def test_bf16_runs_and_keeps_cache_consistency(name, params, last):
    model = tiny_llava(seed=2, dtype=torch.bfloat16)
    batch, _, px = ragged_batch()
    px = px.to(torch.bfloat16)
    prompt_len = batch["input_ids"].shape[1]
    with vtoken.patch(model, name, **params) as p:
        out = gen(model, **batch, pixel_values=px)
        seq = out.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones(3, seq.shape[1] - prompt_len, dtype=torch.long)], 1)
        with p.prompt(prompt_len):
            full = run(model, input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=px,
                       position_ids=positions(mask[:, :-1]), use_cache=False).logits
        assert p.stats.visual_per_layer[-1] == last
    steps = torch.stack(out.logits, 1).float()
    assert torch.isfinite(steps).all()
    # bf16 kernels differ between cached and full passes; compare the distributions loosely
    torch.testing.assert_close(full[:, prompt_len - 1:].float().softmax(-1), steps.softmax(-1), atol=0.05, rtol=0)


def test_labels_keep_the_continuation_out_of_the_reduction(llava):
    """Scoring with labels (-100 on the context) reduces exactly as the context alone would."""
    ids = torch.tensor([[*make_prompt(1, text=6, seed=9), 40, 41, 42]])
    px = pixels(1, seed=9)
    context = ids.shape[1] - 3
    labels = ids.clone()
    labels[:, :context] = -100
    with vtoken.patch(llava, "fastv", keep=6) as p:
        scored = run(llava, input_ids=ids, pixel_values=px, labels=labels)
        kept_scored = p.kept_positions()
        with p.prompt(context):
            ref = run(llava, input_ids=ids, pixel_values=px).logits
            kept_ref = p.kept_positions()
        run(llava, input_ids=ids, pixel_values=px)
        kept_plain = p.kept_positions()
    assert torch.equal(kept_scored[0], kept_ref[0])
    torch.testing.assert_close(scored.logits, ref)
    assert not torch.equal(kept_plain[0], kept_ref[0])  # without labels the continuation would steer it
