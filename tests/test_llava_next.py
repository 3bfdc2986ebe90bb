"""LLaVA-NeXT (AnyRes): base + crops, pinned newline tokens, budgets split per crop; the LLaVA battery."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.eval.tiny import IMAGE_TOKEN, next_inputs, tiny_llava_next
from vtoken.ops.diversity import greedy_diverse
from vtoken.reducers.todre import ToDREDiversity

SAMPLES = [[(60, 100)], [(56, 56), (90, 90)], []]  # 5 crops, 3 crops + 5 crops, no image
REDUCERS = [("random", {"keep": 10}), ("pool", {"keep": 10}), ("fastv", {"keep": 0.5}), ("hiprune", {"keep": 10}),
            ("visionzip", {"keep": 10}), ("divprune", {"keep": 10}), ("todre", {"keep": 10}), ("transprune", {}),
            ("tome", {"r": 3}), ("aim", {"keep": 10, "schedule": ((2, 0.5),)})]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


def positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def newline_columns(model, inp):
    """Original columns holding image_newline features (one per row of every crop grid)."""
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
    nl = model.model.image_newline
    cols, k = [], 0
    for b in range(inp["input_ids"].shape[0]):
        img_cols = torch.nonzero(inp["input_ids"][b] == IMAGE_TOKEN).flatten()
        off = 0
        while off < len(img_cols):
            f = feats[k]
            is_nl = (f == nl).all(-1)
            cols += [(b, int(img_cols[off + i])) for i in torch.nonzero(is_nl).flatten().tolist()]
            off += f.shape[0]
            k += 1
    return cols


def test_keep_all_identical_and_remove(model):
    inp = next_inputs(model, SAMPLES)
    with torch.no_grad():
        ref = model(**inp).logits
        with vtoken.patch(model, "none"):
            assert torch.equal(model(**inp).logits, ref)
        assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_newlines_and_text_survive_and_budgets_split_per_crop(model, name, params):
    inp = next_inputs(model, SAMPLES, seed=1)
    with vtoken.patch(model, name, **params) as p, torch.no_grad():
        model(**inp)
        lay = p.layout
        spans = p.runtime.last_spans
    kept = {(b, int(c)) for b in range(3) for c in lay.index[b][lay.valid[b]]}
    for b, c in newline_columns(model, inp):
        assert (b, c) in kept
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    text = {(b, int(c)) for b in range(3) for c in torch.nonzero(mask[b] & (ids[b] != IMAGE_TOKEN)).flatten()}
    assert text <= kept
    # base views get 1/P of an int budget and the crop grids the rest (P = 1 + crops)
    shares = [round(s.share, 3) for s in spans]
    assert shares == [0.2, 0.8, 0.333, 0.667, 0.2, 0.8]
    if name in ("random", "hiprune", "divprune"):
        assert [len(k) for k in p.kept_positions()] == [2, 8 + 4, 3, 7 + 4, 2, 8 + 8]  # + pinned newlines


@pytest.mark.parametrize("name,params", REDUCERS)
def test_cached_decode_equals_recompute(model, name, params):
    inp = next_inputs(model, SAMPLES, seed=2)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, name, **params) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])
        seq = out.sequences
        mask = torch.cat([inp["attention_mask"], torch.ones(3, seq.shape[1] - n, dtype=torch.long)], 1)
        with p.prompt(n):
            full = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=inp["pixel_values"],
                         image_sizes=inp["image_sizes"], position_ids=positions(mask[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", REDUCERS[:5])
def test_batch_equals_alone(model, name, params):
    inp = next_inputs(model, SAMPLES, seed=3)
    crops = [5, 3, 5]
    with vtoken.patch(model, name, **params), torch.no_grad():
        together = model(**inp).logits
        img = 0
        for b, imgs in enumerate(SAMPLES):
            length = int(inp["attention_mask"][b].sum())
            alone = {"input_ids": inp["input_ids"][b:b + 1, -length:]}
            if imgs:
                alone["pixel_values"] = inp["pixel_values"][img:img + len(imgs), : max(crops[img:img + len(imgs)])]
                alone["image_sizes"] = inp["image_sizes"][img:img + len(imgs)]
            img += len(imgs)
            out = model(**alone).logits
            torch.testing.assert_close(together[b, -3:], out[0, -3:], atol=5e-5, rtol=1e-4)


class RecordingToDRE(ToDREDiversity):
    """ToDRE stage 1 that keeps its input and selection for inspection."""

    def select(self, x):
        sel = super().select(x)
        self.__dict__.setdefault("record", []).append((x, sel))
        return sel


def test_todre_crops_start_from_the_base_view_pivot(model):
    inp = next_inputs(model, SAMPLES, seed=3)
    red = RecordingToDRE(keep=10)
    with vtoken.patch(model, red) as p, torch.no_grad():
        model(**inp)
        used = p.reducers[0]
    (x, sel), = used.record
    assert x.bases == [None, 0, None, 2, None, 4]  # each crop grid names its base view
    cls = x.signal(used.signals()[0]).float().masked_fill(~x.valid, float("-inf"))
    differs = []
    for crop, base in ((1, 0), (3, 2), (5, 4)):
        pivot = int(cls[base].argmax())
        assert sel.keep[base, pivot]  # the base view keeps its own pivot
        # the crops: k-center seeded with the base pivot's feature, not with a crop token
        want = greedy_diverse(x.features[crop:crop + 1], x.valid[crop:crop + 1], [x.keep[crop]],
                              torch.tensor([0]), "maxmin", x.features[base, pivot][None], torch.tensor([True]))
        assert torch.equal(sel.keep[crop], want[0])
        alone = greedy_diverse(x.features[crop:crop + 1], x.valid[crop:crop + 1], [x.keep[crop]],
                               cls[crop:crop + 1].argmax(1), "maxmin")
        assert int(sel.keep[crop].sum()) == x.keep[crop] == int(alone.sum())
        differs.append(not torch.equal(sel.keep[crop], alone[0]))
    assert any(differs)  # a per-crop pivot would have chosen differently here


def test_method_wrap_is_removed(model):
    base = model.model
    assert "get_image_features" not in base.__dict__
    with vtoken.patch(model, "random", keep=4):
        assert "get_image_features" in base.__dict__
    assert "get_image_features" not in base.__dict__
    with pytest.raises(vtoken.UnsupportedModelError, match="vtu"):
        vtoken.patch(model, "tome", r=2, vtu="expand")
