"""Qwen3-VL: the Qwen battery plus deepstack, whose features must follow the kept (or merged) tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vtoken
from vtoken.errors import LayoutError
from vtoken.eval.tiny import QWEN_IMAGE, QWEN_SPECIAL, qwen_continued, qwen_inputs, tiny_qwen
from vtoken.reducers.base import StageInput
from vtoken.reducers.pool import Pool, windows
from vtoken.reducers.visionzip import VisionZip

SAMPLES = [[(8, 12)], [(8, 8), (12, 8)], []]  # three image sizes, one sample without image
IMAGES_OF = [[0], [1, 2], []]
REDUCERS = [("random", {"keep": 4}), ("pool", {"keep": 6}), ("hiprune", {"keep": 8}), ("visionzip", {"keep": 8}),
            ("fastv", {"keep": 0.5, "k": 1}), ("divprune", {"keep": 8}),  # fastv at k=1: inside deepstack
            ("aim", {"keep": 6, "prune": False})]  # aim's merged tokens carry merged deepstack rows
DEEP = 2  # deepstack LLM layers of the tiny model (vision_layers=3: blocks 0 and 1 feed layers 0 and 1)


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen("qwen3_vl", vision_layers=DEEP + 1)


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)


def deepstack_by_column(model, inp):
    """(B, L, k, d): the unpatched deepstack features at the image tokens' columns (0 elsewhere)."""
    with torch.no_grad():
        out = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    per_layer = out.deepstack_features  # split per image since transformers 5.2x, one tensor before
    stack = torch.stack([torch.cat(f) if isinstance(f, (list, tuple)) else f for f in per_layer], 1)
    mask = inp["input_ids"] == QWEN_IMAGE
    return stack.new_zeros(*mask.shape, *stack.shape[1:]).masked_scatter(mask[..., None, None], stack)


class Added:
    """What vtoken's (or transformers') deepstack step adds after each of the first LLM layers: the
    layer output seen by a hook registered before the patch and by one registered after it."""

    def __init__(self, model):
        self.layers = model.model.language_model.layers[:DEEP]
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(self.before, i)) for i, layer in enumerate(self.layers)]

    def _hook(self, store, i):
        def hook(module, inputs, output):
            store[i] = output if isinstance(output, torch.Tensor) else output[0]

        return hook

    def arm_after(self):
        self.handles += [layer.register_forward_hook(self._hook(self.after, i)) for i, layer in enumerate(self.layers)]

    def delta(self, i):
        return self.after[i] - self.before[i]

    def remove(self):
        for h in self.handles:
            h.remove()


def test_keep_all_bit_identical_and_remove_restores(qwen3):
    inp = qwen_inputs(SAMPLES)
    ref = run(qwen3, **inp).logits
    for name, params in [("none", {}), ("fastv", {"keep": 1.0, "k": 1})]:
        with vtoken.patch(qwen3, name, **params):
            assert torch.equal(run(qwen3, **inp).logits, ref)
    with vtoken.patch(qwen3, "random", keep=4):
        assert not torch.allclose(run(qwen3, **inp).logits[:, -1], ref[:, -1])
    assert torch.equal(run(qwen3, **inp).logits, ref)


def test_keep_all_bit_identical_bf16():
    model = tiny_qwen("qwen3_vl", vision_layers=DEEP + 1, dtype=torch.bfloat16)
    inp = qwen_inputs(SAMPLES)
    inp["pixel_values"] = inp["pixel_values"].bfloat16()
    ref = run(model, **inp).logits
    with vtoken.patch(model, "none"):
        assert torch.equal(run(model, **inp).logits, ref)
    with vtoken.patch(model, "pool", keep=6):
        out = run(model, **inp).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name,params", REDUCERS)
def test_deepstack_follows_the_kept_tokens(qwen3, name, params):
    inp = qwen_inputs(SAMPLES, seed=5)
    feats = deepstack_by_column(qwen3, inp)
    added = Added(qwen3)
    try:
        with vtoken.patch(qwen3, name, **params) as p:
            added.arm_after()
            run(qwen3, **inp)
            lay = p.layout
    finally:
        added.remove()
    b = inp["input_ids"].shape[0]
    for i in range(DEEP):
        delta = added.delta(i)
        if delta.shape[1] == lay.shape[1]:
            index, valid, size = lay.index, lay.valid, lay.size
        else:  # fastv at layer 1: layer 0 still runs on the whole prompt
            index = torch.arange(delta.shape[1]).expand(b, -1)
            valid, size = inp["attention_mask"].bool(), torch.ones(delta.shape[:2])
        col = index.clamp_max(feats.shape[1] - 1)
        own = feats[torch.arange(b)[:, None], col, i]  # each row's own original features
        visual = valid & (inp["input_ids"].gather(1, col) == QWEN_IMAGE)
        assert torch.equal(delta[~visual], torch.zeros_like(delta[~visual]))  # text rows: untouched
        single = visual & (size == 1)
        assert single.any() or name == "pool"  # pool: every token is a window mean
        torch.testing.assert_close(delta[single], own[single], atol=2e-5, rtol=1e-5)
        if name == "pool":  # every pooled token: its window's mean
            expect = pooled_means(feats[..., i, :], inp, lay, params["keep"])
            torch.testing.assert_close(delta[visual], expect[visual], atol=2e-5, rtol=1e-5)


def pooled_means(feats, inp, lay, k):
    """Per row of the layout, the mean deepstack feature of the pool window it stands for."""
    out = torch.zeros(*lay.shape, feats.shape[-1])
    grids = [(h // 2, w // 2) for _, h, w in inp["image_grid_thw"].tolist()]
    mask = inp["input_ids"] == QWEN_IMAGE
    images = [(s, int(c)) for s in range(mask.shape[0]) for c in torch.nonzero(mask[s]).flatten()]
    starts, seen = [], set()
    for s, c in images:  # first column of each image (images are separated by start/end tokens)
        if (s, c - 1) not in seen:
            starts.append((s, c))
        seen.add((s, c))
    for (s, start), (rows, cols) in zip(starts, grids):
        for r0, r1, c0, c1 in windows(k, rows, cols):
            members = [start + r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
            row = torch.nonzero((lay.index[s] == start + r0 * cols + c0) & lay.valid[s]).flatten()
            out[s, row] = feats[s, members].mean(0)
    return out


def stage_input(feats, grid, keep, signals, shuffle):
    """One image's tokens in a shuffled slot order (exercising the grid <-> slot mapping)."""
    n = feats.shape[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle)) if shuffle else torch.arange(n)
    sig = {k: v[:, order] for k, v in signals.items()}
    return StageInput(features=feats[:, order], valid=torch.ones(1, n, dtype=torch.bool), positions=order[None],
                      sizes=torch.ones(1, n), grids=[grid], keep=[keep], want_mix=True,
                      _signal=lambda req: sig[req])


@pytest.mark.parametrize("grid,keep", [((5, 7), 6), ((4, 4), 4), ((3, 5), 7)])
def test_pool_mix_reproduces_its_values(grid, keep):
    n = grid[0] * grid[1]
    feats = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(1))
    x = stage_input(feats, grid, keep, {}, shuffle=2)
    sel = Pool(keep=keep).select(x)
    kept = sel.keep[0]
    assert int(kept.sum()) == keep
    torch.testing.assert_close((sel.mix @ x.features)[0, kept], sel.values[0, kept])
    assert torch.equal(sel.mix[0, ~kept], torch.zeros_like(sel.mix[0, ~kept]))  # dropped slots: no weights


@pytest.mark.parametrize("shuffle", [0, 3])
def test_visionzip_mix_reproduces_its_contextual_tokens(shuffle):
    r = VisionZip(keep=5, dominant=2)
    att, key, feat = r.signals()
    g = torch.Generator().manual_seed(4)
    n = 12
    feats = torch.randn(1, n, 3, generator=g)  # vision features == the tokens: no projector needed
    signals = {att: torch.rand(1, n, generator=g), key: torch.randn(1, n, 4, generator=g), feat: feats}
    x = stage_input(feats, (3, 4), 5, signals, shuffle)
    sel = r.select(x)
    kept = sel.keep[0]
    torch.testing.assert_close((sel.mix @ x.features)[0, kept], sel.values[0, kept])
    weights = sel.mix[0].sum(1)[kept]  # dominant tokens 1, contextual ones 2 (target + a mean)
    assert sorted(weights.tolist()) == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_merging_without_weights_is_refused(qwen3):
    @dataclasses.dataclass
    class PoolWithoutMix(Pool):
        def select(self, x):
            return dataclasses.replace(super().select(x), mix=None)

    inp = qwen_inputs(SAMPLES)
    with vtoken.patch(qwen3, PoolWithoutMix(keep=6)), pytest.raises(LayoutError, match=r"Selection\.mix"):
        run(qwen3, **inp)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_cached_decode_equals_recompute(qwen3, name, params):
    inp = qwen_inputs(SAMPLES, seed=3)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(qwen3, name, **params) as p, torch.no_grad():
        out = qwen3.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=QWEN_SPECIAL)
        with p.prompt(n):
            full = qwen3(**qwen_continued(inp, out.sequences[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", REDUCERS)
def test_batch_with_different_image_sizes_equals_alone(qwen3, name, params):
    inp = qwen_inputs(SAMPLES, seed=4)
    sizes = [h * w for _, h, w in inp["image_grid_thw"].tolist()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    with vtoken.patch(qwen3, name, **params), torch.no_grad():
        together = qwen3(**inp).logits
        for b, imgs in enumerate(SAMPLES):
            length = int(inp["attention_mask"][b].sum())
            alone = {k: inp[k][b:b + 1, -length:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            if imgs:
                alone["pixel_values"] = torch.cat([inp["pixel_values"][starts[i]:starts[i] + sizes[i]]
                                                   for i in IMAGES_OF[b]])
                alone["image_grid_thw"] = inp["image_grid_thw"][IMAGES_OF[b]]
            out = qwen3(**alone).logits
            torch.testing.assert_close(together[b, -3:], out[0, -3:], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name,params", [("hiprune", {"keep": 8}), ("pool", {"keep": 6})])
def test_text_kept_and_position_ids_of_kept_tokens_are_the_originals(qwen3, name, params):
    inp = qwen_inputs(SAMPLES, seed=6)
    seen = []
    lm = qwen3.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        run(qwen3, **inp)
        with vtoken.patch(qwen3, name, **params) as p:  # its pre-hook runs first: the test sees its kwargs
            h.remove()
            h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
            run(qwen3, **inp)
            lay = p.layout
    finally:
        h.remove()
    orig, reduced = seen
    assert orig.shape[0] == reduced.shape[0] == 3  # M-RoPE: (3, B, L)
    b = lay.shape[0]
    for s in range(b):
        cols = lay.index[s][lay.valid[s]]
        assert torch.equal(reduced[:, s][:, lay.valid[s]], orig[:, s, cols])
        text = torch.nonzero(inp["attention_mask"][s].bool() & (inp["input_ids"][s] != QWEN_IMAGE)).flatten()
        assert set(text.tolist()) <= set(cols.tolist())  # no text token is dropped
    assert lay.shape[1] < inp["input_ids"].shape[1]


def test_static_layout_is_refused_clearly(qwen3):
    with vtoken.patch(qwen3, "random", keep=4) as p:
        p.static_layout = True
        with pytest.raises(vtoken.errors.ParameterError, match="qwen3_vl"):
            run(qwen3, **qwen_inputs(SAMPLES))


def test_vision_features_through_the_projector_give_the_tower_tokens(qwen3):
    """VisionZip's contextual tokens are built from `vision_features` and the adapter's projector:
    together they must reproduce Qwen3-VL's merger (its norm is per patch, before the 2x2 concat)."""
    from test_reducers import Probe

    inp = qwen_inputs(SAMPLES, seed=6)
    req = vtoken.SignalRequest("vision_features", -1)
    probe = Probe(requests=(req,))
    with vtoken.patch(qwen3, probe) as p, torch.no_grad():
        qwen3(**inp)
        tokens = qwen3.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
        project = p.adapter.projector()
        for i, t in enumerate(tokens):
            torch.testing.assert_close(project(probe.seen[req][i, : t.shape[0]]), t, atol=1e-5, rtol=1e-4)
