"""HoliTom (`holitom`): segmentation, DPC-kNN, budgets and the inner merge checked against the worked
examples of the authors' code (their functions run on them); the inner selection against the model's
own eager attention; the model-level invariants on Qwen2-VL / 2.5-VL videos."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import family_setup, qwen_media_of

import vtoken
from vtoken.eval.tiny import QWEN_SPECIAL, qwen_continued, qwen_media_inputs, tiny_qwen
from vtoken.ops.density import dpc_knn, merge_into_centres
from vtoken.ops.temporal import frame_similarity, segment, static_table
from vtoken.reducers.holitom import HoliTomMerge, fold_into_kept

ANGLES = [[0, 0, 0, 0], [0, 10, 90, 60], [0, 20, 90, 60], [0, 30, 90, 0], [90, 40, 90, 0]]
ATTENTION = [[.1, .4, .3, .2], [.25] * 4, [.1, .2, .3, .4], [.4, .3, .2, .1], [.5, .1, .1, .3]]


def example_a() -> torch.Tensor:
    """Five frames of four 2-D tokens: token p of frame f has radius 1 + 0.1 f + 0.5 p at ANGLES[f][p]."""
    ang = torch.deg2rad(torch.tensor(ANGLES, dtype=torch.float64))
    rad = 1 + 0.1 * torch.arange(5)[:, None] + 0.5 * torch.arange(4)[None]
    return torch.stack([rad * ang.cos(), rad * ang.sin()], -1)


def test_segmentation_reproduces_the_authors_example():
    s = frame_similarity(example_a())
    expect = torch.tensor([[1, .984808, 0, .5], [1, .984808, 1, 1], [1, .984808, 1, .5], [0, .984808, 1, 1]])
    torch.testing.assert_close(s, expect.float(), atol=1e-6, rtol=0)
    static = static_table(s > 0.8)
    gain = static.sum(-1) * (torch.arange(5)[None] - torch.arange(5)[:, None]).clamp_min(0)
    assert gain.tolist() == [[0, 2, 4, 6, 4], [0, 0, 4, 6, 6], [0, 0, 0, 3, 4], [0, 0, 0, 0, 3], [0] * 5]
    assert segment(static) == ([(0, 0), (1, 2), (3, 4)], 7)  # [0, 2] ties at 4 and loses to the earlier choice
    strict = static_table(s > 0.99)
    assert torch.nonzero(strict[1, 2]).flatten().tolist() == [0, 2, 3]
    assert torch.nonzero(strict[3, 4]).flatten().tolist() == [2, 3]
    assert segment(static, max_window=1)[0] == [(f, f) for f in range(5)]


@pytest.mark.parametrize(("ratio", "counts"), [(0.25, [2, 2, 0, 2, 1]), (0.10, [1, 1, 0, 1, 1])])
def test_budget_and_placement_follow_the_authors_example(ratio, counts):
    """r' = r F N / (F N - R); per segment round(n_static r') static tokens (in its first frame) and
    ceil(n_dynamic r') dynamic tokens per frame, by attention: 7 tokens at r = 0.25 (the code's
    one_token count without its newline), 4 at r = 0.10 (the last segment's one static token rounds
    to none)."""
    kept, values, sizes = HoliTomMerge(tau=0.8)._video(example_a(), torch.tensor(ATTENTION), ratio)
    assert kept.sum(1).tolist() == counts
    if ratio == 0.25:
        assert torch.nonzero(kept[0]).flatten().tolist() == [1, 2]  # frame 0 alone: top-2 attention
        assert torch.nonzero(kept[3]).flatten().tolist() == [0, 1]  # dynamic p0, static centre at p1
        assert torch.nonzero(kept[4]).flatten().tolist() == [0]
        # the static centre of segment (3, 4): one of the three outcomes the authors' random tie-break
        # gives (vtoken breaks the tie by index: the first static position, p1): 0.6 m1 + 0.4 mean(m2, m3)
        # of the segment means m1 = (1.507165, 1.060648), m2 = (0, 2.35), m3 = (2.85, 0)
        torch.testing.assert_close(values[3, 1], torch.tensor([1.474299, 1.106389], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        assert sizes[3, 1] == 2 * 3  # two frames of three static positions
        torch.testing.assert_close(values[0, 1], example_a()[0, 1])  # dynamic tokens keep their features


def test_dpc_knn_reproduces_the_authors_example():
    x = torch.tensor([(0, 0), (1, 0.2), (0.3, 1.4), (5, 5), (6.2, 5.1), (5.1, 6.6), (10, 0), (10.8, 1.3)])
    centres, assign = dpc_knn(x, 3, 3)
    assert centres.tolist() == [1, 2, 3]
    assert assign.tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
    merged, weights = merge_into_centres(x, centres, assign, 0.6)
    torch.testing.assert_close(merged, torch.tensor([[0.6, 0.12], [0.3, 1.4], [6.21, 4.3]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def _fold_loops(h: torch.Tensor, kept: list[int], dropped: list[int]) -> torch.Tensor:
    out = h.clone()
    cos = torch.nn.functional.normalize(h, dim=-1)
    for u in dropped:  # similarities of the original rows, sequential pairwise averages
        v = kept[int((cos[u] @ cos[kept].T).argmax())]
        out[v] = (out[v] + h[u]) / 2
    return out


def test_inner_fold_reproduces_the_authors_example_and_the_loop_reference():
    h = torch.zeros(10, 2)
    h[2:8] = torch.tensor([(1, 0), (0, 1), (2, 0.2), (0.1, 2), (3, 0.5), (1, 1)])
    kept, dropped = torch.zeros(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)
    kept[[2, 5, 7]], dropped[[3, 4, 6]] = True, True
    out = fold_into_kept(h, kept, dropped)
    torch.testing.assert_close(out[2], torch.tensor([2.25, 0.3]))  # not the uniform mean (2, 0.2333)
    torch.testing.assert_close(out[5], torch.tensor([0.05, 1.5]))
    torch.testing.assert_close(out[7], h[7])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 4, generator=g)
    keep = torch.rand(30, generator=g) < 0.3
    drop = ~keep
    drop[::7] = False  # some rows neither kept nor folded (padding)
    ref = _fold_loops(h, torch.nonzero(keep).flatten().tolist(), torch.nonzero(drop).flatten().tolist())
    torch.testing.assert_close(fold_into_kept(h, keep, drop)[keep], ref[keep])


def test_inner_selection_is_the_top_of_the_models_own_attention(llava_eager):
    """holitom_inner before layer 2 keeps round(36 * 0.5) tokens per image: the top ones by the last
    prompt token's eager attention in layer 1 (mean over heads), as the model itself returns it."""
    _, inp, _ = family_setup("llava")
    with torch.no_grad():
        att = llava_eager(**inp, output_attentions=True).attentions[1].mean(1)[:, -1]  # (B, L)
    with vtoken.patch(llava_eager, "holitom_inner", layer_k=2) as p, torch.no_grad():
        llava_eager(**inp)
        kept = p.kept_positions()
    image = inp["input_ids"] == 3
    for b in range(2):
        cols = torch.nonzero(image[b]).flatten()
        assert kept[b].tolist() == att[b, cols].argsort(descending=True)[:18].sort().values.tolist()


KINDS = ["qwen2_vl", "qwen2_5_vl"]
SAMPLES = [[(8, 8), (3, 8, 12)], [(4, 8, 8)], []]  # an image and a 3-frame video; a 4-frame video; text


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    return request.param, tiny_qwen(request.param)


@pytest.mark.parametrize("params", [{"keep": 0.3, "tau": 0.5}, {"keep": 20, "tau": 0.0, "inner": False}])
def test_batch_equals_each_sample_alone_and_cached_decode_equals_recompute(qwen, params):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind, seed=4)
    n = inp["input_ids"].shape[1]
    with vtoken.patch(model, "holitom", **params) as p, torch.no_grad():
        together = model(**inp).logits
        kept = [len(k) for k in p.kept_positions()]
        for b, items in enumerate(SAMPLES):
            alone = qwen_media_inputs([items], kind, seed=4)
            length = int(inp["attention_mask"][b].sum())
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                alone[key] = inp[key][b:b + 1, -length:]
            if items:
                alone.update(qwen_media_of(inp, SAMPLES, b))
            torch.testing.assert_close(together[b, -3:], model(**alone).logits[0, -3:], atol=5e-5, rtol=1e-4)
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=QWEN_SPECIAL)
        with p.prompt(n):
            full = model(**qwen_continued(inp, out.sequences[:, :-1]), use_cache=False).logits
    torch.testing.assert_close(full[:, n - 1:], torch.stack(out.logits, 1), atol=5e-5, rtol=1e-4)
    if not params.get("inner", True):
        assert kept[0] == 16  # the image passes the outer merge unchanged
        assert sum(kept[1:4]) < 3 * 24 and sum(kept[4:]) < 4 * 16


def test_an_int_keep_is_the_videos_total_budget(qwen):
    """keep=18 on a 3-frame video of 24 tokens is the retain ratio 18 / 72 = 0.25 (and 4 frames of 16:
    0.28125): the same tokens as the float ratio."""
    kind, model = qwen
    inp = qwen_media_inputs([[(3, 8, 12)], [(4, 8, 8)]], kind, seed=3)
    counts = {}
    for keep in (18, 0.25):
        with vtoken.patch(model, "holitom", keep=keep, tau=0.9, inner=False) as p, torch.no_grad():
            model(**inp)
            counts[keep] = [k.tolist() for k in p.kept_positions()]
    assert counts[18][:3] == counts[0.25][:3]
    assert sum(len(k) for k in counts[18][:3]) < 72


def test_ratio_one_and_no_inner_keeps_everything(qwen):
    kind, model = qwen
    inp = qwen_media_inputs(SAMPLES, kind, seed=1)
    with torch.no_grad():
        ref = model(**inp).logits
        with vtoken.patch(model, "holitom", keep=1.0, tau=1.0, inner=False) as p:
            assert torch.equal(model(**inp).logits, ref)
            assert [len(k) for k in p.kept_positions()] == [16, 24, 24, 24, 16, 16, 16, 16]


def test_refusals_are_clear():
    """A merge across a video's frames cannot carry Qwen3-VL's per-frame deepstack rows: refused; its
    images pass the outer merge unchanged (the inner merge acts after the deepstack layers)."""
    model = tiny_qwen("qwen3_vl", vision_layers=3)
    with vtoken.patch(model, "holitom") as p, torch.no_grad():
        model(**qwen_media_inputs([[(8, 8)], [(8, 12)]], "qwen3_vl"))
        assert [len(k) for k in p.kept_positions()] == [8, 12]  # inner merge: round(n * 0.5)
        with pytest.raises(vtoken.LayoutError, match="deepstack"):
            model(**qwen_media_inputs([[(2, 8, 8)]], "qwen3_vl"))
    with pytest.raises(vtoken.ParameterError, match="inner=False"):
        vtoken.get("holitom")(inner=False, ratio=0.3)
    with pytest.raises(vtoken.ParameterError, match="ratio"):
        vtoken.get("holitom_inner")(keep=0.5)
    with pytest.raises(vtoken.ParameterError, match="tau"):
        vtoken.get("holitom")(tau=2.0)
    assert math.isclose(vtoken.get("holitom")().keep, 0.1)  # the code's RETAIN_RATIO


def test_bf16_video_runs_and_generates():
    model = tiny_qwen("qwen2_vl", dtype=torch.bfloat16)
    inp = qwen_media_inputs(SAMPLES, "qwen2_vl", seed=2)
    inp = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inp.items()}
    with vtoken.patch(model, "holitom", keep=0.3, tau=0.5) as p, torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=QWEN_SPECIAL)
        assert sum(len(k) for k in p.kept_positions()[1:4]) < 3 * 24
    assert torch.isfinite(torch.stack(out.logits, 1).float()).all()
